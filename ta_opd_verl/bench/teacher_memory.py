"""Teacher memory: the colocated teacher's scoring and the OPD losses at V = 151,936, with the teacher's
output layer in row blocks (the code path) against the unblocked computation, side by side in one run.

Per N (tokens of one micro-batch), on the inputs `make_inputs` builds (a shrunken real-vocabulary teacher:
its final hidden states ``[N, H]`` and its output layer ``[V, H]``):
- ``scoring``: what the colocated teacher adds to the scoring forward, `teachability.teacher_entries` (its
  top-K, its log-probs at the student's top-k and at the sampled token): from the hidden states block by
  block (`teacher_head.head_log_prob_blocks`), or unblocked: the ``[N, V]`` logits of the micro-batch
  first, as the teacher's Hugging Face forward returned them before, then the same blocked log-softmax;
- each loss's forward and backward in the student's logits at the selected positions (ρ of N):
  ``reverse_kl_topk``, ``reverse_kl_topk_tail`` (from the teacher's top-K rows), ``reverse_kl_full`` from
  the teacher's hidden states at those rows block by block (`opd_loss.reverse_kl_full_from_blocks`), and
  unblocked: the teacher's ``[N, V]`` logits first, then a plain autograd KL at the selected rows.
The student's side of the scoring (`token_statistics`) is `python -m ta_opd_verl.bench scoring`'s.

Time: after a warm-up call on 8 rows, the functions of one N run interleaved in rotating order, and a
ratio is the median of the per-repeat ratios blocked / unblocked, so a burst of load on the shared machine
hits both sides. Memory: each function runs once in a fresh process (`ta_opd_verl.bench.peak_memory`: the
kernel's peak resident size above the resident size once the inputs exist). A loss's figure includes the
gradient of the student's selected logits (``n × V`` float32, what any implementation returns); the table
also gives the rest in blocks of the code path's size (``min(rows, 441)`` rows at V = 151,936, about 256
MiB): a constant number of blocks is memory flat in N. Unblocked functions run only where their ``[N, V]``
float32 logits fit in ``--unblocked-max-gib``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ta_opd_verl.bench.machine import machine_info
from ta_opd_verl.bench.peak_memory import peak_extra, print_result, run_child
from ta_opd_verl.opd_loss import (
    reverse_kl_full_from_blocks,
    reverse_kl_on_teacher_support,
    reverse_kl_topk_tail,
)
from ta_opd_verl.teachability import teacher_entries
from ta_opd_verl.teacher_head import head_log_prob_blocks, logit_log_prob_blocks, rows_per_block

# Qwen2.5 / Qwen3 output layers: 151,669 tokens padded to 151,936 rows.
QWEN_OUTPUT_ROWS = 151_936
# name: (label, the unblocked function it is compared with, or None)
FUNCTIONS = {
    "scoring": ("colocated teacher's scoring, blocked", "scoring_unblocked"),
    "scoring_unblocked": ("colocated teacher's scoring, [N, V] logits first", None),
    "reverse_kl_topk": ("loss reverse_kl_topk", None),
    "reverse_kl_topk_tail": ("loss reverse_kl_topk_tail", None),
    "reverse_kl_full": ("loss reverse_kl_full, blocked", "reverse_kl_full_unblocked"),
    "reverse_kl_full_unblocked": ("loss reverse_kl_full, [N, V] logits first", None),
}
UNBLOCKED = tuple(name for name in FUNCTIONS if name.endswith("_unblocked"))
LOSSES = tuple(name for name in FUNCTIONS if name.startswith("reverse_kl"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 32768], help="tokens per micro-batch")
    sizes.add_argument("--v", type=int, default=QWEN_OUTPUT_ROWS, help="output rows = vocabulary (151,936)")
    sizes.add_argument("--hidden", type=int, default=64, help="hidden size of the shrunken teacher")
    sizes.add_argument("--k", type=int, default=16, help="the student's top-k (exact C's gathers)")
    sizes.add_argument("--topk", type=int, default=32, help="teacher entries per position")
    sizes.add_argument("--ratio", type=float, default=0.05, help="share of positions the losses train on")
    run = parser.add_argument_group("run")
    run.add_argument("--repeats", type=int, default=3, help="timed calls per function and N")
    run.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--unblocked-max-gib",
        type=float,
        default=6.0,
        help="run the unblocked functions up to [N, V] logits of",
    )
    run.add_argument("--skip-memory", action="store_true", help="time only, no memory subprocesses")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for JSON and table")


def make_inputs(n: int, v: int, hidden: int, k: int, topk: int, ratio: float, seed: int) -> dict:
    """The teacher's final hidden states and output layer (logits of standard deviation about 3), the
    student's top-k ids and sampled tokens, the selected rows with the student's logits there and the
    teacher's top-K rows there. Built without ``[N, V]`` temporaries."""
    generator = torch.Generator().manual_seed(seed)
    selected = max(1, math.ceil(ratio * n))
    inputs = {
        "hidden": torch.randn(n, hidden, generator=generator),
        "weight": torch.randn(v, hidden, generator=generator).mul_(3.0 / math.sqrt(hidden)),
        "student_topk_ids": torch.randint(0, v, (n, k), generator=generator),
        "sampled_ids": torch.randint(0, v, (n,), generator=generator),
        "rows": torch.randperm(n, generator=generator)[:selected].sort().values,
        "student_rows": torch.randn(selected, v, generator=generator).mul_(3.0),
    }
    top_ids, top_logprobs, _, _ = teacher_entries(
        head_log_prob_blocks(inputs["hidden"][inputs["rows"]], inputs["weight"], vocab=v, block_rows=64),
        inputs["student_topk_ids"][inputs["rows"]],
        inputs["sampled_ids"][inputs["rows"]],
        topk,
    )
    return inputs | {"top_ids": top_ids, "top_logprobs": top_logprobs}


