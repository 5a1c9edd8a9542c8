"""`bench cpu-share`: which processes use the CPU while a verl run trains (a CPU run's profile).

verl's own `timing_s/*` metrics say which phase of a step is slow; on a 2-core machine the phases share
the cores with a dozen Ray actors and two vLLM engines, so this says who spends the CPU. It reads every
process's CPU time (user + system, `psutil`) at the start and end of a window and reports each group's
share of one core over the window. Processes are grouped by their title (Ray names an actor's process
``ray::<Actor>``, vLLM its ``VLLM::EngineCore`` and ``VLLM::Worker``); a vLLM process is labelled with the
Ray actor above it, so the student's engine and the teacher's stay apart.

    ta-opd demo --out outputs/demo &
    python -m ta_opd_verl.bench cpu-share --metrics outputs/demo/metrics.jsonl --after-steps 5 --seconds 45

Writes ``cpu_share.json`` (the shares and the machine) and ``cpu_share.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import psutil

from ta_opd_verl.bench.machine import machine_info

TITLE_WIDTH = 60


def process_label(cmdline: list[str], ancestor_cmdlines: list[list[str]]) -> str:
    """The group of a process: its title (a Ray or vLLM process title, else its command line, shortened);
    a vLLM process gets the nearest Ray actor above it, e.g. ``VLLM::Worker < ray::vLLMHttpServer``."""
    title = " ".join(cmdline).strip()[:TITLE_WIDTH] or "?"
    if title.startswith("VLLM::"):
        title = title.split()[0]
        for ancestor in ancestor_cmdlines:
            if ancestor and ancestor[0].startswith("ray::"):
                return f"{title} < {ancestor[0].split('.')[0]}"
    elif title.startswith("ray::"):
        # Ray appends the running method (ray::Actor.method) while a call runs: one group per actor.
        title = title.split()[0].split(".")[0]
    return title


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float):
    """Each label's CPU seconds over the window (processes that started inside it count from 0, those that
    ended inside it are lost) divided by ``wall``: a share of one core, largest first."""
    if wall <= 0:
        raise ValueError(f"the window must be positive, got {wall}s")
    used: Counter[str] = Counter()
    for pid, (label, seconds) in after.items():
        start = before[pid][1] if pid in before and before[pid][0] == label else 0.0
        used[label] += max(0.0, seconds - start)
    return [(label, seconds / wall) for label, seconds in used.most_common()]


def snapshot() -> dict[int, tuple[str, float]]:
    """Every readable process: pid -> (label, CPU seconds so far)."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or [process.name()]
            ancestors = []
            if cmdline[0].startswith("VLLM::"):
                ancestors = [parent.cmdline() for parent in process.parents()]
            times = process.cpu_times()
            found[process.pid] = (process_label(cmdline, ancestors), times.user + times.system)
        except (psutil.Error, IndexError):
            continue
    return found


def logged_lines(metrics: Path | None) -> int | None:
    """Lines verl's file logger has written to ``metrics`` (0 before the file exists; None without one)."""
    if metrics is None:
        return None
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def wait_for_steps(metrics: Path, steps: int, poll: float = 2.0) -> None:
    """Until verl's file logger has written ``steps`` lines (validation at step 0 is one of them)."""
    while logged_lines(metrics) < steps:
        time.sleep(poll)


def measure(seconds: float) -> tuple[list[tuple[str, float]], float]:
    before, started = snapshot(), time.monotonic()
    time.sleep(seconds)
    after, wall = snapshot(), time.monotonic() - started
    return cpu_shares(before, after, wall), wall


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=45.0, help="length of the window (default 45)")
    parser.add_argument(
        "--metrics", type=Path, help="a run's metrics.jsonl: start the window once it has --after-steps lines"
    )
    parser.add_argument(
        "--after-steps", type=int, default=5, help="lines of --metrics to wait for (default 5)"
    )
    parser.add_argument("--top", type=int, default=20, help="groups printed (default 20)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/cpu_share"), help="output folder")


def run(args: argparse.Namespace) -> None:
    if args.metrics is not None:
        print(f"[bench cpu-share] waiting for {args.after_steps} lines in {args.metrics}", flush=True)
        wait_for_steps(args.metrics, args.after_steps)
    steps_before = logged_lines(args.metrics)
    print(f"[bench cpu-share] sampling for {args.seconds:.0f}s", flush=True)
    shares, wall = measure(args.seconds)
    steps_after = logged_lines(args.metrics)
    cores = psutil.cpu_count()
    used = sum(share for _, share in shares)
    print(f"window {wall:.0f}s: {used:.2f} of {cores} cores used; share of one core by process group:")
    for label, share in shares[: args.top]:
        print(f"  {100 * share:6.1f}%  {label}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine_info(threads=None, packages=("psutil",)),
        "window_seconds": wall,
        "metrics_lines": [steps_before, steps_after],
        "cores_used": used,
        "shares_of_one_core": dict(shares),
    }
    (args.out / "cpu_share.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_shares(shares[: args.top], wall, args.out / "cpu_share.png")
    print(f"[bench cpu-share] wrote {args.out / 'cpu_share.json'} and cpu_share.png")


def plot_shares(shares: list[tuple[str, float]], wall: float, path: Path) -> None:
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 0.35 * len(shares) + 1.2))
    labels = [label for label, _ in reversed(shares)]
    axis.barh(labels, [100 * share for _, share in reversed(shares)], color="tab:blue")
    axis.set(xlabel="% of one core", title=f"CPU by process group over {wall:.0f}s")
    axis.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
