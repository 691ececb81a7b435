"""The name variants made before the layer classes moved to the runtimes carry in variant.yaml
(`model_class: slimserve.optimize.wrappers:VariantModel`); new variants name
`slimserve.runtimes.quantized.variant:VariantModel`."""

from slimserve.runtimes.quantized.variant import VariantModel

__all__ = ["VariantModel"]
