"""`slimserve profile NAME [--variant V] --repository R`: sweep, write the profile, plot it."""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path
from typing import Any

from slimserve.bench.command import _positive_ints, _seconds
from slimserve.bench.profile import Grid, Point, Sweep, sweep
from slimserve.cli_parts import command
from slimserve.errors import InvalidArgument
from slimserve.repository.profiles import update_profile
from slimserve.repository.store import Repository, check_name


def _shares(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [-1.0]
    if any(not (0 < v <= 1) for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give shares of the best closed-loop throughput in (0, 1] separated by "
            "commas, e.g. 0.1,0.3,0.5 (an empty string: no open-loop points)"
        )
    return values


def _delays(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not (0 <= v <= 10_000) for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give milliseconds >= 0 separated by commas, e.g. 0,2"
        )
    return values


ABOUT = """measure a model or variant: throughput, p50/p99, memory over a sweep
Sweep client concurrency x max_batch_size x max_queue_delay_ms against a real `slimserve
serve` (one per batching configuration), write the results into the profile the server reads
(variant.yaml, or VERSION/profile.yaml for an original) and plot throughput against p99.
Time: configurations x (concurrencies + open-loop shares) x (duration + warmup), an open-loop
point running longer at a low rate (until about 1,000 requests, at most 5 x duration), plus a
server start per configuration.
"""


def register(subparsers: Any) -> None:
    d = Grid()
    p = command(subparsers, "profile", run, ABOUT)
    p.add_argument("name", help="model name in the repository")
    p.add_argument("--variant", default=None, help="variant to profile (default: the original)")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--model-version", type=int, default=None, help="version (default: latest)")
    # The sweep's axes: comma-separated values, defaults from Grid.
    for flag, parse, values, what in (
        ("--concurrency", _positive_ints, d.concurrency, "client concurrencies"),
        ("--max-batch-size", _positive_ints, d.max_batch_size, "batch size limits"),
        ("--queue-delay-ms", _delays, d.queue_delay_ms, "batching delays in ms"),
    ):
        shown = ",".join(f"{x:g}" for x in values)
        p.add_argument(flag, type=parse, default=list(values), help=f"{what} (default {shown})")
    shown = ",".join(f"{x:g}" for x in d.open_loop_shares)
    p.add_argument(
        "--open-loop-shares",
        type=_shares,
        default=list(d.open_loop_shares),
        help="open-loop (Poisson) points at these shares of the best closed-loop throughput, "
        f"per batching configuration: what `slimserve plan` fits the serving path on "
        f"(default {shown}; '' for none)",
    )
    for flag, least, seconds, what in (
        ("--duration", 0.1, d.duration_s, "measured seconds per point"),
        ("--warmup", 0.0, d.warmup_s, "seconds of load before each point"),
    ):
        parse_s = functools.partial(_seconds, minimum=least)
        p.add_argument(flag, type=parse_s, default=seconds, help=f"{what} (default {seconds:g})")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: under reports/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    check_name(args.name)
    if args.variant is not None:
        check_name(args.variant, "variant name")
    repo = Repository(args.repository)
    config = repo.config(args.name)
    grid = Grid(
        tuple(args.concurrency),
        tuple(args.max_batch_size),
        tuple(args.queue_delay_ms),
        args.duration,
        args.warmup,
        tuple(args.open_loop_shares),
    )
    with tqdm(
        total=grid.points(config), desc=f"profile {args.name}", disable=args.no_progress
    ) as bar:
        result = sweep(
            repo.root, args.name, args.model_version, args.variant, grid, lambda: bar.update()
        )
    version = int(result.target.split("/")[1].split(":")[0])
    path = update_profile(repo, args.name, version, args.variant, result.profile_fields(grid))
    plot = args.plot or (
        repo.model_dir(args.name)
        / "reports"
        / str(version)
        / f"profile-{args.variant or 'original'}.png"
    )
    write_plot(result, plot)
    print(format_table(result))
    print(f"profile written to {path}\nplot written to {plot}")
    bad = [p for p in [*result.points, *result.open_points] if p.errors or not p.throughput_rps]
    if bad:
        raise InvalidArgument(
            f"{len(bad)} point(s) had errors or no answers (see the table); the server log "
            "says why (e.g. a queue too small for the concurrency)"
        )
    return 0


def format_table(result: Sweep) -> str:
    lines = [
        f"{result.target}: memory {_mib(result.memory_bytes)}, server peak RSS "
        f"{_mib(result.peak_rss_bytes)}",
        f"{'batch':>6}{'delay ms':>9}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>7}",
    ]
    for p in result.points:
        lines.append(
            f"{p.max_batch_size:>6}{p.max_queue_delay_ms:>9g}{p.concurrency:>8}"
            f"{p.throughput_rps:>10.1f}{p.p50_ms:>9.2f}{p.p99_ms:>9.2f}{p.errors:>7}"
        )
    for o in result.open_points:
        lines.append(
            f"{o.max_batch_size:>6}{o.max_queue_delay_ms:>9g}{'open':>8}"
            f"{o.throughput_rps:>10.1f}{o.p50_ms:>9.2f}{o.p99_ms:>9.2f}{o.errors:>7}"
            f"  (Poisson at {o.rate_rps:g} req/s)"
        )
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "n/a" if not value else f"{value / 2**20:.1f} MiB"


def write_plot(result: Sweep, path: Path) -> None:
    """Throughput (x) against p99 (y), one line per batching configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[int, float], list[Point]] = {}
    for p in result.points:
        if not math.isnan(p.p99_ms):
            groups.setdefault((p.max_batch_size, p.max_queue_delay_ms), []).append(p)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (size, delay), points in sorted(groups.items()):
        points.sort(key=lambda q: q.concurrency)
        ax.plot(
            [q.throughput_rps for q in points],
            [q.p99_ms for q in points],
            marker="o",
            label=f"batch {size}, delay {delay:g} ms",
        )
        for q in points:
            ax.annotate(str(q.concurrency), (q.throughput_rps, q.p99_ms), fontsize=7)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"{result.target}: throughput vs p99 (labels: clients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
