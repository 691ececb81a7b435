"""Through the engine: an encrypted model serves; a wrongly keyed one is refused, the rest serve.

The data key reaches the runtimes through RuntimeOptions.data_key; until the composition root
fills it from settings, this test passes it with a runtime factory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.errors import Unavailable
from slimserve.repository import Repository
from slimserve.repository.store import Target
from slimserve.runtimes import Runtime, RuntimeOptions, create_runtime
from slimserve.security.crypto import encrypt_unit, generate_data_key
from slimserve.types import InferRequest

from .conftest import SIZES


def test_wrong_key_refuses_one_model_and_the_others_serve(repo: Path, data_key: bytes) -> None:
    shutil.rmtree(repo / "tiny-bert")  # two small models are enough here
    encrypt_unit(repo / "mlp-onnx" / "1", data_key)
    encrypt_unit(repo / "mlp-torch" / "1", generate_data_key())  # not the server's key

    def factory(target: Target, options: RuntimeOptions) -> Runtime:
        return create_runtime(target, dataclasses.replace(options, data_key=data_key))

    x = {"input": np.ones((2, SIZES[0]), dtype=np.float32)}

    async def main() -> np.ndarray:
        engine = build_engine(
            Settings(repository=repo), repository=Repository(repo), runtime_factory=factory
        )
        await engine.start(wait=True)
        try:
            meta = engine.model_metadata("mlp-torch")
            assert meta.state == "UNAVAILABLE"
            assert "wrong key or the file was modified" in meta.reason
            assert "model.safetensors.enc" in meta.reason
            with pytest.raises(Unavailable, match="wrong key"):
                await engine.infer(InferRequest("mlp-torch", x))
            response = await engine.infer(InferRequest("mlp-onnx", x))
            return response.outputs["logits"]
        finally:
            await engine.stop()

    logits = asyncio.run(main())
    assert logits.shape == (2, SIZES[-1]) and np.isfinite(logits).all()
