"""The long fuzzing run behind RESULTS.md ("Security and fuzzing"): the same tests as CI with
many more examples.

    .venv/bin/python benchmarks/fuzz.py --examples 3000 --api-examples 300

1. hypothesis drives the HTTP JSON/binary decoder and gRPC ModelInferRequest decoding
   directly (tests/transport/test_fuzz_codecs.py), `--examples` cases per test;
2. schemathesis drives a real `slimserve serve` process from its OpenAPI document
   (tests/e2e/test_fuzz.py), `--api-examples` cases per operation plus its coverage phase.

Prints and writes to benchmarks/results/fuzz.json the cases run, the HTTP statuses seen and
the outcome (failures, 5xx, crashes). Each part runs in its own pytest process, whose
timeout turns a hang into a failure.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSING = re.compile(r"(\d+) passing, (\d+) failing")
CALLS = re.compile(r"schemathesis: (\d+) calls, statuses (\{.*\})")
SUMMARY = re.compile(r"(\d+) (passed|failed|error)")


def run_pytest(target: str, examples: int) -> tuple[str, float, int]:
    env = {**os.environ, "SLIMSERVE_FUZZ_EXAMPLES": str(examples), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        target,
        "--hypothesis-show-statistics",
        "-o",
        "timeout=3000",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr, time.monotonic() - start, proc.returncode


def summary(text: str) -> dict[str, int]:
    return {kind: int(n) for n, kind in SUMMARY.findall(text.splitlines()[-1] if text else "")}


def codecs_part(examples: int) -> dict[str, object]:
    out, seconds, rc = run_pytest("tests/transport/test_fuzz_codecs.py", examples)
    passing = sum(int(p) for p, _ in PASSING.findall(out))
    failing = sum(int(f) for _, f in PASSING.findall(out))
    return {
        "examples_per_test": examples,
        "cases": passing + failing,
        "failing": failing,
        "tests": summary(out),
        "seconds": round(seconds, 1),
        "exit": rc,
    }


def api_part(examples: int) -> dict[str, object]:
    out, seconds, rc = run_pytest("tests/e2e/test_fuzz.py", examples)
    found = CALLS.search(out)
    calls = int(found.group(1)) if found else 0
    statuses = ast.literal_eval(found.group(2)) if found else {}
    statuses = {str(k): v for k, v in statuses.items()}
    server_errors = sum(v for k, v in statuses.items() if k.startswith("5"))
    return {
        "examples_per_operation": examples,
        "calls": calls,
        "statuses": statuses,
        "server_errors": server_errors,
        "tests": summary(out),
        "seconds": round(seconds, 1),
        "exit": rc,
    }


def machine() -> dict[str, object]:
    import hypothesis
    import schemathesis

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "hypothesis": hypothesis.__version__,
        "schemathesis": schemathesis.__version__,
        "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="hypothesis cases per test")
    parser.add_argument(
        "--api-examples", type=int, default=300, help="schemathesis cases per operation"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz.json")
    args = parser.parse_args()
    result = {
        "machine": machine(),
        "codecs": codecs_part(args.examples),
        "api": api_part(args.api_examples),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["codecs"]["exit"] == 0 and result["api"]["exit"] == 0  # type: ignore[index]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
