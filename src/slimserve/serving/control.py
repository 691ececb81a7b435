"""Who may call, and model control: API-key checks, and loading and unloading through the
API (when --model-control allows it), each management action written to the audit log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from slimserve.errors import InvalidArgument, ModelLoadError, PermissionDenied, SlimserveError
from slimserve.repository.store import Repository, split_served_name
from slimserve.security.audit import AuditLog
from slimserve.security.keys import ANONYMOUS, Authenticator, Identity
from slimserve.serving.catalog import Public
from slimserve.serving.models import ModelManager, State


class ModelControl:
    def __init__(
        self,
        repository: Repository,
        models: ModelManager,
        audit: AuditLog,
        auth: Authenticator | None,
        enabled: bool,
        public: Public,
    ) -> None:
        self.repository, self.models, self.audit, self.auth = repository, models, audit, auth
        self.enabled = enabled  # --model-control
        self.public = public

    def authorize(self, token: str | None, scope: str, model: str | None = None) -> Identity:
        """Who is calling (from a bearer token) and whether they may use `scope` on `model`.

        Without a key file every caller is anonymous and allowed. Raises Unauthenticated
        (401) or PermissionDenied (403); never echoes the token. A refused management call
        is audited like an allowed one.
        """
        if self.auth is None:
            return ANONYMOUS
        identity = None
        try:
            identity = self.auth.authenticate(token)
            self.auth.authorize(identity, scope, model)
        except SlimserveError as exc:
            if scope == "manage":
                self.audit.record(identity, "authorize", model, outcome=exc.code.value.lower())
            raise
        return identity

    def identify(self, token: str | None) -> Identity:
        """Who holds `token` (any scope); anonymous without a key file. Unauthenticated (401)
        for a missing, unknown or revoked key."""
        return ANONYMOUS if self.auth is None else self.auth.authenticate(token)

    async def load(self, name: str, identity: Identity | None = None) -> None:
        await self._audited("load", name, identity, self._load)

    async def unload(self, name: str, identity: Identity | None = None) -> None:
        await self._audited("unload", name, identity, self._unload)

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise PermissionDenied(
                "model control is disabled; start the server with --model-control "
                "(or SLIMSERVE_MODEL_CONTROL=true) to load and unload models through the API"
            )

    async def _audited(
        self,
        action: str,
        name: str,
        identity: Identity | None,
        run: Callable[[str], Awaitable[None]],
    ) -> None:
        """Run a management action and write its audit line, whether it succeeds or not."""
        shown = name if len(name) <= 128 else name[:128] + "..."
        try:
            self._check_enabled()
            await run(name)
        except SlimserveError as exc:
            self.audit.record(identity, action, shown, outcome=exc.code.value.lower())
            exc.message = self.public(exc.message)
            raise
        self.audit.record(identity, action, shown)

    async def _load(self, name: str) -> None:
        model, variant = split_served_name(name)
        if variant is not None:
            raise InvalidArgument("load a model by its name; its variants load with it")
        self.repository.model_dir(model)  # NotFound with the repository path
        entry = await self.models.load(model)
        if entry.state is not State.READY:
            raise ModelLoadError(f"model '{model}' failed to load: {entry.reason}")

    async def _unload(self, name: str) -> None:
        model, variant = split_served_name(name)
        if variant is not None:
            raise InvalidArgument("unload a model by its name; its variants unload with it")
        await self.models.unload(model)
