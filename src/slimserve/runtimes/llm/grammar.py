"""Constrained decoding with llguidance: a choice only ever samples tokens its grammar allows.

Why llguidance: a grammar engine made for this (JSON Schema, Lark and regex over a real
tokenizer's byte-level vocabulary, masks in tens of microseconds, no torch.compile or GPU),
a single wheel without dependencies that installs on CPU Python 3.11 and reads transformers'
fast tokenizers directly. xgrammar pins its own torch; outlines-core compiles a whole-vocabulary
index per schema up front.

Per engine, `Grammars` turns a `Grammar` (params.py) into an llguidance grammar, validates it
at submit (a bad schema is a 400 before any token) and gives each choice its own `Constraint`
(an `LLMatcher`). Per step, `mask_rows` sets the logits of forbidden tokens to -inf for the
constrained rows only; after sampling, `Constraint.advance` feeds the matcher the token, and
the choice ends when the grammar is complete.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch

from slimserve.errors import InvalidArgument
from slimserve.runtimes.llm.params import Grammar

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON (no free whitespace between tokens: a weak model can't loop on spaces), and no
# keys beyond a schema's properties unless it says so.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "coerce_one_of": True}


class Constraint:
    """One choice's grammar state (an llguidance matcher)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed tokens as bits into `row`, an int32 (ceil(vocab / 32),) tensor."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete (or failed: nothing more may follow)."""
        return bool(self.matcher.is_stopped() or self.matcher.is_error())


def mask_rows(logits: torch.Tensor, rows: list[tuple[int, Constraint]]) -> None:
    """Forbidden tokens of each constrained row of `logits` (B, V) to -inf, in place; model
    vocabulary entries past the tokenizer's (padding rows of the embedding) are forbidden."""
    width = (logits.shape[1] + 31) // 32
    bits = torch.zeros(len(rows), width, dtype=torch.int32)
    for j, (_, constraint) in enumerate(rows):
        constraint.fill(bits[j])
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bits[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, : logits.shape[1]]
    index = torch.tensor([i for i, _ in rows])
    logits[index] = logits[index].masked_fill(allowed == 0, float("-inf"))


class Grammars:
    """Compiles and checks grammars against one tokenizer; makes each choice's Constraint."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ll: Any = None
        self._lock = threading.Lock()

    def constraint(self, grammar: Grammar) -> Constraint:
        """A fresh matcher for `grammar`; a grammar that does not compile is INVALID_ARGUMENT."""
        compiled = _compile(grammar)
        ll = self._ll_tokenizer()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, ll)
        if failed:
            raise InvalidArgument(f"the {grammar.kind} cannot be enforced: {messages[0]}")
        matcher = llguidance.LLMatcher(ll, compiled, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"the {grammar.kind} cannot be enforced: {matcher.get_error()}")
        return Constraint(matcher)

    def prepare(self) -> None:
        """Build the llguidance view of the tokenizer now (0.5 s for SmolLM2's 49k tokens,
        seconds for 262k): the engine starts this in a thread, so the first constrained
        request does not block the event loop doing it."""
        with contextlib.suppress(InvalidArgument):  # said to each request asking for one
            self._ll_tokenizer()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                self._ll = _ll_tokenizer(self._tokenizer)
            if isinstance(self._ll, str):  # why this tokenizer cannot be constrained
                raise InvalidArgument(self._ll)
            return self._ll


def _ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's tokenizer, or the message saying why there is none (kept)."""
    try:
        return llguidance.hf.from_tokenizer(tokenizer)
    except (ValueError, AttributeError, TypeError) as exc:
        return (
            f"this model's tokenizer cannot be constrained ({exc}); structured output and "
            "tools need a byte-level BPE tokenizer (Llama, Qwen, SmolLM2 and most chat models)"
        )


def _compile(grammar: Grammar) -> str:
    if grammar.kind == "lark":
        return str(llguidance.LLMatcher.grammar_from_lark(grammar.source))
    if grammar.kind == "json_object":
        schema: Any = {"type": "object"}
    else:
        try:
            schema = json.loads(grammar.source)
        except ValueError as exc:
            raise InvalidArgument(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("the JSON schema must be a JSON object")
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"the JSON schema cannot be enforced: {exc}") from None
