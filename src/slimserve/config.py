"""Settings: every server option, defined and documented once.

One typed object, filled (highest priority first) from command-line flags, the environment
(`SLIMSERVE_<FIELD>`, e.g. `SLIMSERVE_HTTP_PORT=9000`) and an optional YAML file
(`--config FILE`), then passed down. No other module reads the environment. The CLI builds its
flags and their help text from the fields below, so a default is written in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from slimserve.errors import ConfigError

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every option of `slimserve serve`."""

    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="forbid", frozen=True)

    repository: Path = Field(Path("models"), description="Model repository folder.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback by default; 0.0.0.0 exposes the server.",
    )
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: disabled).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: disabled).")
    grpc_server: Literal["native", "grpcio"] = Field(
        "native",
        description="gRPC implementation: 'native' (slimserve's own HTTP/2 layer for the v2 "
        "service's unary calls; several times less CPU per call) or 'grpcio' (grpc.aio).",
    )
    load_models: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Models to load at start ('*': all in the repository; empty: none); an "
        "entry NAME/VERSION or NAME/VERSION:VARIANT loads that one unit only.",
    )
    model_control: bool = Field(
        False,
        description="Allow loading and unloading models through the repository API.",
    )
    memory_budget_bytes: int = Field(
        0,
        ge=0,
        description="Memory for resident models, in bytes; least valuable models are evicted "
        "to stay under it (0: half of the memory available at start).",
    )
    eviction_policy: Literal["lru", "lfu", "gdsf"] = Field(
        "gdsf",
        description="Which resident model to evict first: lru, lfu, or gdsf (size- and "
        "load-cost-aware GreedyDual-Size-Frequency).",
    )
    pin_models: list[str] = Field(
        default_factory=list, description="Models never evicted from memory."
    )
    client_rate_limit: float = Field(
        0,
        ge=0,
        description="Requests per second allowed to each client identity (0: unlimited); "
        "over it, 429 with Retry-After.",
    )
    client_burst: float = Field(
        0, ge=0, description="Burst allowed above client_rate_limit (0: one second's worth)."
    )
    redis_url: str | None = Field(
        None,
        description="redis://HOST:PORT/DB for state shared by several server processes "
        "(response cache); none: in memory, per process.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="API key file (`slimserve keys create`); every call but health then needs "
        "'Authorization: Bearer KEY' with the right scope. None: no authentication (keep the "
        "server on loopback).",
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain: serve HTTPS and gRPC over TLS (with tls_key)."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mTLS)."
    )
    data_key_file: Path | None = Field(
        None,
        description="32-byte data key (raw, hex or base64) for artifacts encrypted with "
        "`slimserve repo encrypt`.",
    )
    data_key_env: str | None = Field(
        None, description="Name of an environment variable holding the data key instead."
    )
    audit_log: Path | None = Field(
        None,
        description="File to append audit lines to (JSON, one per management action); the "
        "slimserve.audit logger always gets them.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the ports; each loads its own models (the "
        "memory budget is split between them), batches and counts on its own.",
    )
    worker_max_restarts: int = Field(
        5,
        ge=0,
        description="With several workers: how often one worker may die within a minute "
        "and be restarted (with backoff); one more death is a crash loop, which stops the "
        "server with the reason.",
    )
    ray: str | None = Field(
        None,
        description="Serve on Ray Serve: 'local' starts a Ray instance on this machine, an "
        "address (HOST:PORT, ray://HOST:PORT or auto) joins a running cluster; each replica "
        "runs a whole slimserve engine and Ray's proxy listens on host:http_port (and "
        "grpc_port). None: serve from this process (or --workers processes).",
    )
    replicas: int = Field(
        1, ge=1, le=256, description="With ray: how many replicas serve (fixed count)."
    )
    ray_proxy: Literal["head", "every-node"] = Field(
        "head",
        description="With ray: where Ray's HTTP/gRPC proxy runs: 'head' (one entry point on "
        "the head node) or 'every-node' (one per node, each on host:http_port; put a load "
        "balancer in front).",
    )
    ray_router: Literal["slimserve", "ray"] = Field(
        "slimserve",
        description="With ray: 'slimserve' routes by model residency, free budget and queue "
        "depth; 'ray' is Ray Serve's default router (power of two choices), for comparison.",
    )
    ray_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="With ray: how the worker processes of a model split over several "
        "(model.yaml generation: pipeline_parallel x tensor_parallel > 1) are gang-scheduled, "
        "one Ray placement-group bundle each: PACK (as few nodes as hold them), SPREAD (over "
        "nodes where it can), STRICT_PACK (one node), STRICT_SPREAD (a node each).",
    )
    ray_group_cpus: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="With ray: CPUs reserved for each worker process of a split model (its "
        "placement-group bundle).",
    )
    autoscale: str | None = Field(
        None,
        description="With ray: MIN,MAX replicas, scaled by slimserve's own signals (requests "
        "in flight per replica, queue delay) instead of a fixed --replicas.",
    )
    max_body_bytes: int = Field(
        64 * MiB, gt=0, description="Largest request body accepted, in bytes (413 above)."
    )
    max_tensor_elements: int = Field(
        1 << 26,
        gt=0,
        description="Most elements one input tensor may hold (the product of its shape); "
        "400 / INVALID_ARGUMENT above.",
    )
    max_string_bytes: int = Field(
        4 * MiB,
        gt=0,
        description="Longest BYTES (string) tensor element accepted, in bytes; "
        "400 / INVALID_ARGUMENT above.",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest request line plus headers (HTTP, 431 above) or metadata (gRPC), "
        "in bytes.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers, from the "
        "connection's start or a later request's first byte (HTTP: 408 and the connection "
        "closed; gRPC: the TLS and HTTP/2 handshake).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a whole request body once its headers are "
        "in (HTTP: 408 and the connection closed).",
    )
    keep_alive_s: float = Field(
        30.0,
        gt=0,
        description="Seconds an idle HTTP keep-alive connection stays open; gRPC connections "
        "with no call for ten times as long are closed (clients reconnect by themselves).",
    )
    max_connections: int = Field(
        1024,
        ge=0,
        description="Most HTTP connections and requests in progress at once; above, 503 "
        "(0: unlimited).",
    )
    max_queue_size: int = Field(
        512,
        gt=0,
        description="Default bound on queued requests per model; a full queue answers 503.",
    )
    inference_threads: int = Field(
        0,
        ge=0,
        description="Threads that run inference across all models (0: one per CPU core).",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="Threads inside one inference call (ONNX Runtime, torch; 0: CPU cores).",
    )
    spin_wait: bool = Field(
        False,
        description=(
            "Let idle intra-op threads spin while waiting for work (ONNX Runtime's and "
            "OpenMP's default). Off: they sleep, which leaves the cores to the server's own "
            "threads and to other processes; on: slightly lower latency on dedicated cores."
        ),
    )
    ort_graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level."
    )
    verify_manifests: bool = Field(
        True, description="Check each version's MANIFEST.json sha256 sums at load."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines as JSON objects (with request ids) or plain text."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use a redis://HOST:PORT/DB (or rediss://, unix://) URL")
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mTLS is over TLS)")
        if self.workers > 1 and self.model_control:
            raise ValueError(
                "model_control with several workers would load or unload in one process "
                "only; use workers: 1 to manage models through the API"
            )
        if self.autoscale is not None and self.ray is None:
            raise ValueError("autoscale needs ray: add --ray local (or --ray ADDRESS)")
        if self.ray is not None and self.workers > 1:
            raise ValueError("ray and workers do not mix: Ray runs the replicas; drop --workers")
        if self.data_key_file is not None and self.data_key_env is not None:
            raise ValueError("set data_key_file or data_key_env, not both")
        return self

    def data_key_environment(self) -> dict[str, str]:
        """{data_key_env: its value} when that variable is set (for security.crypto's
        resolve_data_key): the environment is read here and nowhere else."""
        name = self.data_key_env
        value = None if name is None else os.environ.get(name)
        return {} if name is None or value is None else {name: value}

    @field_validator("autoscale")
    @classmethod
    def _autoscale_bounds(cls, value: str | None) -> str | None:
        if value is not None:
            autoscale_bounds(value)  # raises with the fix
        return value

    def autoscale_range(self) -> tuple[int, int] | None:
        """(min, max) replicas from `autoscale`, None when the count is fixed."""
        return None if self.autoscale is None else autoscale_bounds(self.autoscale)

    def shares_ports(self) -> bool:
        """Whether several processes listen on this server's gRPC port (`--workers`, or Ray
        replicas on one node): bind it with SO_REUSEPORT."""
        return self.workers > 1 or self.ray is not None

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("host is empty; use 127.0.0.1 (loopback) or 0.0.0.0 (all)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) over environment; the YAML file is merged into init by `load`.
        return (init_settings, env_settings)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Settings:
        """Build settings from flags, then the environment, then `config_file`.

        Flags whose value is None are treated as not given. Every mistake raises ConfigError
        naming the field, the value and what is allowed.
        """
        given = {k: v for k, v in flags.items() if v is not None}
        file_values: dict[str, Any] = {}
        if config_file is not None:
            file_values = _read_yaml(config_file)
        env_names = {f"SLIMSERVE_{k.upper()}" for k in cls.model_fields}

        from_env = {n[len("SLIMSERVE_") :].lower() for n in env_names if n in os.environ}
        merged = {k: v for k, v in file_values.items() if k not in from_env}
        merged.update(given)
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, config_file)) from None


def autoscale_bounds(text: str) -> tuple[int, int]:
    """'MIN,MAX' as two ints, 0 <= MIN <= MAX, MAX >= 1."""
    parts = text.split(",")
    try:
        low, high = (int(p) for p in parts) if len(parts) == 2 else (-1, -1)
    except ValueError:
        low, high = -1, -1
    if not 0 <= low <= high or high < 1:
        raise ValueError("use MIN,MAX replicas with 0 <= MIN <= MAX and MAX >= 1, e.g. 1,4")
    return low, high


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _describe(exc: ValidationError, source: Path | None) -> str:
    where = f"{source}: " if source else ""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(settings)"
        value = err.get("input")
        hint = ""
        if err["type"] == "extra_forbidden":
            hint = f"; known settings: {', '.join(sorted(Settings.model_fields))}"
        lines.append(f"{where}setting '{field}' = {value!r}: {err['msg']}{hint}")
    return "\n".join(lines)
