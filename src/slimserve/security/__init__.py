"""Security: scoped API keys, encrypted artifacts at rest, the audit log, path confinement.

Importing this package loads nothing heavy; `crypto` imports `cryptography` when used.
"""

from __future__ import annotations

from slimserve.security.keys import (
    ANONYMOUS,
    SCOPES,
    Authenticator,
    Identity,
    KeyStore,
    authorize,
    bearer_token,
)

__all__ = [
    "ANONYMOUS",
    "SCOPES",
    "Authenticator",
    "Identity",
    "KeyStore",
    "authorize",
    "bearer_token",
]
