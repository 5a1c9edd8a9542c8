"""Scoring cost: `token_statistics` vs verl's top-k processor on identical inputs, under each preset.

verl's FSDP top-k distillation processor (`verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk`)
takes one log-softmax over the student's logits, one top-k and two gathers. TA-OPD's scoring needs the
same pieces plus small `[N, k + Kt]` union arithmetic (float64), so its cost should match: the target is a
median time ratio <= 1.2 and a peak memory <= verl's, for the `paper` preset with the student entropy
supplied (verl's forward has computed it already) and for the `authors_code` preset (top-k entropy,
computed from the student's top-k). The `paper` variant that computes the full-vocabulary entropy itself
is measured as well. Each preset's settings are `ta_opd_verl.config.TAOPDConfig(preset=...)`'s.

Time: medians over repeats in one process, the functions interleaved in rotating order so that machine
noise hits them alike; the ratio is the median of the per-repeat ratios. CPU time (`time.process_time`,
all threads of the process) is recorded beside wall time: on a shared machine it is the steadier
measure of the work done, while wall time also counts waiting for cores. Memory: each function runs once
in a fresh Python process; the peak resident memory above the process's resident memory after the
inputs exist (Linux `VmHWM` after resetting it through `/proc/self/clear_refs`; `ru_maxrss` elsewhere,
which can hide a peak below the input-building one).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ta_opd_verl.bench.machine import machine_info
from ta_opd_verl.bench.peak_memory import peak_extra, print_result, run_child
from ta_opd_verl.config import TAOPDConfig
from ta_opd_verl.teachability import token_statistics

QWEN_VOCAB = 151_669
FUNCTIONS = ("verl", "paper", "paper_entropy", "authors_code")
LABELS = {
    "verl": "verl compute_forward_kl_topk",
    "paper": "paper preset (entropy given)",
    "paper_entropy": "paper preset (entropy computed)",
    "authors_code": "authors_code preset (top-k entropy)",
}
# The functions held to the target: the scoring each preset runs in training.
TARGETED = ("paper", "authors_code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--n", type=int, nargs="+", default=[2048, 8192], help="positions (rows) per case")
    sizes.add_argument("--v", type=int, default=QWEN_VOCAB, help="vocabulary size (Qwen: 151,669)")
    sizes.add_argument("--k", type=int, nargs="+", default=[16, 32], help="top-k support = teacher entries")
    run = parser.add_argument_group("run")
    run.add_argument("--repeats", type=int, default=5, help="timed calls per function and case")
    run.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--skip-memory", action="store_true", help="time only, no memory subprocesses")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for JSON, PNG, table")


def make_inputs(n: int, v: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Student logits and a teacher top-k list that half-overlaps the student's top-k.

    Built without `[n, v]` temporaries, so a process's resident memory after this call is its high-water
    mark up to then.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen).mul_(3.0)
    student_top = torch.topk(logits, k, dim=-1).indices
    random_ids = torch.randint(0, v, (n, k), generator=gen)
    teacher_ids = torch.where(torch.rand(n, k, generator=gen) < 0.5, student_top, random_ids)
    teacher_lp = (
        torch.log_softmax(torch.randn(n, k, generator=gen) * 2, dim=-1).sort(-1, descending=True).values
    )
    teacher_lp = teacher_lp + torch.log(torch.tensor(0.9))
    entropy = torch.rand(n, generator=gen) * 4
    return {"logits": logits, "teacher_ids": teacher_ids, "teacher_lp": teacher_lp, "entropy": entropy}


def make_function(name: str, inputs: dict[str, torch.Tensor], k: int):
    """A zero-argument callable running one function on `inputs` (its setup is done here, not timed)."""
    logits, ids, lps = inputs["logits"], inputs["teacher_ids"], inputs["teacher_lp"]
    if name == "verl":
        # verl takes seconds to import; only this function of the three needs it.
        from verl.trainer.distillation.fsdp.losses import compute_forward_kl_topk
        from verl.workers.config.distillation import DistillationConfig, DistillationLossConfig

        loss = DistillationLossConfig(loss_mode="forward_kl_topk", topk=k, use_policy_gradient=False)
        config = DistillationConfig(distillation_loss=loss)
        offsets = torch.tensor([0, logits.shape[0]])
        nested_lps = torch.nested.nested_tensor_from_jagged(lps, offsets)
        nested_ids = torch.nested.nested_tensor_from_jagged(ids, offsets)
        batched = logits.unsqueeze(0)
        return lambda: compute_forward_kl_topk(batched, nested_lps, nested_ids, config, "thd")
    if name not in FUNCTIONS:
        raise ValueError(f"unknown function {name!r}; known: {list(FUNCTIONS)}")
    options = TAOPDConfig(preset=name.removesuffix("_entropy"), k=k).scoring_options()
    # verl's forward computes the full-vocabulary entropy: training hands it to the scoring.
    entropy = inputs["entropy"] if name == "paper" else None
    return lambda: token_statistics(logits, ids, lps, **options, student_entropy=entropy)


def time_case(n: int, v: int, k: int, repeats: int, seed: int) -> dict:
    inputs = make_inputs(n, v, k, seed)
    functions = {name: make_function(name, inputs, k) for name in FUNCTIONS}
    for name, fn in functions.items():
        print(f"  warm-up {name}", flush=True)
        fn()
    times: dict[str, list[float]] = {name: [] for name in FUNCTIONS}
    cpu_times: dict[str, list[float]] = {name: [] for name in FUNCTIONS}
    for r in range(repeats):
        print(f"  N={n} V={v} K={k}: repeat {r + 1}/{repeats}", flush=True)
        order = FUNCTIONS[r % len(FUNCTIONS) :] + FUNCTIONS[: r % len(FUNCTIONS)]
        for name in order:
            cpu_start, start = time.process_time(), time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    del functions, inputs
    gc.collect()

    def paired_ratios(samples):
        return {
            name: statistics.median(t / base for t, base in zip(samples[name], samples["verl"], strict=True))
            for name in FUNCTIONS[1:]
        }

    return {
        "times_s": times,
        "cpu_times_s": cpu_times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "median_cpu_s": {name: statistics.median(t) for name, t in cpu_times.items()},
        "time_ratio": paired_ratios(times),
        "cpu_ratio": paired_ratios(cpu_times),
    }


def memory_child(name: str, n: int, v: int, k: int, seed: int, threads: int) -> None:
    """Runs in a fresh process (`peak_memory.run_child`): prints the peak memory of one call of `name`."""
    torch.set_num_threads(threads)
    inputs = make_inputs(n, v, k, seed)
    fn = make_function(name, inputs, k)
    # A call on a few rows loads lazy modules and thread pools, so the measured call pays none of that.
    small = {key: value[: min(8, n)] for key, value in inputs.items()}
    make_function(name, small, k)()
    del small
    inputs_mib = sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20
    print_result({**peak_extra(fn), "inputs_mib": inputs_mib})


def measure_memory(name: str, n: int, v: int, k: int, seed: int, threads: int) -> dict:
    return run_child(__name__, "memory_child", name, n, v, k, seed, threads)


def _mib(memory: dict, name: str) -> str:
    return f"{memory[name]:.0f}" if name in memory else "n/a"


def markdown_table(cases: list[dict]) -> str:
    """One row per case and function; ratios are the function over verl (median of per-repeat ratios),
    memory in MiB above the inputs. The target applies to the `TARGETED` functions."""
    lines = [
        "| N | V | K | scoring | wall (s) | wall ratio | CPU ratio | peak (MiB) | target met |",
        "|---:|---:|---:|---|---:|---:|---:|---:|:---:|",
    ]
    for case in cases:
        median, ratio, cpu = case["median_s"], case["time_ratio"], case["cpu_ratio"]
        memory = case.get("peak_extra_mib", {})
        for name in FUNCTIONS:
            shape = f"| {case['n']} | {case['v']} | {case['k']} | {LABELS[name]} | {median[name]:.3f} "
            if name == "verl":
                lines.append(shape + f"| 1 | 1 | {_mib(memory, name)} | |")
                continue
            met = ""
            if name in TARGETED:
                met = "yes" if ratio[name] <= 1.2 and (not memory or memory[name] <= memory["verl"]) else "no"
            lines.append(shape + f"| {ratio[name]:.2f} | {cpu[name]:.2f} | {_mib(memory, name)} | {met} |")
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"N={c['n']}\nK={c['k']}" for c in cases]
    panels = [("median_s", "median wall time (s)"), ("median_cpu_s", "median CPU time (s)")]
    if all("peak_extra_mib" in c for c in cases):
        panels.append(("peak_extra_mib", "peak memory above inputs (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    width = 0.8 / len(FUNCTIONS)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for i, name in enumerate(FUNCTIONS):
            xs = [j + (i - (len(FUNCTIONS) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, [c[key][name] for c in cases], width, label=LABELS[name])
        ax.set_xticks(range(len(cases)), labels)
        ax.set_title(title)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"TA-OPD scoring vs verl top-k processor (V={cases[0]['v']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for n in args.n:
        for k in args.k:
            print(f"case N={n} V={args.v} K={k}: timing", flush=True)
            case = {"n": n, "v": args.v, "k": k, **time_case(n, args.v, k, args.repeats, args.seed)}
            if not args.skip_memory:
                case["peak_extra_mib"] = {}
                for name in FUNCTIONS:
                    print(f"case N={n} V={args.v} K={k}: peak memory of {name} (fresh process)", flush=True)
                    measured = measure_memory(name, n, args.v, k, args.seed, args.threads)
                    case["peak_extra_mib"][name] = measured["peak_extra_mib"]
                    case["inputs_mib"], case["memory_method"] = measured["inputs_mib"], measured["method"]
            cases.append(case)
    result = {
        "command": " ".join([Path(sys.executable).name, "-m", "ta_opd_verl.bench", *sys.argv[1:]]),
        "machine": machine_info(args.threads, ("torch", "verl")),
        "repeats": args.repeats,
        "cases": cases,
    }
    table = markdown_table(cases)
    (args.out / "scoring.json").write_text(json.dumps(result, indent=2))
    (args.out / "scoring.md").write_text(table + "\n")
    plot(cases, args.out / "scoring.png")
    print(table)
    print(f"wrote {args.out / 'scoring.json'}, {args.out / 'scoring.md'}, {args.out / 'scoring.png'}")
    return result
