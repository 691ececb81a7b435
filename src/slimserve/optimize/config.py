"""The base of every technique's configuration (as torchao's `AOBaseConfig`).

One frozen dataclass per technique (`DynamicInt8`, `MagnitudePruning`, `WeightSharing`,
`DeepCompression`, ...), validated in `__post_init__` with a message that names the field, the
value and the fix. A verb (`quantize_`, `prune_`, ...) dispatches on the config's type; the
recipe steps build these configs from their text while parsing, before any work is done.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class OptimizeConfig:
    """A technique's settings; `technique` names it in reports and variant.yaml."""

    technique: ClassVar[str] = ""

    def describe(self) -> dict[str, Any]:
        """The settings as plain data, with the technique's name."""
        return {"technique": self.technique or type(self).__name__, **asdict(self)}