def make_function(name: str, inputs: dict, topk: int) -> Callable[[], object]:
    """A zero-argument callable running ``name`` on ``inputs`` (a loss: forward and backward)."""
    hidden, weight, rows = inputs["hidden"], inputs["weight"], inputs["rows"]
    vocab = weight.shape[0]
    block_rows = rows_per_block(vocab)
    if name.startswith("scoring"):

        def blocks():
            if name == "scoring":
                return head_log_prob_blocks(hidden, weight, vocab=vocab, block_rows=block_rows)
            return logit_log_prob_blocks(
                torch.nn.functional.linear(hidden, weight), vocab=vocab, block_rows=block_rows
            )

        return lambda: teacher_entries(blocks(), inputs["student_topk_ids"], inputs["sampled_ids"], topk)
    if name not in FUNCTIONS:
        raise ValueError(f"unknown function {name!r}; known: {list(FUNCTIONS)}")
    student = inputs["student_rows"].requires_grad_(True)
    top_ids, top_logprobs = inputs["top_ids"], inputs["top_logprobs"]

    def loss() -> torch.Tensor:
        if name == "reverse_kl_topk":
            return reverse_kl_on_teacher_support(student, top_ids, top_logprobs)
        if name == "reverse_kl_topk_tail":
            return reverse_kl_topk_tail(student, top_ids, top_logprobs)
        if name == "reverse_kl_full":
            blocks = head_log_prob_blocks(hidden[rows], weight, vocab=vocab, block_rows=block_rows)
            return reverse_kl_full_from_blocks(student, blocks)
        teacher = torch.log_softmax(torch.nn.functional.linear(hidden, weight)[rows], dim=-1)
        log_p = torch.log_softmax(student, dim=-1)
        return (log_p.exp() * (log_p - teacher)).sum(-1)

    def forward_backward() -> None:
        student.grad = None
        loss().sum().backward()

    return forward_backward


def fits_unblocked(n: int, v: int, max_gib: float) -> bool:
    return n * v * 4 <= max_gib * 2**30


