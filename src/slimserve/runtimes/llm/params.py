"""What a caller asks of the generation engine, and what it gets back (no torch here).

A transport builds one `SamplingParams` per request (validated at construction, every mistake
named with its field and a fix), calls `GenerationEngine.submit`, and relays the `TokenEvent`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.errors import InvalidArgument

# Reasons a choice ends, spelled as the OpenAI API spells them ("length": max_tokens reached or
# the context is full; "stop": end-of-sequence token or a stop string).
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on a choice's text, enforced token by token (grammar.py, llguidance).

    `kind`: json_schema (`source`: a JSON Schema as JSON text), json_object (any JSON object;
    `source` unused) or lark (`source`: a Lark grammar, llguidance's dialect). Sampling only
    ever picks tokens the grammar allows, and the choice ends (finish_reason stop) when the
    grammar is complete: its text parses, as long as max_tokens did not cut it short."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        _check(self.kind in GRAMMAR_KINDS, "grammar", self.kind, " or ".join(GRAMMAR_KINDS))


GRAMMAR_KINDS = ("json_schema", "json_object", "lark")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request. Defaults are the OpenAI API's."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax), the same tokens as transformers' generate()
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this mass
    stop: tuple[str, ...] = ()  # strings that end a choice; they are not part of the text
    seed: int | None = None  # same seed, same prompt, same params: the same sampled tokens
    n: int = 1  # choices per request; they share the prompt's KV blocks
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top-k's
    ignore_eos: bool = False  # benchmarks: always generate max_tokens tokens
    top_k: int = 0  # keep the k most likely tokens only; 0 (or -1): all
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one
    # > 1 makes every token already in the prompt or output less likely (transformers' and
    # vLLM's rule: a positive logit is divided by it, a negative one multiplied); greedy too.
    repetition_penalty: float = 1.0
    grammar: Grammar | None = None  # constrained decoding (response_format, tools)

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(0.0 <= self.temperature <= 2.0, "temperature", self.temperature, "0 to 2")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a number in (0, 1]")
        _check(1 <= self.n <= 16, "n", self.n, "1 to 16")
        _check(len(self.stop) <= 4, "stop", self.stop, "at most 4 strings")
        _check(all(self.stop), "stop", self.stop, "non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, value, "-2 to 2")
        _check(self.top_k >= -1, "top_k", self.top_k, "an integer >= 0 (0 or -1: off)")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "0 to 1")
        _check(
            0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            self.repetition_penalty,
            "a number in (0, 2]; 1: off",
        )
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= 20, "logprobs", self.logprobs, "0 to 20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filtered(self) -> bool:
        """Whether top_k or min_p cut the distribution (sampled rows only)."""
        return self.top_k > 0 or self.min_p > 0.0


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidArgument(f"sampling parameter {name}={value!r} is invalid; use {expected}")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for a whole request (all its choices), as OpenAI's `usage` object."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """New output of one choice (`index`). Text deltas concatenate to the choice's text.

    `finish_reason` is set on the choice's last event; `usage` only on the request's very last
    event (after every choice finished). `text` may be empty while a possible stop string or an
    incomplete UTF-8 character is held back; `token_ids` always holds the new tokens.
    """

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = field(default=())
