"""A python-backend text model for the console's browser tests, imported by the server process
(which gets this folder on PYTHONPATH): text in, the text upper-cased and its length out."""

from __future__ import annotations

import numpy as np


class Shout:
    thread_safe = True

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = inputs["text"]
        upper = np.array([t.upper() for t in text.reshape(-1)], dtype=object).reshape(text.shape)
        lengths = np.array([len(t) for t in text.reshape(-1)], dtype=np.int32)
        return {"upper": upper, "length": lengths.reshape(text.shape)}