def functions_for(n: int, args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(
        name
        for name in FUNCTIONS
        if name not in UNBLOCKED or fits_unblocked(n, args.v, args.unblocked_max_gib)
    )


def _inputs(n: int, args: argparse.Namespace) -> dict:
    return make_inputs(n, args.v, args.hidden, args.k, args.topk, args.ratio, args.seed)


def time_case(n: int, args: argparse.Namespace) -> dict:
    names = functions_for(n, args)
    warm = _inputs(8, args)
    for name in names:
        make_function(name, warm, args.topk)()
    inputs = _inputs(n, args)
    functions = {name: make_function(name, inputs, args.topk) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        print(f"  N={n}: repeat {repeat + 1}/{args.repeats}", flush=True)
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    ratios = {
        name: statistics.median(t / u for t, u in zip(times[name], times[FUNCTIONS[name][1]], strict=True))
        for name in names
        if FUNCTIONS[name][1] in names
    }
    return {
        "times_s": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "time_ratio": ratios,
        "selected_rows": int(inputs["rows"].numel()),
    }


def memory_child(name: str, n: int, settings: dict) -> None:
    """Runs in a fresh process (`peak_memory.run_child`): prints the peak memory of one call of ``name``."""
    args = argparse.Namespace(**settings)
    torch.set_num_threads(args.threads)
    make_function(name, _inputs(8, args), args.topk)()  # lazy modules and thread pools
    call = make_function(name, _inputs(n, args), args.topk)
    print_result(peak_extra(call))


def _rows(case: dict, name: str) -> int:
    """Rows of the vocabulary-wide work: the micro-batch's tokens (scoring) or the selection (a loss)."""
    return case["selected_rows"] if name in LOSSES else case["n"]


def beyond_gradient_in_blocks(case: dict, name: str, v: int) -> float:
    """A function's peak extra memory less the gradient of the student's selected logits, in blocks of
    ``min(rows, rows_per_block(v))`` float32 rows over ``v`` ids (the block size of the code path)."""
    gradient = case["selected_rows"] * v * 4 if name in LOSSES else 0
    block = min(_rows(case, name), rows_per_block(v)) * v * 4
    return (case["peak_extra_mib"][name] * 2**20 - gradient) / block


def markdown_table(cases: list[dict], v: int) -> str:
    lines = [
        "| N | selected | function | median wall (s) | time / unblocked | peak extra (MiB) | "
        "of it: gradient (MiB) | the rest, in blocks | memory / unblocked |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        memory = case.get("peak_extra_mib", {})
        for name, seconds in case["median_s"].items():
            unblocked = FUNCTIONS[name][1]
            ratio = f"{case['time_ratio'][name]:.2f}" if name in case["time_ratio"] else ""
            peak = f"{memory[name]:.0f}" if name in memory else "n/a"
            blocks = f"{beyond_gradient_in_blocks(case, name, v):.2f}" if name in memory else ""
            memory_ratio = ""
            if unblocked in memory and name in memory:
                memory_ratio = f"{memory[name] / memory[unblocked]:.3f}"
            gradient = f"{case['selected_rows'] * v * 4 / 2**20:.0f}" if name in LOSSES else ""
            lines.append(
                f"| {case['n']} | {case['selected_rows']} | {FUNCTIONS[name][0]} | {seconds:.3f} | {ratio} | "
                f"{peak} | {gradient} | {blocks} | {memory_ratio} |"
            )
    return "\n".join(lines)


def flatness(cases: list[dict], v: int) -> dict[str, float]:
    """Per function measured at the smallest and the largest N: its peak extra memory beyond the gradient,
    in blocks, at the largest N over that at the smallest (1.0 = a constant number of blocks)."""
    measured = [case for case in cases if "peak_extra_mib" in case]
    if len(measured) < 2:
        return {}
    first, last = measured[0], measured[-1]
    return {
        name: beyond_gradient_in_blocks(last, name, v) / beyond_gradient_in_blocks(first, name, v)
        for name in FUNCTIONS
        if name in first["peak_extra_mib"] and name in last["peak_extra_mib"]
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "command")}
    cases = []
    for n in sorted(args.n):
        print(f"case N={n} V={args.v}: timing {', '.join(functions_for(n, args))}", flush=True)
        case = {"n": n, **time_case(n, args)}
        if not args.skip_memory:
            case["peak_extra_mib"] = {}
            for name in functions_for(n, args):
                print(f"case N={n}: peak memory of {name} (fresh process)", flush=True)
                measured = run_child(__name__, "memory_child", name, n, settings)
                case["peak_extra_mib"][name] = measured["peak_extra_mib"]
                case["memory_method"] = measured["method"]
        cases.append(case)
    result = {
        "command": " ".join([Path(sys.executable).name, "-m", "ta_opd_verl.bench", *sys.argv[1:]]),
        "machine": machine_info(args.threads, ("torch",)),
        "settings": settings,
        "cases": cases,
        "blocks_beyond_gradient_largest_over_smallest_n": flatness(cases, args.v),
    }
    table = markdown_table(cases, args.v)
    (args.out / "teacher_memory.json").write_text(json.dumps(result, indent=2))
    (args.out / "teacher_memory.md").write_text(table + "\n")
    print(table)
    print("peak extra memory beyond the gradient, in blocks, largest N / smallest N:")
    for name, ratio in result["blocks_beyond_gradient_largest_over_smallest_n"].items():
        print(f"  {name}: {ratio:.3f}")
    print(f"wrote {args.out / 'teacher_memory.json'}, {args.out / 'teacher_memory.md'}")
    return result
