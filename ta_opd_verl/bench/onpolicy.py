"""On-policy TA-OPD on the tiny pair in plain PyTorch: size lr / budget / batch before paying for verl.

Each step: the student samples one response per prompt (Hugging Face `generate`, temperature 1, no top-k
or top-p), the teacher and the student score the sequences in one no-grad forward each, positions are
scored by `token_statistics` (on the teacher's top-K) and selected by `select_positions` over the whole
batch (global budget ρ plus `min_keep_per_sample`), then the batch is split into mini-batches and each
takes one AdamW step (weight decay 0.01, grad-norm clip 1.0, constant lr: verl's actor defaults, or
`--lr-schedule cosine`: verl's half-cosine decay to `--min-lr-ratio`, stepped once per rollout step) on the
plugin's `reverse_kl_on_teacher_support` aggregated by `masked_aggregate` (token-mean over the
mini-batch's selected positions, the paper's Eq. 7). As in verl, the selection is made once per step
with the student of the rollout, and a step whose gradient norm is not finite is skipped.

Greedy accuracy on the pair's `val.parquet` is measured at step 0 and every `--eval-every` steps.
Every combination of `--selector`, `--ratio`, `--lr`, `--lr-schedule`, `--min-keep`, `--teacher-topk`,
`--top-p` and `--epochs` is one configuration, run once per seed; `--jobs` runs that many (configuration,
seed) runs in parallel processes. Writes `onpolicy.json` (arguments, machine, per-seed curves and per-step
records), `onpolicy.md` (mean ± sample std over seeds) and `onpolicy.png` (accuracy vs step) into `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ta_opd_verl.bench.machine import machine_info
from ta_opd_verl.opd_loss import masked_aggregate, reverse_kl_on_teacher_support
from ta_opd_verl.teachability import SELECTORS, SelectionRules, select_positions, token_statistics
from ta_opd_verl.tiny.build import build_tiny_pair
from ta_opd_verl.tiny.evaluate import generate_responses, greedy_accuracy
from ta_opd_verl.tiny.tasks import Problem
from ta_opd_verl.tiny.tokenizer import render_chat

RESULT_NAME = "onpolicy"
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr multiplier after `step` scheduler steps: verl's `get_cosine_schedule_with_warmup` without
    warmup (num_cycles 0.5, zero-indexed), which verl's actor steps once per training step."""
    if schedule == "constant":
        return 1.0
    progress = step / max(1, total_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid (every combination is one configuration)")
    grid.add_argument("--selector", nargs="+", default=["teachability"], choices=SELECTORS)
    grid.add_argument("--ratio", type=float, nargs="+", default=[0.05], help="budget ρ (ignored by full)")
    grid.add_argument("--lr", type=float, nargs="+", default=[3e-4], help="AdamW (peak) learning rate")
    grid.add_argument(
        "--lr-schedule",
        nargs="+",
        default=["constant"],
        choices=LR_SCHEDULES,
        help="verl's lr_scheduler_type: constant, or a half-cosine from lr to lr × --min-lr-ratio",
    )
    grid.add_argument(
        "--min-keep", type=int, nargs="+", default=[1], help="min_keep_per_sample (ignored by full)"
    )
    grid.add_argument(
        "--teacher-topk",
        type=int,
        nargs="+",
        default=[16],
        help="teacher entries per position for scoring and loss; 0 = the full vocabulary",
    )
    grid.add_argument(
        "--top-p",
        type=float,
        nargs="+",
        default=[1.0],
        help="rollout nucleus sampling (1 = full distribution)",
    )
    grid.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=[1],
        help="passes over each rollout batch (verl's ppo_epochs)",
    )
    loop = parser.add_argument_group("loop")
    loop.add_argument("--steps", type=int, default=150)
    loop.add_argument("--batch", type=int, default=32, help="prompts per step")
    loop.add_argument("--samples-per-prompt", type=int, default=1, help="responses sampled per prompt")
    loop.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per epoch")
    loop.add_argument("--k", type=int, default=8, help="token_statistics support size (student top-k)")
    loop.add_argument("--max-new-tokens", type=int, default=32, help="response length cap")
    loop.add_argument("--weight-decay", type=float, default=0.01)
    loop.add_argument("--grad-clip", type=float, default=1.0)
    loop.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine schedule's floor (verl's)")
    loop.add_argument("--seeds", type=int, nargs="+", default=[0], help="several: mean ± std over them")
    loop.add_argument("--student", type=Path, default=None, help="another student folder (same tokenizer)")
    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--eval-every", type=int, default=25, help="greedy validation every N steps")
    evaluation.add_argument("--val-size", type=int, default=None, help="first N val problems (default all)")
    evaluation.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    evaluation.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest)")
    evaluation.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    evaluation.add_argument("--out", type=Path, default=Path("outputs/bench/onpolicy"))


