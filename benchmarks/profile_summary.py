"""Summarize a py-spy raw (collapsed) profile: where the server's CPU time goes.

    py-spy record --pid PID --duration 8 --rate 250 --threads --nonblocking --format raw -o p.txt
    python benchmarks/profile_summary.py p.txt

Reports samples per thread, self and inclusive time per code area (a slimserve module, or
another package), and the top leaf functions. py-spy samples only threads that are running
(not idle), so shares are of the server's busy CPU time.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# Frames on every stack of the main thread (process start, the event loop's run): they say
# nothing about where time goes, so the inclusive table leaves them out.
_OUTER = {
    "<frozen runpy>",
    "slimserve/__main__.py",
    "slimserve/cli.py",
    "slimserve/app.py",
    "uvloop",
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _area(path: str) -> str:
    """py-spy shortens paths to 'package/module.py': slimserve files stay whole, other code is
    grouped by its top-level package or stdlib module."""
    path = path.split("site-packages/", 1)[-1]
    if path.startswith("slimserve/"):
        return path
    return path.split("/", 1)[0] or "?"


def parse(text: str) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str], int]:
    threads: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread (")), "thread (?)")
        code = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not code:
            continue
        match = _FRAME.match(code[-1])
        func, path = (match["func"], match["file"]) if match else (code[-1], "?")
        total += count
        for area in {_area(m["file"]) for m in map(_FRAME.match, code) if m}:
            inclusive[area] += count
        threads[thread.split(": ", 1)[-1]] += count
        areas[_area(path)] += count
        leaves[f"{func} ({_area(path)})"] += count
    return threads, areas, inclusive, leaves, total


def summarize(text: str, top: int = 12) -> str:
    threads, areas, inclusive, leaves, total = parse(text)
    if not total:
        return "(no samples)"
    lines = [f"{total} busy samples", "", "| thread | share of busy samples |", "|---|---:|"]
    lines += [f"| {t} | {n / total:.0%} |" for t, n in threads.most_common(6)]
    lines += ["", "| code area (leaf frame) | self time |", "|---|---:|"]
    lines += [f"| {a} | {n / total:.1%} |" for a, n in areas.most_common(top)]
    lines += ["", "| code area (anywhere on the stack) | inclusive time |", "|---|---:|"]
    shown = [(a, n) for a, n in inclusive.most_common() if a not in _OUTER][:top]
    lines += [f"| {a} | {n / total:.1%} |" for a, n in shown]
    lines += ["", "| leaf function | self time |", "|---|---:|"]
    lines += [f"| {f} | {n / total:.1%} |" for f, n in leaves.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]).read_text()))
