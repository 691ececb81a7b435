"""Token ids to text deltas, incrementally, with stop strings held back until decided.

Decoding a token alone is wrong for multi-token characters and for tokenizers that merge
spaces, so each step decodes a short window (tokens since the last emitted boundary) and
keeps the part beyond what that window decoded to before; a window ending in an incomplete
UTF-8 character ("\ufffd") waits for the next token. Cost per token: two decodes of a few
tokens, whatever the length of the output.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """The text of one choice, emitted as deltas; stops at the first stop string."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1  # chars a stop may span
        self._ids: list[int] = []
        self._prefix = 0  # window start in _ids
        self._read = 0  # tokens already turned into text
        self.text = ""  # all text decoded so far (stop string cut off once found)
        self._emitted = 0  # characters of text handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text now safe to emit (possibly empty)."""
        if self._tokenizer is None or self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        start = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._take(self._find_stop(start))

    def flush(self) -> str:
        """The held-back rest, when the choice ends for another reason."""
        return self._take(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _find_stop(self, start: int) -> int:
        """Cut the text at a stop string if one is complete; return how far is safe."""
        if not self._stops:
            return len(self.text)
        begin = max(0, start - self._hold)
        hits = [i for i in (self.text.find(s, begin) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return len(self.text)
        return len(self.text) - self._hold

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
