"""Assemble the "Serving under pressure (issue 4)" section of RESULTS.md from the outputs of
residency.py, overload.py, degradation.py and failure.py (their workdirs under --root).

    python benchmarks/pressure_report.py --root /tmp/pressure > /tmp/pressure/section.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pressure as P

PARTS = (
    ("residency", "Residency under a memory budget: eviction policies"),
    ("overload", "Overload: 5x the sustainable rate, open loop"),
    ("degradation", "Degradation to a cheaper variant"),
    ("failure", "A failing runtime: breaker, fallback, recovery"),
)


def section(root: Path) -> str:
    facts = P.machine_facts()
    lines = [
        "## Serving under pressure (issue 4)",
        "",
        "Commands, in this order, one run each:",
        "",
    ]
    lines += ["```"] + [
        f".venv/bin/python benchmarks/{name}.py --workdir {root / name}" for name, _ in PARTS
    ]
    lines += [
        "```",
        "",
        "Machine (load average here at report time; each part's own is under it):",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    for name, title in PARTS:
        doc = json.loads((root / name / f"{name}.json").read_text())
        f = doc.get("facts", {})
        load = f"{f.get('loadavg', '?')} at the start, {f.get('loadavg_end', '?')} at the end"
        lines += ["", f"### {title}", "", f"(load average 1/5/15 min: {load})", ""]
        lines.append((root / name / f"{name}.md").read_text().rstrip())
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/pressure"))
    print(section(ap.parse_args().root), end="")


if __name__ == "__main__":
    main()
