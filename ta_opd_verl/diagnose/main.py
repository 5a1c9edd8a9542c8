"""`ta-opd diagnose`: the paper's fixed-context diagnostic (§3, App. C-F) as a tool.

1. Bank: N student rollouts of prompts from a verl-format parquet, first L response tokens each, saved
   as `<out>/bank.parquet` (reuse one with `--bank`).
2. Score the initial student θ0 on every bank position: full-vocabulary forward and reverse KL, H,
   teacher entropy, and for each K: D, exact C, its lower bound Ĉ; plus position.
3. θτ: the checkpoint given with `--trained` (a Hugging Face folder, e.g. a verl run's export), else θ0
   trained on the bank with every position (plain OPD on fixed contexts). G = KL(p_T||p_θ0) − KL(p_T||p_θτ).
4. Masked training (Table 2): θ0 trained on the bank with each selector's mask at each budget, the
   same steps and learning rate for all; bank-mean G and gain per kept token.
5. Analysis with prompt-clustered bootstrap intervals; `report.md`, `summary.json`, `tokens.parquet`, PNGs.

What is simplified: the intervention trains on the frozen bank (no new rollouts, no verl trainer), with
full-batch Adam; the paper's θτ for the correlational analysis is an on-policy OPD run, which
`--trained` accepts.

    ta-opd diagnose                                       # tiny pair on CPU (built or reused), minutes
    ta-opd diagnose --teacher Qwen3-4B --student Qwen3-1.7B --data train.parquet \\
        --trained ckpt/global_step_100/huggingface --device cuda --dtype bfloat16 --k 8 16 32
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ta_opd_verl.bench.machine import machine_info
from ta_opd_verl.diagnose import diagnostic, report
from ta_opd_verl.diagnose.bank import Bank, load_bank, read_prompts, sample_bank, save_bank
from ta_opd_verl.diagnose.models import DTYPES, check_trained_checkpoint, config_vocab_size, load_model
from ta_opd_verl.diagnose.passes import PassSettings, TeacherEntries, score_initial, score_trained
from ta_opd_verl.diagnose.progress import Progress
from ta_opd_verl.diagnose.scoring import statistics_at
from ta_opd_verl.diagnose.train import TrainSettings, train_on_bank
from ta_opd_verl.teachability import SELECTORS, select_positions
from ta_opd_verl.tiny.build import build_tiny_pair
from ta_opd_verl.vocab import check_same_vocabulary

# Defaults that depend on the models. Paper: K = 8/16/32, L = 192, Adam lr 1e-6 (its OPD runs).
# Tiny pair: on its small vocabulary the paper's K would cover much of the teacher's mass, so K stays well
# below V with the paper's doubling; L is its verl max_response_length (conf/cpu_runtime.yaml); the learning
# rate is the largest of 1e-3 / 1e-4 / 2e-5 tried (docs/diagnostic.md) at which 30 steps on a RANDOM mask
# improve the bank-mean KL at every budget: larger ones memorise the kept positions at the others' cost.
PAPER_DEFAULTS = {"ks": (8, 16, 32), "response_tokens": 192, "lr": 1e-6}
TINY_DEFAULTS = {"ks": (4, 8, 16), "response_tokens": 32, "lr": 2e-5}
BUDGETS = (0.01, 0.03, 0.05, 0.10)
MASKED_SELECTORS = tuple(name for name in SELECTORS if name != "full")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ta-opd diagnose",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    models = parser.add_argument_group("models (none given: the tiny pair)")
    models.add_argument("--teacher", help="teacher Hugging Face folder")
    models.add_argument("--student", help="initial student θ0, Hugging Face folder")
    models.add_argument(
        "--trained", help="trained student θτ folder (default: θ0 trained on the bank, all positions)"
    )
    bank = parser.add_argument_group("bank")
    bank.add_argument(
        "--data", help="verl-format parquet with a 'prompt' column (tiny pair: its train.parquet)"
    )
    bank.add_argument("--bank", help="reuse a saved bank instead of sampling one")
    bank.add_argument("--rollouts", type=int, default=300, help="N student rollouts (paper: 300)")
    bank.add_argument(
        "--samples-per-prompt", type=int, default=1, help="rollouts per prompt (bootstrap cluster)"
    )
    bank.add_argument(
        "--response-tokens", type=int, help="L, response tokens kept (default: paper's 192; tiny pair 32)"
    )
    bank.add_argument("--temperature", type=float, default=1.0)
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--k", type=int, nargs="+", help="support sizes K (default 8 16 32; tiny pair 4 8 16)"
    )
    scoring.add_argument("--train-k", type=int, help="K of the selection masks (default: the middle K)")
    scoring.add_argument(
        "--teacher-topk",
        type=int,
        default=32,
        help="teacher entries per position for reverse_kl_topk (distillation_loss.topk)",
    )
    scoring.add_argument(
        "--compatibility",
        choices=("exact", "lower_bound"),
        default="exact",
        help="C used by the selection masks (exact: the diagnostic; lower_bound: training-time)",
    )
    training = parser.add_argument_group("masked training")
    training.add_argument("--selectors", nargs="+", default=list(MASKED_SELECTORS), choices=MASKED_SELECTORS)
    training.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    training.add_argument("--train-steps", type=int, default=30, help="full-batch Adam steps per run")
    training.add_argument(
        "--lr", type=float, help="Adam learning rate (default: paper's 1e-6; tiny pair 2e-5)"
    )
    training.add_argument("--loss", choices=("reverse_kl_topk", "pg_k1"), default="reverse_kl_topk")
    training.add_argument(
        "--skip-training", action="store_true", help="no masked-training runs (needs --trained)"
    )
    analysis = parser.add_argument_group("analysis")
    analysis.add_argument("--bootstrap", type=int, default=1000, help="prompt-clustered resamples")
    analysis.add_argument("--seed", type=int, default=0, help="seeds sampling, random selectors, bootstrap")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--out", type=Path, default=Path("outputs/diagnose"))
    runtime.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    runtime.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="forward precision (default: bfloat16 on cuda, float32 on cpu)",
    )
    runtime.add_argument("--batch-size", type=int, default=64, help="rollouts per forward")
    runtime.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a busy 2-core machine, 2 threads made tiny-model passes much slower)",
    )
    runtime.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except (ValueError, FileNotFoundError) as error:
        print(f"ta-opd diagnose: error: {error}", file=sys.stderr)
        return 2


def _resolve_models(args) -> tuple[str, str, str | None, dict]:
    """Teacher, student, data file and the size-dependent defaults, from the flags or the tiny pair."""
    if args.teacher is None and args.student is None:
        pair = build_tiny_pair(quiet=True)
        return str(pair.teacher), str(pair.student), args.data or str(pair.train_parquet), TINY_DEFAULTS
    if args.teacher is None or args.student is None:
        raise ValueError("give both --teacher and --student (or neither, for the tiny pair)")
    if args.data is None and args.bank is None:
        raise ValueError("--data (a verl-format parquet) or --bank is needed with --teacher/--student")
    return args.teacher, args.student, args.data, PAPER_DEFAULTS


@dataclass(frozen=True)
class Setup:
    """One diagnostic's models, data and settings, resolved from the flags and checked."""

    teacher_path: str
    student_path: str
    data_path: str | None
    ks: tuple[int, ...]
    train_k: int
    lr: float
    response_tokens: int
    dtype: torch.dtype
    vocab_size: int
    training: TrainSettings


