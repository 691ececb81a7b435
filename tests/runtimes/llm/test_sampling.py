"""Token choice: greedy, nucleus, penalties, logprobs, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimserve.runtimes.llm import SamplingParams
from slimserve.runtimes.llm.grammar import Constraint
from slimserve.runtimes.llm.sampling import sample


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    constraint: Constraint | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output_ids


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])


def test_greedy_rows_take_the_argmax() -> None:
    tokens, logprobs = sample(LOGITS, [Row(SamplingParams(temperature=0))] * 2)
    assert tokens == [1, 0] and logprobs == [None, None]


def test_a_tiny_top_p_keeps_only_the_top_token() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.01)
    draws = {sample(LOGITS[:1], [Row(params, seeded(s))])[0][0] for s in range(30)}
    assert draws == {1}


def test_top_p_keeps_the_nucleus_only() -> None:
    # Softmax of row 0: ~[0.03, 0.50, 0.46, 0.01]; top_p 0.9 keeps tokens 1 and 2.
    params = SamplingParams(temperature=1.0, top_p=0.9)
    draws = {sample(LOGITS[:1], [Row(params, seeded(s))])[0][0] for s in range(60)}
    assert draws == {1, 2}


def test_frequency_penalty_steers_away_from_repeats() -> None:
    params = SamplingParams(temperature=0, frequency_penalty=0.2)
    assert sample(LOGITS[:1], [Row(params, output_ids=[1])])[0] == [2]
    assert sample(LOGITS[:1], [Row(params, output_ids=[])])[0] == [1]


def test_presence_penalty_counts_once() -> None:
    params = SamplingParams(temperature=0, presence_penalty=0.2)
    assert sample(LOGITS[:1], [Row(params, output_ids=[1, 1, 1])])[0] == [2]


def test_logprobs_report_the_choice_and_the_top() -> None:
    params = SamplingParams(temperature=0, logprobs=2)
    _, (logprob,) = sample(LOGITS[:1], [Row(params)])
    expected = torch.log_softmax(LOGITS[0], -1)
    assert logprob is not None and logprob.token_id == 1
    assert abs(logprob.logprob - float(expected[1])) < 1e-6
    assert [token for token, _ in logprob.top] == [1, 2]


def test_a_seed_fixes_the_draws_whatever_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=3)
    alone = sample(LOGITS[:1], [Row(params, seeded(3))])[0]
    greedy = Row(SamplingParams(temperature=0))
    batched = sample(LOGITS, [Row(params, seeded(3)), greedy])[0]
    assert batched[:1] == alone


def test_top_k_and_min_p_cut_the_tail() -> None:
    top1 = SamplingParams(temperature=2.0, top_k=1)
    assert {sample(LOGITS[:1], [Row(top1, seeded(s))])[0][0] for s in range(30)} == {1}
    wide = SamplingParams(temperature=2.0)
    assert len({sample(LOGITS[:1], [Row(wide, seeded(s))])[0][0] for s in range(60)}) == 4
    # min_p 0.5: tokens at least half as likely as the best (1 and 2 here) stay.
    half = SamplingParams(temperature=1.0, min_p=0.5)
    assert {sample(LOGITS[:1], [Row(half, seeded(s))])[0][0] for s in range(60)} == {1, 2}


def test_repetition_penalty_counts_the_prompt_too() -> None:
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(LOGITS[:1], [Row(params, prompt=[1])])[0] == [2]  # 3.0 / 2 < 2.9
    assert sample(LOGITS[:1], [Row(params, prompt=[3])])[0] == [1]