# ---- configurations ---------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[dict]:
    """The grid, in argument order; `full` ignores ρ and min-keep, so it appears once per lr and K_T."""
    out, seen = [], set()
    for selector, ratio, lr, schedule, min_keep, topk, top_p, epochs in itertools.product(
        args.selector,
        args.ratio,
        args.lr,
        args.lr_schedule,
        args.min_keep,
        args.teacher_topk,
        args.top_p,
        args.epochs,
    ):
        if selector == "full":
            ratio, min_keep = 1.0, 0
        config = {
            "selector": selector,
            "ratio": ratio,
            "min_keep": min_keep,
            "lr": lr,
            "lr_schedule": schedule,
            "teacher_topk": topk,
            "top_p": top_p,
            "epochs": epochs,
        }
        key = tuple(config.values())
        if key not in seen:
            seen.add(key)
            out.append({**config, "label": label(config)})
    return out


def label(config: dict) -> str:
    support = "V" if config["teacher_topk"] == 0 else str(config["teacher_topk"])
    common = f"lr={config['lr']:g} K_T={support}"
    if config["lr_schedule"] != "constant":
        common += f" {config['lr_schedule']}"
    if config["top_p"] < 1:
        common += f" top_p={config['top_p']:g}"
    if config["epochs"] > 1:
        common += f" epochs={config['epochs']}"
    if config["selector"] == "full":
        return f"full {common}"
    return f"{config['selector']} ρ={config['ratio']:g} m={config['min_keep']} {common}"


# ---- one run ----------------------------------------------------------------------------------------------


