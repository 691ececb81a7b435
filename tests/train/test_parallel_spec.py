"""Parallel layouts: parsing, checks against the world size, cutting models into stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.train.distributed import init_distributed
from slimserve.train.parallel import ParallelSpec, check_world, parse_parallel
from slimserve.train.pipeline import microbatch_count
from slimserve.train.stages import pipeline_blocks, split_blocks
from slimserve.zoo import MLP, CaffeLeNet, LeNet5


def test_parse_degrees():
    assert parse_parallel("pp=2") == ParallelSpec(pp=2)
    assert parse_parallel("dp=2, pp=2") == ParallelSpec(dp=2, pp=2)
    assert parse_parallel("fsdp=4").size == 4
    assert str(parse_parallel("pp=2,dp=3")) == "dp=3,pp=2"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tp=2", "NAME one of dp, fsdp, pp"),
        ("pp", "NAME=N"),
        ("pp=two", "NAME=N"),
        ("pp=2,pp=2", "pp is given twice"),
        ("pp=0", "whole number >= 1"),
        ("fsdp=2,pp=2", "fsdp combines with neither dp nor pp"),
    ],
)
def test_bad_specs_say_what_to_write(text, says):
    with pytest.raises(InvalidArgument, match=says):
        parse_parallel(text)


def test_product_must_equal_world_size():
    check_world(ParallelSpec(dp=2, pp=2), 4)
    with pytest.raises(InvalidArgument, match=r"needs 4 processes .* torchrun started 2"):
        check_world(ParallelSpec(dp=2, pp=2), 2)
    with pytest.raises(InvalidArgument, match="this is one process; start it with torchrun"):
        init_distributed(parallel=ParallelSpec(pp=2))  # not launched by torchrun


def test_stages_balance_weights_and_keep_activations_with_their_layer():
    blocks = pipeline_blocks(MLP([64, 48, 32, 10]))  # Flatten, L, ReLU, L, ReLU, L
    assert split_blocks(blocks, 2) == [(0, 3), (3, 6)]  # 3120 weights | 1568+330
    assert split_blocks(blocks, 3) == [(0, 3), (3, 5), (5, 6)]


def test_too_few_blocks_for_the_stages():
    with pytest.raises(InvalidArgument, match="at most 2 pipeline stages; use pp<=2"):
        split_blocks(pipeline_blocks(MLP([64, 24, 10])), 4)


def test_a_model_that_is_not_a_sequence_of_blocks_is_refused():
    class Branchy(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(InvalidArgument, match="no pipeline_blocks"):
        pipeline_blocks(Branchy())


def test_microbatches_must_split_the_rows_evenly():
    assert microbatch_count(64, 2, None) == 4
    assert microbatch_count(6, 2, None) == 2
    with pytest.raises(InvalidArgument, match="cannot split into equal micro-batches"):
        microbatch_count(9, 2, None)
    with pytest.raises(InvalidArgument, match="at least the 4 stages"):
        microbatch_count(64, 4, 2)


@pytest.mark.parametrize("model", [MLP([784, 32, 10]), LeNet5(), CaffeLeNet()])
def test_zoo_blocks_applied_in_turn_are_the_forward(model):
    x = torch.randn(3, 784)
    out = x
    for block in pipeline_blocks(model):
        out = block(out)
    torch.testing.assert_close(out, model(x))
    assert len(split_blocks(pipeline_blocks(model), 2)) == 2
