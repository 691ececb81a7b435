"""A python-backend model for the gRPC end-to-end tests, imported by the server process (which
gets this folder on PYTHONPATH): text in, the same text out; halves in, twice the halves out.
"""

from __future__ import annotations

import numpy as np


class TextEcho:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"text_out": inputs["text"], "twice": inputs["half"] * 2}
