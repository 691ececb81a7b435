"""Text deltas from token ids: they add up to the decoded text; stop strings are cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.runtimes.llm.detok import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)


TEXT = "the quick brown fox jumps over the lazy dog near the riverbank"


def test_deltas_add_up_to_the_decoded_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tokenizer.decode(ids) == TEXT


def test_a_stop_string_spanning_tokens_is_held_back_and_cut(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stops=("lazy dog",))
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    assert "".join(deltas) + stream.flush() == "the quick brown fox jumps over the "
    assert not any("lazy" in d for d in deltas)


def test_without_a_tokenizer_there_is_no_text() -> None:
    stream = TextStream(None)
    assert stream.push(5) == "" and stream.flush() == ""