def _load_problems(parquet: str, limit: int | None = None):
    frame = pd.read_parquet(parquet)
    problems = [
        Problem(task=extra["task"], prompt=prompt[0]["content"], response="", answer=reward["ground_truth"])
        for prompt, reward, extra in zip(
            frame["prompt"], frame["reward_model"], frame["extra_info"], strict=True
        )
    ]
    return problems if limit is None else problems[:limit]


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _rollout_tensors(tokenizer, prompts: list[str], responses: list[list[int]]):
    """Right-padded `prompt + response` ids, and for each response token the index of the position whose
    logits predict it (`[R, L]`, with its validity mask)."""
    prompt_ids = tokenizer([render_chat(p) for p in prompts], add_special_tokens=False).input_ids
    sequences = [p + r for p, r in zip(prompt_ids, responses, strict=True)]
    rows, width = len(sequences), max(map(len, sequences))
    length = max(1, max(map(len, responses)))
    input_ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros(rows, width, dtype=torch.long)
    index = torch.zeros(rows, length, dtype=torch.long)
    valid = torch.zeros(rows, length, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, responses, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        index[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        valid[i, : len(r)] = True
    return input_ids, attention, index, valid


def _response_logits(model, input_ids, attention, index) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _load_models(settings: dict):
    """(tokenizer, student in train mode, teacher in eval mode), float32; the vocabularies must agree."""
    # transformers takes seconds to import; only the runs need it, not `bench`'s other subcommands.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(settings["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(settings["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(settings["teacher"], dtype=torch.float32).eval()
    vocab_s, vocab_t = student.get_output_embeddings().weight.shape[0], teacher.config.vocab_size
    if vocab_s != vocab_t:
        raise ValueError(f"student vocabulary {vocab_s} differs from the teacher's {vocab_t}")
    return tokenizer, student.train(), teacher


class _PromptStream:
    """The training prompts in a seeded random order, drawn without replacement and reshuffled after each
    pass over them."""

    def __init__(self, prompts: list[str], generator: torch.Generator) -> None:
        self.prompts, self.generator = prompts, generator
        self.order, self.cursor = torch.randperm(len(prompts), generator=generator), 0

    def take(self, n: int) -> list[str]:
        taken = []
        for _ in range(n):
            if self.cursor == len(self.order):
                self.order, self.cursor = torch.randperm(len(self.prompts), generator=self.generator), 0
            taken.append(self.prompts[int(self.order[self.cursor])])
            self.cursor += 1
        return taken


@dataclass(frozen=True)
class _Rollouts:
    """One step's sampled responses, scored: model inputs, the teacher's entries, the selection, and the
    rollout student's reverse KL at every position (`[R, L]` unless noted)."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    top_ids: torch.Tensor  # [R, L, K_T]
    top_lp: torch.Tensor  # [R, L, K_T]
    selected: torch.Tensor
    reverse_kl: torch.Tensor


def _scored_rollouts(
    student, teacher, tokenizer, prompts: list[str], config: dict, settings: dict, generator: torch.Generator
) -> _Rollouts:
    """Sample one response per prompt with the student, score every position with the teacher's top-K_T
    and select over the whole batch, all with the student of the rollout."""
    responses = generate_responses(
        student,
        tokenizer,
        prompts,
        do_sample=True,
        temperature=1.0,
        top_p=config["top_p"],
        max_new_tokens=settings["max_new"],
    )
    input_ids, attention, index, valid = _rollout_tensors(tokenizer, prompts, responses)
    with torch.no_grad():
        teacher_lp = _response_logits(teacher, input_ids, attention, index).log_softmax(-1)
        rollout_logits = _response_logits(student, input_ids, attention, index)
    if config["teacher_topk"]:
        top_lp, top_ids = teacher_lp.topk(config["teacher_topk"], dim=-1)
    else:
        top_lp, top_ids = teacher_lp, torch.arange(teacher_lp.shape[-1]).expand_as(teacher_lp)
    stats = token_statistics(rollout_logits, top_ids, top_lp, k=settings["k"])
    selected = select_positions(
        config["selector"],
        stats,
        valid,
        config["ratio"],
        rules=SelectionRules(min_keep_per_sample=config["min_keep"]),
        generator=generator,
    )
    selected &= valid
    with torch.no_grad():
        reverse_kl = reverse_kl_on_teacher_support(rollout_logits, top_ids, top_lp)
    return _Rollouts(input_ids, attention, index, valid, top_ids, top_lp, selected, reverse_kl)


def _update(student, optimizer, rollouts: _Rollouts, config: dict, settings: dict):
    """`epochs` passes of shuffled mini-batches, one AdamW step each on the selected positions' loss (a
    step with a non-finite gradient norm is skipped); returns (losses, grad norms, skipped steps)."""
    losses, grad_norms, skipped = [], [], 0
    mini_batches = [
        chunk
        for _ in range(config["epochs"])
        for chunk in torch.randperm(len(rollouts.valid)).chunk(settings["mini_batches"])
    ]
    for chunk in mini_batches:
        mask = rollouts.selected[chunk]
        logits = _response_logits(
            student, rollouts.input_ids[chunk], rollouts.attention[chunk], rollouts.index[chunk]
        )
        per_token = reverse_kl_on_teacher_support(logits, rollouts.top_ids[chunk], rollouts.top_lp[chunk])
        loss = masked_aggregate(
            per_token,
            mask,
            "token-mean",
            dp_size=1,
            batch_num_selected=float(mask.sum()),
            global_batch_size=len(chunk),
        )
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), settings["grad_clip"])
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        losses.append(loss.item())
        grad_norms.append(grad_norm.item())
    return losses, grad_norms, skipped


def _step_record(step: int, rollouts: _Rollouts, min_keep: int, update, lr: float, seconds: float) -> dict:
    """One step's entry of the run's records; `update` is `_update`'s result."""
    losses, grad_norms, skipped = update
    valid, selected, reverse_kl = rollouts.valid, rollouts.selected, rollouts.reverse_kl
    valid_per_sample = valid.sum(-1)
    short = selected.sum(-1) < valid_per_sample.clamp(max=min_keep)
    return {
        "step": step,
        "n_valid": int(valid.sum()),
        "n_selected": int(selected.sum()),
        "n_samples": len(valid),
        "samples_below_min_keep": int(short.sum()),
        "loss": statistics.fmean(losses),
        "grad_norm": statistics.fmean(grad_norms),
        "skipped_updates": skipped,
        "lr": lr,
        "reverse_kl_selected": float(reverse_kl[selected].mean()) if selected.any() else 0.0,
        "reverse_kl_all": float(reverse_kl[valid].mean()),
        "response_length": float(valid_per_sample.float().mean()),
        "seconds": seconds,
    }


def _progress_line(
    tag: str, steps: int, records: list[dict], curve: list[dict], log_every: int, elapsed: float
):
    step = records[-1]["step"]
    recent = records[-log_every:]
    kept = sum(r["n_selected"] for r in recent) / max(1, sum(r["n_valid"] for r in recent))
    accuracy = f" accuracy {curve[-1]['accuracy']:.1%}" if curve[-1]["step"] == step else ""
    return (
        f"{tag} step {step}/{steps}: loss {records[-1]['loss']:.3f} kept {kept:.1%}"
        f" RKL(all) {records[-1]['reverse_kl_all']:.3f}{accuracy}"
        f" | {elapsed / step:.2f} s/step, ETA {_format_seconds(elapsed / step * (steps - step))}"
    )


def run_one(config: dict, seed: int, settings: dict) -> dict:
    """One (configuration, seed) run; `settings` holds the loop arguments and the pair's paths."""
    torch.set_num_threads(settings["threads"])
    tag = f"[{config['label']} seed {seed}]"
    tokenizer, student, teacher = _load_models(settings)
    train_prompts = [p.prompt for p in _load_problems(settings["train_parquet"])]
    val = _load_problems(settings["val_parquet"], settings["val_size"])
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config["lr"], weight_decay=settings["weight_decay"]
    )
    steps = settings["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config["lr_schedule"], step, steps, settings["min_lr_ratio"])
    )

    torch.manual_seed(seed)  # sampling in generate and the mini-batch order draw from the global generator
    stream = _PromptStream(train_prompts, torch.Generator().manual_seed(seed))
    selector_generator = torch.Generator().manual_seed(seed + 1_000_003)

    def evaluate(step: int) -> dict:
        result = greedy_accuracy(student, tokenizer, val)
        return {"step": step, "accuracy": result["accuracy"], "per_task": result["per_task"]}

    curve = [evaluate(0)]
    print(f"{tag} step 0/{steps}: accuracy {curve[-1]['accuracy']:.1%}", flush=True)
    records: list[dict] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        step_start = time.perf_counter()
        prompts = [p for p in stream.take(settings["batch"]) for _ in range(settings["samples_per_prompt"])]
        rollouts = _scored_rollouts(
            student, teacher, tokenizer, prompts, config, settings, selector_generator
        )
        update = _update(student, optimizer, rollouts, config, settings)
        step_lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - step_start
        records.append(_step_record(step, rollouts, config["min_keep"], update, step_lr, seconds))
        if step % settings["eval_every"] == 0 or step == steps:
            curve.append(evaluate(step))
        if step % settings["log_every"] == 0 or step == steps or curve[-1]["step"] == step:
            elapsed = time.perf_counter() - start
            print(_progress_line(tag, steps, records, curve, settings["log_every"], elapsed), flush=True)
    wall = time.perf_counter() - start
    return {"seed": seed, "curve": curve, "steps": records, "wall_s": wall}


