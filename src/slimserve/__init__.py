"""slimserve: serve machine-learning models as fast, safe network services.

Importing this package loads no framework (torch, onnxruntime, transformers) and starts
nothing; those are imported by the runtime that needs them, when it loads a model.
"""

from slimserve.errors import SlimserveError
from slimserve.types import InferRequest, InferResponse, TensorSpec

__version__ = "0.1.0"
__all__ = ["InferRequest", "InferResponse", "SlimserveError", "TensorSpec", "__version__"]