def resolve_setup(args) -> Setup:
    """The flags with the model-size defaults filled in; raises ValueError (or `CheckpointError`) for
    flags that contradict each other or model folders that do not fit together."""
    teacher_path, student_path, data_path, defaults = _resolve_models(args)
    ks = tuple(sorted(set(args.k or defaults["ks"])))
    train_k = args.train_k or ks[len(ks) // 2]
    if train_k not in ks:
        raise ValueError(f"--train-k {train_k} must be one of --k {list(ks)}")
    if args.skip_training and args.trained is None:
        raise ValueError("--skip-training needs --trained (θτ must come from somewhere)")
    if any(not 0 < b <= 1 for b in args.budgets):
        raise ValueError(f"--budgets must lie in (0, 1], got {args.budgets}")
    student_vocab = config_vocab_size(student_path, "initial student")
    vocabulary = check_same_vocabulary(student_path, teacher_path)
    if args.trained is not None:
        check_trained_checkpoint(args.trained, teacher_path, student_vocab)
    if max(ks) > vocabulary.common_size or args.teacher_topk > vocabulary.common_size:
        raise ValueError(f"--k and --teacher-topk must not exceed the vocabulary ({vocabulary.common_size})")
    lr = args.lr or defaults["lr"]
    return Setup(
        teacher_path=teacher_path,
        student_path=student_path,
        data_path=data_path,
        ks=ks,
        train_k=train_k,
        lr=lr,
        response_tokens=args.response_tokens or defaults["response_tokens"],
        dtype=DTYPES[args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")],
        vocab_size=vocabulary.common_size,
        training=TrainSettings(steps=args.train_steps, lr=lr, loss=args.loss, micro_batch=args.batch_size),
    )


@dataclass
class Diagnostic:
    """The loaded models and bank of one run, and the two things every step does with them: train θ0 on a
    mask of the bank, and score a student's forward KL from the teacher on the bank."""

    args: argparse.Namespace
    setup: Setup
    student: torch.nn.Module
    teacher: torch.nn.Module
    bank: Bank
    passes: PassSettings

    def train(self, mask: torch.Tensor, entries: TeacherEntries, name: str):
        """θ0 trained on the `mask` positions of the bank: (model, loss per step)."""
        return train_on_bank(
            self.student,
            self.bank,
            mask,
            entries,
            self.setup.training,
            name=name,
            pad_id=self.passes.pad_id,
            vocab_size=self.passes.vocab_size,
            device=self.passes.device,
            dtype=self.passes.dtype,
            quiet=self.passes.quiet,
        )

    def forward_kl(self, model, name: str) -> torch.Tensor:
        return score_trained(model, self.teacher, self.bank, self.passes, name)["forward_kl"]


def load_diagnostic(args, setup: Setup) -> Diagnostic:
    """Tokenizer, θ0 (float32 master weights), the teacher, and the bank: `--bank`, or sampled from θ0."""
    # transformers takes seconds to import; argument errors and --help are answered without it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup.student_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    student = load_model(setup.student_path, args.device, torch.float32, "initial student")
    teacher = load_model(setup.teacher_path, args.device, setup.dtype, "teacher")
    if args.bank:
        bank = load_bank(args.bank)
    else:
        n_prompts = math.ceil(args.rollouts / args.samples_per_prompt)
        bank = sample_bank(
            student,
            tokenizer,
            read_prompts(setup.data_path, n_prompts),
            samples_per_prompt=args.samples_per_prompt,
            response_tokens=setup.response_tokens,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            settings={"student": setup.student_path, "data": str(setup.data_path)},
            progress=Progress("sampling bank", args.quiet),
        )
    passes = PassSettings(args.batch_size, setup.vocab_size, pad_id, args.device, setup.dtype, args.quiet)
    return Diagnostic(args, setup, student, teacher, bank, passes)


def theta_tau_kl(diag: Diagnostic, entries: TeacherEntries) -> tuple[torch.Tensor, str, list[float] | None]:
    """θτ's forward KL at every bank position, where θτ came from, and (when θτ is θ0 trained on the
    whole bank here) the loss of each of its steps. Only θτ's KL leaves this function: on a GPU its weights
    would crowd the masked runs."""
    if diag.args.trained is not None:
        theta_tau = load_model(diag.args.trained, diag.args.device, torch.float32, "trained student")
        source, losses = f"checkpoint {diag.args.trained}", None
    else:
        theta_tau, losses = diag.train(diag.bank.valid_mask(), entries, "training full")
        source = "θ0 trained on the bank with every position (selector full)"
    return diag.forward_kl(theta_tau, "scoring θτ"), source, losses


def selection_masks(args, setup: Setup, grids: dict[str, torch.Tensor], valid: torch.Tensor) -> dict:
    """Each (selector, budget)'s mask from θ0's statistics at the training K, each with a fresh generator."""
    stats = statistics_at(grids, setup.train_k, args.compatibility)
    masks = {}
    for selector in args.selectors:
        for budget in args.budgets:
            generator = torch.Generator().manual_seed(args.seed)
            masks[(selector, budget)] = select_positions(selector, stats, valid, budget, generator=generator)
    return masks


def masked_training(
    diag: Diagnostic, masks: dict, entries: TeacherEntries, kl_initial: torch.Tensor, view
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """θ0 trained on each mask: the Table-2 figures of each run and its gain at every bank position."""
    args = diag.args
    runs: dict[str, dict] = {}
    gains: dict[str, torch.Tensor] = {}
    for index, ((selector, budget), mask) in enumerate(masks.items(), start=1):
        name = f"{selector}@{budget:g}"
        model, losses = diag.train(mask, entries, f"training {name} ({index}/{len(masks)})")
        kl_run = diag.forward_kl(model, f"scoring {name}")
        gains[name] = kl_initial - kl_run
        runs[name] = {
            "selector": selector,
            "budget": budget,
            **diagnostic.masked_training_run(
                view, kl_initial, kl_run, mask, losses, resamples=args.bootstrap, seed=args.seed
            ),
        }
    return runs, gains


def run(args, argv: list[str]) -> int:
    started = time.perf_counter()
    setup = resolve_setup(args)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    diag = load_diagnostic(args, setup)
    bank_path = save_bank(diag.bank, args.out / "bank.parquet")
    grids, entries = score_initial(
        diag.student, diag.teacher, diag.bank, setup.ks, args.teacher_topk, diag.passes, "scoring θ0"
    )
    valid = diag.bank.valid_mask()
    view = diagnostic.BankView.of(valid, torch.tensor(diag.bank.prompt_index))
    kl_tau, theta_tau_source, full_losses = theta_tau_kl(diag, entries)
    runs: dict[str, dict] = {}
    if full_losses is not None:
        runs["full"] = diagnostic.masked_training_run(
            view, grids["forward_kl"], kl_tau, valid, full_losses, resamples=args.bootstrap, seed=args.seed
        )
    masks = selection_masks(args, setup, grids, valid)
    run_gains: dict[str, torch.Tensor] = {}
    if not args.skip_training:
        masked_runs, run_gains = masked_training(diag, masks, entries, grids["forward_kl"], view)
        runs.update(masked_runs)
    if not args.quiet:
        print(f"[analysis] {args.bootstrap} bootstrap resamples per table", file=sys.stderr, flush=True)
    gain_grid = grids["forward_kl"] - kl_tau
    summary = {
        "command": "ta-opd diagnose " + " ".join(argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(args.device),
        "models": {
            "teacher": setup.teacher_path,
            "student": setup.student_path,
            "theta_tau": theta_tau_source,
        },
        "bank": _bank_summary(diag.bank, bank_path, view, setup.vocab_size),
        "settings": _settings_summary(args, setup),
        **_analysis(args, setup, view, grids, kl_tau, masks),
        "masked_training": runs,
    }
    summary["wall_s"] = time.perf_counter() - started
    report.write_outputs(
        args.out, summary, diag.bank, grids, gain_grid, kl_tau, run_gains, setup.ks, setup.train_k
    )
    print(f"wrote {args.out}/report.md, summary.json, tokens.parquet and plots in {summary['wall_s']:.0f} s")
    return 0


def _bank_summary(bank: Bank, path: Path, view, vocab_size: int) -> dict:
    return {
        "path": str(path),
        "rollouts": bank.rollouts,
        "prompts": len(set(bank.prompt_index)),
        "positions": view.size,
        "response_tokens": bank.settings.get("response_tokens"),
        "mean_response_length": view.size / bank.rollouts,
        "vocabulary": vocab_size,
    }


def _settings_summary(args, setup: Setup) -> dict:
    return {
        "ks": list(setup.ks),
        "train_k": setup.train_k,
        "teacher_topk": args.teacher_topk,
        "compatibility_for_masks": args.compatibility,
        "budgets": args.budgets,
        "selectors": args.selectors,
        "train_steps": args.train_steps,
        "lr": setup.lr,
        "loss": args.loss,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "device": args.device,
        "dtype": str(setup.dtype).removeprefix("torch."),
    }


def _analysis(args, setup: Setup, view, grids: dict, kl_tau: torch.Tensor, masks: dict) -> dict:
    """The correlational tables (gain, Spearman, regression, Q3) and the matched-top-n means."""
    gain_grid = grids["forward_kl"] - kl_tau
    settings = dict(q_low=0.05, q_high=0.95, resamples=args.bootstrap, seed=args.seed)
    return {
        "gain": diagnostic.gain_summary(
            view, grids["forward_kl"], kl_tau, resamples=args.bootstrap, seed=args.seed
        ),
        "spearman": diagnostic.correlations(view, grids, gain_grid, setup.ks, **settings),
        "regression": diagnostic.regressions(view, grids, gain_grid, setup.ks, **settings),
        "q3": diagnostic.q3_gaps(view, grids, gain_grid, setup.ks, **settings),
        "matched_top_n": diagnostic.masked_means(
            view,
            gain_grid,
            grids["forward_kl"],
            {f"{s}@{b:g}": m for (s, b), m in masks.items()},
            resamples=args.bootstrap,
            seed=args.seed,
        ),
    }


def _machine(device: str) -> dict:
    gpu = {"gpu": torch.cuda.get_device_name(torch.device(device))} if str(device).startswith("cuda") else {}
    return machine_info(torch.get_num_threads(), ("torch", "transformers"), **gpu)


if __name__ == "__main__":
    sys.exit(main())