def _run_one_star(job: tuple[dict, int, dict]) -> dict:
    return run_one(*job)


# ---- summary, table, plot ---------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std (0 for one seed) of the accuracy at each evaluated step, over seeds."""
    steps = [point["step"] for point in runs[0]["curve"]]
    by_step = [[run["curve"][i]["accuracy"] for run in runs] for i in range(len(steps))]
    kept = [r["n_selected"] / max(1, r["n_valid"]) for run in runs for r in run["steps"]]
    return {
        "steps": steps,
        "mean": [statistics.fmean(v) for v in by_step],
        "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in by_step],
        "kept_fraction": statistics.fmean(kept) if kept else 0.0,
        "seconds_per_step": statistics.fmean(s["seconds"] for run in runs for s in run["steps"]),
        "wall_s": statistics.fmean(run["wall_s"] for run in runs),
        "skipped_updates": sum(s["skipped_updates"] for run in runs for s in run["steps"]),
    }


def markdown_table(configs: list[dict]) -> str:
    """Accuracy in % per evaluated step (mean ± sample std over seeds), kept fraction and s/step."""
    steps = configs[0]["summary"]["steps"]
    head = "| configuration | seeds | " + " | ".join(f"step {s}" for s in steps) + " | kept | s/step |"
    lines = [head, "|---|---:|" + "---:|" * len(steps) + "---:|---:|"]
    for config in configs:
        summary = config["summary"]
        cells = [
            f"{100 * m:.1f}" if len(config["runs"]) == 1 else f"{100 * m:.1f} ± {100 * s:.1f}"
            for m, s in zip(summary["mean"], summary["std"], strict=True)
        ]
        lines.append(
            f"| {config['label']} | {len(config['runs'])} | "
            + " | ".join(cells)
            + f" | {summary['kept_fraction']:.1%} | {summary['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def plot(configs: list[dict], path: Path, title: str) -> None:
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, config in enumerate(configs):
        color = f"C{i % 10}"
        summary = config["summary"]
        steps = summary["steps"]
        mean = [100 * m for m in summary["mean"]]
        std = [100 * s for s in summary["std"]]
        for run in config["runs"]:
            ax.plot(steps, [100 * p["accuracy"] for p in run["curve"]], color=color, alpha=0.25, lw=0.8)
        ax.plot(
            steps, mean, color=color, marker="o", ms=3, label=f"{config['label']} (n={len(config['runs'])})"
        )
        if len(config["runs"]) > 1:
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, low, high, color=color, alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("greedy validation accuracy (%)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- driver -----------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "samples_per_prompt", "mini_batches", "k", "max_new_tokens", "eval_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 1 or args.jobs < 1 or args.log_every < 1:
        raise SystemExit("--threads, --jobs and --log-every must be >= 1")
    if args.mini_batches > args.batch * args.samples_per_prompt:
        raise SystemExit("--mini-batches cannot exceed the number of responses per step")
    if any(not 0 <= r <= 1 for r in args.ratio) or any(m < 0 for m in args.min_keep):
        raise SystemExit("--ratio must be in [0, 1] and --min-keep >= 0")
    if any(lr < 0 for lr in args.lr) or any(t < 0 for t in args.teacher_topk):
        raise SystemExit("--lr and --teacher-topk must be >= 0")
    if not 0 <= args.min_lr_ratio <= 1:
        raise SystemExit("--min-lr-ratio must be in [0, 1]")


def run(args: argparse.Namespace) -> dict:
    _check(args)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pair = build_tiny_pair(quiet=True)
    student = args.student.resolve() if args.student else pair.student
    settings = {
        "tokenizer": str(pair.student),
        "student": str(student),
        "teacher": str(pair.teacher),
        "train_parquet": str(pair.train_parquet),
        "val_parquet": str(pair.val_parquet),
        "val_size": args.val_size,
        "threads": args.threads,
        "steps": args.steps,
        "batch": args.batch,
        "samples_per_prompt": args.samples_per_prompt,
        "mini_batches": args.mini_batches,
        "k": args.k,
        "max_new": args.max_new_tokens,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "min_lr_ratio": args.min_lr_ratio,
        "eval_every": args.eval_every,
        "log_every": args.log_every,
    }
    configs = configurations(args)
    jobs = [(config, seed, settings) for config in configs for seed in args.seeds]
    print(
        f"{len(configs)} configuration(s) x {len(args.seeds)} seed(s) = {len(jobs)} run(s) of {args.steps} "
        f"steps, {args.jobs} at a time; student {student}",
        flush=True,
    )
    result = {
        "command": " ".join([Path(sys.executable).name, "-m", "ta_opd_verl.bench", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": machine_info(
            args.threads, ("torch", "transformers"), jobs=args.jobs, cuda=torch.cuda.is_available()
        ),
        "pair": {
            "root": str(pair.root),
            "student": str(student),
            "teacher": str(pair.teacher),
            "student_build_accuracy": pair.manifest.get("student", {}).get("eval", {}).get("accuracy"),
            "val_problems": len(_load_problems(settings["val_parquet"], args.val_size)),
        },
        "configurations": [],
    }
    runs: dict[int, dict] = {}
    start = time.perf_counter()

    def finished(i: int, outcome: dict) -> None:
        runs[i] = outcome
        elapsed = time.perf_counter() - start
        remaining = len(jobs) - len(runs)
        eta = elapsed / len(runs) * remaining
        config, seed, _ = jobs[i]
        print(
            f"finished {len(runs)}/{len(jobs)}: {config['label']} seed {seed}, final accuracy "
            f"{outcome['curve'][-1]['accuracy']:.1%} in {_format_seconds(outcome['wall_s'])}; "
            f"elapsed {_format_seconds(elapsed)}, ETA {_format_seconds(eta)}",
            flush=True,
        )

    if args.jobs == 1:
        for i, job in enumerate(jobs):
            finished(i, run_one(*job))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {pool.submit(_run_one_star, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                finished(futures[future], future.result())

    for c, config in enumerate(configs):
        config_runs = [runs[c * len(args.seeds) + s] for s in range(len(args.seeds))]
        result["configurations"].append({**config, "runs": config_runs, "summary": summarize(config_runs)})
    result["total_wall_s"] = time.perf_counter() - start
    table = markdown_table(result["configurations"])
    out_json, out_md, out_png = (args.out / f"{RESULT_NAME}.{ext}" for ext in ("json", "md", "png"))
    out_json.write_text(json.dumps(result, indent=1))
    out_md.write_text(table + "\n")
    title = (
        f"on-policy OPD on the tiny pair: {args.steps} steps, batch {args.batch}x{args.samples_per_prompt}, "
        f"{args.mini_batches} mini-batches, seeds {args.seeds}"
    )
    plot(result["configurations"], out_png, title)
    print(table)
    print(f"wrote {out_json}, {out_md}, {out_png}")
    return result
