"""Worker for test_split_teacher_cli.py: `slimserve optimize ARGV...` (slimserve.cli.main, as
`python -m slimserve` runs it), recording this process's peak resident-memory growth over it.

    torchrun --nproc_per_node=2 cli_memory_worker.py OUT_DIR optimize NAME ... --parallel pp=2

Growth as in lazy_teacher_worker.py (VmHWM after minus VmRSS before, the high-water mark reset
just before); the modules the command imports (matplotlib for the report's plot included) are
imported first, so they are not counted.
Writes OUT_DIR/rank{RANK}.json: {"growth": bytes, "code": exit code}.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata  # noqa: F401 - the report reads library versions with it
from pathlib import Path

# Imported before the measure starts: the code, not the data, of what the command runs
# (matplotlib draws the report's plot).
import matplotlib.pyplot  # noqa: F401
from lazy_teacher_worker import status_bytes

import slimserve.optimize.pipeline
import slimserve.optimize.steps_train  # noqa: F401
from slimserve.cli import main


def run(out: Path, argv: list[str]) -> int:
    Path("/proc/self/clear_refs").write_text("5")
    before = status_bytes("VmRSS")
    code = main(argv)
    growth = status_bytes("VmHWM") - before
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps({"growth": growth, "code": code}))
    return code


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
