"""The workload file of `slimserve plan`: models (rate, p99 objective, quality budget) and
machines. Every mistake is reported with the file, the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimserve.errors import ConfigError
from slimserve.repository.schema import describe_validation_error, read_yaml_mapping

GiB = 1 << 30

EXAMPLE = """\
machines: {cores: 2, memory_gb: 8, count: 2}
models:
  mnist-mlp: {rate_rps: 400, p99_ms: 20, max_quality_loss: 1.0}
"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelLoad(_Strict):
    """What one model must serve."""

    rate_rps: float = Field(gt=0, description="requests per second to serve")
    p99_ms: float = Field(gt=0, description="latency objective: p99 in milliseconds")
    max_quality_loss: float = Field(
        0.0, ge=0, le=100, description="points of quality the model may give up (0: original)"
    )
    version: int | None = Field(None, gt=0, description="version (default: the latest)")


class MachineSpec(_Strict):
    """The machines to place replicas on (all alike)."""

    cores: int = Field(gt=0)
    memory_gb: float = Field(gt=0)
    count: int = Field(gt=0, le=10_000)
    reserved_memory_gb: float = Field(
        0.5, ge=0, description="memory each machine keeps for the server process itself"
    )


class Workload(_Strict):
    machines: MachineSpec
    models: dict[str, ModelLoad] = Field(min_length=1)


_FIXES = {
    "rate_rps": "give requests per second, a number > 0, e.g. rate_rps: 400",
    "p99_ms": "give the p99 objective in milliseconds, a number > 0, e.g. p99_ms: 20",
    "max_quality_loss": "give points of quality (0-100) the model may lose, e.g. 1.0",
    "cores": "give the cores of one machine, e.g. cores: 8",
    "memory_gb": "give the memory of one machine in GiB, e.g. memory_gb: 16",
    "count": "give how many machines there are, e.g. count: 2",
    "machines": "add machines: {cores: 2, memory_gb: 8, count: 2}",
    "models": "add models: {NAME: {rate_rps: 400, p99_ms: 20}}",
}


def load_workload(path: Path) -> Workload:
    """Read and validate a workload file; ConfigError names every mistake and its fix."""
    data = read_yaml_mapping(path, f"a workload file like:\n{EXAMPLE}")
    try:
        return Workload.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc, _FIXES)) from None
