"""The runtime contract (slimserve.testing.RuntimeContract) against every runtime."""

from __future__ import annotations

import pytest

from slimserve.repository.store import Target
from slimserve.runtimes import Runtime, RuntimeOptions
from slimserve.testing import EchoRuntime, FailingRuntime, RuntimeContract, SlowRuntime, toy_target


class TestOnnxContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, onnx_target: Target) -> Target:
        return onnx_target


class TestTorchContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, torch_target: Target) -> Target:
        return torch_target


class TestEmbeddingContract(RuntimeContract):
    batch = 3  # each row alone is a full forward of a 22M-parameter model

    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, embedding_target: Target) -> Target:
        return embedding_target


class TestClassifierContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, classifier_target: Target) -> Target:
        return classifier_target


class TestEchoContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls) -> Target:
        return toy_target("echo", width=4, max_batch_size=8)

    @classmethod
    def make_runtime(cls, target: Target) -> Runtime:
        return EchoRuntime(target)


class TestUnbatchedEchoContract(TestEchoContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls) -> Target:
        return toy_target("echo-unbatched", width=3, max_batch_size=0)


class TestSlowContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls) -> Target:
        return toy_target("slow", datatype="INT64")

    @classmethod
    def make_runtime(cls, target: Target) -> Runtime:
        return SlowRuntime(target, RuntimeOptions(), delay_s=0.0)


class TestFailingContractWhileHealthy(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls) -> Target:
        return toy_target("failing")

    @classmethod
    def make_runtime(cls, target: Target) -> Runtime:
        return FailingRuntime(target, fail_after=10_000)
