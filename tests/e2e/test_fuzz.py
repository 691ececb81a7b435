"""schemathesis against a real `slimserve serve` process, from the OpenAPI document the server
publishes (GET /v2/openapi.json).

Every operation is called with generated requests (valid and invalid bodies, path parameters
and headers, seeded with the document's examples) and each answer is checked: no 5xx, a
status the document lists, the documented content type, and a body matching its schema.
Bounded for CI (FUZZ_EXAMPLES per operation); `benchmarks/fuzz.py` runs the long version.
The server runs without --model-control, so load and unload are fuzzed on their refusal path
and the model under test is never unloaded mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from slimserve.transport.openapi import build_openapi
from tests.e2e.conftest import Repo, ServerProcess, start_server, stop_server

pytestmark = pytest.mark.timeout(180)

FUZZ_EXAMPLES = int(os.environ.get("SLIMSERVE_FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
schema = schemathesis.openapi.from_dict(build_openapi())
CALLS: Counter[tuple[str, int]] = Counter()  # (operation, status) -> calls, for the report


@pytest.fixture(scope="module")
def fuzz_server(model_repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz") / "models"
    shutil.copytree(model_repo.root, root, ignore=shutil.ignore_patterns("broken"))
    server: ServerProcess = start_server(root, root.parent / "server.log")
    yield f"http://{server.http_url}"
    print(f"\nschemathesis: {sum(CALLS.values())} calls, statuses {_statuses()}")
    assert server.alive(), server.log()
    stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def test_the_server_publishes_its_openapi_document(fuzz_server):
    with urllib.request.urlopen(f"{fuzz_server}/v2/openapi.json", timeout=10) as resp:
        assert resp.headers["content-type"] == "application/json"
        doc = json.loads(resp.read())
    assert doc == json.loads(json.dumps(build_openapi()))
    assert "/v2/models/{model}/infer" in doc["paths"]


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, fuzz_server):
    response = case.call_and_validate(base_url=fuzz_server, checks=CHECKS, timeout=30)
    CALLS[(case.operation.label, response.status_code)] += 1


def _statuses() -> dict[int, int]:
    out: Counter[int] = Counter()
    for (_, status), n in CALLS.items():
        out[status] += n
    return dict(sorted(out.items()))
