"""Layer classes a quantized or reduced-precision torch variant is rebuilt from at load time.

`slimserve optimize` (offline) swaps these layers into a model and saves plain tensors; the torch
runtime (load time) rebuilds the same layers empty from `variant.yaml` and loads the tensors
(`variant.VariantModel`). They live with the runtimes so that loading a variant imports nothing
from `slimserve.optimize`; `optimize` imports them from here.

- `qmath`: the integer arithmetic (scales, packing, int matmul);
- `layers`: int8 dynamic / weight-only int8 / int4 / static int8 ("gemm") layers;
- `native`: static int8 on PyTorch's quantized CPU kernels; `sequential`: their fast Sequential;
- `variant`: `VariantModel` and the table of layer kinds.
"""
