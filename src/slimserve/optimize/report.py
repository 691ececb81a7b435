"""The per-model report: report.md, report.json and report.png (size and latency vs quality).

Quality is accuracy on labelled data where known, else agreement with the original. The Pareto
front of each panel holds the variants no other variant beats on both cost and quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

_COLUMNS = (
    ("size_bytes", "size (KiB)", 1 / 1024),
    ("latency_ms_batch1", "p50 b1 (ms)", 1.0),
    ("latency_ms_best", "p50 best (ms)", 1.0),
    ("throughput_rps", "rows/s", 1.0),
    ("accuracy", "accuracy", 1.0),
    ("agreement", "agreement", 1.0),
    ("max_abs_error", "max |err|", 1.0),
)


def quality(profile: dict[str, Any]) -> float | None:
    value = profile.get("accuracy")
    chosen = profile.get("agreement", 1.0) if value is None else value
    return None if chosen is None else float(chosen)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (cost, quality) not dominated: no other is cheaper-or-equal AND
    better-or-equal with one strictly so."""
    front = []
    for i, (c, q) in enumerate(points):
        dominated = any(
            (c2 <= c and q2 >= q) and (c2 < c or q2 > q)
            for j, (c2, q2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _rows(result: Any) -> list[dict[str, Any]]:
    rows = [{"name": "(original)", "recipe": "", "profile": result.original}]
    return rows + list(result.variants) + list(getattr(result, "earlier", []))


def earlier_variants(variants_dir: Path, skip: set[str]) -> list[dict[str, Any]]:
    """Profiles of the version's other variants, from their variant.yaml (made by earlier runs
    or by hand; ones without a readable profile are left out)."""
    rows = []
    for folder in sorted(p for p in variants_dir.iterdir() if p.is_dir()):
        if folder.name in skip or folder.name.startswith("."):
            continue
        try:
            doc = yaml.safe_load((folder / "variant.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("profile"), dict):
            recipe = doc.get("recipe") or {}
            text = recipe.get("text", "") if isinstance(recipe, dict) else str(recipe)
            rows.append(
                {
                    "name": folder.name,
                    "recipe": text,
                    "profile": doc["profile"],
                    "earlier": True,
                    "seed": doc.get("seed"),
                    "baseline": doc.get("baseline") or {},
                }
            )
    return rows


def _fmt(value: Any, factor: float) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        v = value * factor
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return str(value)


def markdown(result: Any) -> str:
    rows = _rows(result)
    machine = result.original.get("machine", {})
    extra = ["seed", "baseline accuracy", "accuracy vs baseline (points)", "smaller than baseline"]
    head = "| variant | recipe | " + " | ".join([c[1] for c in _COLUMNS] + extra) + " |"
    lines = [
        f"# {result.model} version {result.version}: variants",
        "",
        f"Measured on {machine.get('cpu', '?')}, {machine.get('threads', '?')} threads, "
        f"flags {', '.join(machine.get('cpu_flags', []))}; load average "
        f"{machine.get('load_average', '?')}; versions {machine.get('versions', {})}.",
        "",
        head,
        "|" + "---|" * (len(_COLUMNS) + 6),
    ]
    for row in rows:
        p = row["profile"]
        cells = [_fmt(p.get(key), f) for key, _, f in _COLUMNS]
        if p.get("accuracy", 0) is None:
            cells[_ACCURACY] = "not measured"
        cells += _against_baseline(row, result.original)
        lines.append(f"| {row['name']} | `{row['recipe']}` | " + " | ".join(cells) + " |")
    if _synthetic(rows):
        lines += ["", _SYNTHETIC_NOTE]
    lines += ["", "![size and latency against quality](report.png)", ""]
    return "\n".join(lines)


_ACCURACY = [key for key, _, _ in _COLUMNS].index("accuracy")
_SYNTHETIC_NOTE = (
    "No --data: latency and size were measured on inputs made from model.yaml's shapes and "
    "dtypes, agreement against the original on the same inputs; accuracy was not measured."
)


def _synthetic(rows: list[dict[str, Any]]) -> bool:
    return any(r["profile"].get("data") == "synthetic" for r in rows)


def _against_baseline(row: dict[str, Any], original: dict[str, Any]) -> list[str]:
    """seed, the baseline's accuracy, accuracy change (points) and size ratio against it."""
    if row["name"] == "(original)":
        return ["", "", "", ""]
    base = row.get("baseline") or original
    p = row["profile"]
    acc, base_acc = p.get("accuracy"), base.get("accuracy")
    delta = "-" if acc is None or base_acc is None else f"{100 * (acc - base_acc):+.2f}"
    size, base_size = p.get("size_bytes"), base.get("size_bytes")
    ratio = f"{base_size / size:.1f}x" if size and base_size else "-"
    seed = row.get("seed")
    return ["-" if seed is None else str(seed), _fmt(base_acc, 1.0), delta, ratio]


def plot(result: Any, path: Path) -> bool:
    """Draw report.png; without matplotlib, warn on stderr and return False."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print(
            "warning: report.png skipped: matplotlib is not installed; "
            "pip install 'slimserve[optimize]'",
            file=sys.stderr,
        )
        return False

    rows = _rows(result)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("size_bytes", "size on disk (KiB)", 1 / 1024),
        ("latency_ms_batch1", "p50 latency, batch 1 (ms)", 1.0),
    )
    for ax, (key, label, factor) in zip(axes, panels, strict=True):
        raw = [(r["profile"].get(key), quality(r["profile"]), r["name"]) for r in rows]
        pts = [(c * factor, q, n) for c, q, n in raw if c is not None and q is not None]
        front = sorted(pareto_front([(c, q) for c, q, _ in pts]), key=lambda i: pts[i][0])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=2)
        ax.plot(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            "o--",
            color="tab:red",
            label="Pareto front",
            zorder=3,
            mfc="none",
            ms=11,
        )
        for c, q, n in pts:
            ax.annotate(n, (c, q), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("quality (accuracy, else agreement)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result.model} v{result.version}: cost against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(result: Any, folder: Path) -> dict[str, Path]:
    """Write report.md, report.json, report.png into `folder`; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": folder / "report.md",
        "json": folder / "report.json",
        "plot": folder / "report.png",
    }
    data = {
        "model": result.model,
        "version": result.version,
        "original": result.original,
        "variants": result.variants,
        "earlier_variants": getattr(result, "earlier", []),
    }
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(result))
    if not plot(result, paths["plot"]):
        del paths["plot"]
    return paths
