"""Build (or reuse) the tiny teacher/student pair: `ta-opd build-tiny [--out DIR] [--force] [--seed N]`.

Both models are Qwen3-architecture causal LMs trained from scratch on the task mixture of
`ta_opd_verl.tiny.tasks`, sharing the byte-level BPE of `ta_opd_verl.tiny.tokenizer`. The teacher is
trained to the end with label smoothing (a soft, bounded distribution); the student has the same recipe
but stops EARLY (`BuildSettings.student_steps`), so on-policy distillation has room to move it
(docs/tiny-pair.md). Training streams favour the hard scratchpad tasks; the held-out sets and the
verl parquet files draw the five tasks uniformly.

The result is cached: ``<out>/manifest.json`` records a hash of the settings and of this package's source;
a second call with the same settings returns at once. Default folder: ``$TA_OPD_TINY_DIR`` or
``<repo>/.cache/tiny-pair``. Training pins ``torch.set_num_threads(1)`` (restored afterwards): with the
same seed, torch build and CPU the weights are bitwise identical.

    ta-opd build-tiny                      # build once, then reuse
    ta-opd build-tiny --out /tmp/pair --force --seed 1
    python -m ta_opd_verl.tiny.build --teacher-steps 40 --student-steps 20 --eval-problems 20 --out /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ta_opd_verl.tiny.evaluate import greedy_accuracy
from ta_opd_verl.tiny.parquet import write_parquet, write_problems_parquet
from ta_opd_verl.tiny.tasks import TASKS, Problem, generate_problem, generate_problems, number_words
from ta_opd_verl.tiny.tokenizer import CHATML, ChatFormat, train_tokenizer

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "ta_opd_tiny_pair"
# Bump when the on-disk layout or the meaning of a manifest field changes; source edits are hashed anyway.
FORMAT_VERSION = 1
ENV_DIR = "TA_OPD_TINY_DIR"
# What the pair is for: a near-perfect teacher, a student past the plateau with room to learn.
TEACHER_TARGET = 0.97
STUDENT_BAND = (0.02, 0.15)
_HASHED_SOURCES = (
    "tiny/tasks.py",
    "tiny/tokenizer.py",
    "tiny/evaluate.py",
    "tiny/build.py",
    "tiny/parquet.py",
)


class TinyBuildError(RuntimeError):
    """The tiny pair cannot be built or reused (bad output folder, bad settings)."""


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3 shape. ``head_dim = hidden_size // num_heads`` must be one vLLM-CPU supports (>= 32)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the built pair; its hash keys the cache.

    seed: seeds problem streams, weight init and the held-out sets.
    teacher / student: model shapes.
    batch_size: problems per optimiser step (both models).
    teacher_steps: the teacher's full schedule (warm-up, then linear decay to 0).
    student_schedule_steps: the student's planned schedule; it stops early, at student_steps.
    student_steps: where the student stops (see the comment at its default).
    lr, warmup_steps: AdamW learning rate and linear warm-up, both models.
    label_smoothing: teacher and student; keeps the teacher's log-probs bounded (about log(eps/V)).
    student_eval_every: greedy-evaluate the student on the first student_eval_problems validation
        problems every N steps (the manifest's history; progress only).
    eval_problems: held-out problems for the reported greedy accuracies (own seed).
    train_rows / val_rows: rows of train.parquet / val.parquet (val is held out from all training).
    teacher_eval_every: progress-only teacher accuracy every N steps (0 = never).
    """

    seed: int = 0
    teacher: ModelShape = ModelShape(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=384)
    # As wide as the teacher, shallower and with a smaller FFN, stopped early: on-policy OPD at 5% taught a
    # hidden-128 student more than a hidden-64 one (docs/benchmarks.md, "On-policy TA-OPD in plain PyTorch").
    student: ModelShape = ModelShape(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
    batch_size: int = 32
    teacher_steps: int = 1700
    student_schedule_steps: int = 1500
    # Early, where on-policy OPD lifts the student furthest: of the checkpoints that reach the same accuracy
    # after the demo's settings in plain PyTorch, this one starts lowest (docs/tiny-pair.md, "The student").
    student_steps: int = 280
    lr: float = 4e-3
    warmup_steps: int = 100
    label_smoothing: float = 0.05
    student_eval_every: int = 10
    student_eval_problems: int = 128
    eval_problems: int = 500
    train_rows: int = 2048
    val_rows: int = 256
    teacher_eval_every: int = 500

    def __post_init__(self):
        for name, shape in (("teacher", self.teacher), ("student", self.student)):
            if shape.hidden_size % shape.num_heads:
                raise TinyBuildError(f"{name}: hidden_size {shape.hidden_size} is not divisible by num_heads")
        if self.student_eval_every <= 0 or self.batch_size <= 0 or self.teacher_steps < 0:
            raise TinyBuildError("student_eval_every and batch_size must be > 0, teacher_steps >= 0")
        if not 0 < self.student_steps <= self.student_schedule_steps:
            raise TinyBuildError("need 0 < student_steps <= student_schedule_steps")


@dataclass(frozen=True)
class TinyPair:
    """Paths of a built pair. ``manifest`` holds the settings, measured accuracies and build time."""

    root: Path
    teacher: Path
    student: Path
    train_parquet: Path
    val_parquet: Path
    manifest: dict = field(repr=False)


def default_out_dir() -> Path:
    """``$TA_OPD_TINY_DIR``, else ``<repo>/.cache/tiny-pair`` in a clone, else ~/.cache/ta-opd/tiny-pair."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "tiny-pair"
    return Path.home() / ".cache" / "ta-opd" / "tiny-pair"


def settings_hash(settings: BuildSettings) -> str:
    """sha256 over the settings, the format version and the source of the modules that shape the pair."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    digest.update(f"format={FORMAT_VERSION}".encode())
    for rel in _HASHED_SOURCES:
        digest.update(rel.encode() + b"\0" + (package / rel).read_bytes())
    return digest.hexdigest()


# ---- seeds: one stream per purpose, so held-out sets never depend on training length ----


def _seed(settings: BuildSettings, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{settings.seed}:{purpose}".encode()).digest()[:6], "big")


def heldout_problems(settings: BuildSettings) -> tuple[list[Problem], list[Problem]]:
    """(eval problems, val problems): disjoint from each other and excluded from every training stream.

    Held-out sets draw the tasks uniformly (`TASKS`), so an accuracy weighs every task alike; only the
    training streams favour the hard scratchpad tasks (`TASK_WEIGHTS`).
    """
    evaluation = generate_problems(settings.eval_problems, _seed(settings, "eval"), tasks=TASKS)
    val = generate_problems(
        settings.val_rows, _seed(settings, "val"), exclude_prompts=[p.prompt for p in evaluation], tasks=TASKS
    )
    return evaluation, val


def _training_stream(seed: int, excluded: set[str]) -> Iterator[Problem]:
    rng = random.Random(seed)
    while True:
        problem = generate_problem(rng)
        if problem.prompt not in excluded:
            yield problem


# ---- tokenizer and models ----


def _tokenizer_corpus(settings: BuildSettings) -> list[str]:
    problems = generate_problems(1500, _seed(settings, "tokenizer"))
    coverage = [number_words(n) for n in range(1, 1000)]
    return (
        ["user", "assistant"] * 4 + coverage + [p.prompt for p in problems] + [p.response for p in problems]
    )


def _make_model(shape: ModelShape, tokenizer, seed: int):
    # transformers takes seconds to import; every tool imports this module, most only for a cache hit.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    return model


def _encode(
    tokenizer, problems: Sequence[Problem], chat_format: ChatFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 except response tokens and EOS), as verl concatenates them:
    chat-template prompt ids (``chat_format``), then response ids, then EOS."""
    prompts = tokenizer([chat_format.render(p.prompt) for p in problems], add_special_tokens=False).input_ids
    responses = tokenizer([p.response for p in problems], add_special_tokens=False).input_ids
    rows = [(pr, rs + [tokenizer.eos_token_id]) for pr, rs in zip(prompts, responses, strict=True)]
    width = max(len(pr) + len(rs) for pr, rs in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (pr, rs) in enumerate(rows):
        input_ids[i, : len(pr) + len(rs)] = torch.tensor(pr + rs)
        labels[i, len(pr) : len(pr) + len(rs)] = torch.tensor(rs)
    return input_ids, labels


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class _Trainer:
    """AdamW on next-token cross-entropy over response tokens (prompts in ``chat_format``), with warm-up
    and linear decay."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: BuildSettings,
        schedule_steps: int,
        stream: Iterator[Problem],
        chat_format: ChatFormat = CHATML,
    ):
        self.model, self.tokenizer, self.settings, self.stream = model, tokenizer, settings, stream
        self.chat_format = chat_format
        self.schedule_steps = schedule_steps
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01
        )
        self.step = 0

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * _lr_factor(
                self.step, self.settings.warmup_steps, self.schedule_steps
            )
        batch = [next(self.stream) for _ in range(self.settings.batch_size)]
        input_ids, labels = _encode(self.tokenizer, batch, self.chat_format)
        self.model.train()
        logits = self.model(input_ids=input_ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=self.settings.label_smoothing,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return loss.item()


class _Progress:
    def __init__(self, name: str, total: int, quiet: bool):
        self.name, self.total, self.quiet, self.start = name, total, quiet, time.perf_counter()

    def __call__(self, step: int, message: str) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, step) * (self.total - step)
        print(
            f"[{self.name}] step {step:4d}/{self.total} {message} | {elapsed:5.1f}s, ETA {eta:5.1f}s",
            flush=True,
        )


@contextlib.contextmanager
def pinned_threads(n: int):
    """Pin torch's thread count to ``n`` (builds pin 1: bitwise-reproducible weights), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_teacher(
    tokenizer,
    settings: BuildSettings,
    excluded: set[str],
    val: Sequence[Problem],
    quiet: bool,
    chat_format: ChatFormat = CHATML,
    name: str = "teacher",
) -> tuple[object, list[dict]]:
    """Train the teacher of ``settings`` on problems rendered in ``chat_format`` (none whose prompt is in
    ``excluded``); return (model, history of the progress-only accuracy on ``val``). The same settings give
    the same initial weights and problem stream, whatever the format."""
    model = _make_model(settings.teacher, tokenizer, _seed(settings, "teacher-init"))
    stream = _training_stream(_seed(settings, "teacher-data"), excluded)
    trainer = _Trainer(model, tokenizer, settings, settings.teacher_steps, stream, chat_format)
    progress, history, losses = _Progress(name, settings.teacher_steps, quiet), [], []
    for step in range(1, settings.teacher_steps + 1):
        losses.append(trainer.train_step())
        if step % 50 == 0 or step == settings.teacher_steps:
            progress(step, f"loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if settings.teacher_eval_every and step % settings.teacher_eval_every == 0:
            acc = greedy_accuracy(model, tokenizer, val[:128], chat_format=chat_format)["accuracy"]
            history.append({"step": step, "val_accuracy": acc})
            progress(step, f"val accuracy {acc:.3f} (128 problems)")
    return model, history


def _train_student(tokenizer, settings, stream, val, quiet) -> tuple[object, list[dict]]:
    """Train for student_steps of the student_schedule_steps schedule; return (model, history)."""
    model = _make_model(settings.student, tokenizer, _seed(settings, "student-init"))
    trainer = _Trainer(model, tokenizer, settings, settings.student_schedule_steps, stream)
    progress, history, losses = _Progress("student", settings.student_steps, quiet), [], []
    for step in range(1, settings.student_steps + 1):
        losses.append(trainer.train_step())
        if step % settings.student_eval_every and step != settings.student_steps:
            continue
        acc = greedy_accuracy(model, tokenizer, val[: settings.student_eval_problems])["accuracy"]
        history.append({"step": step, "val_accuracy": acc})
        progress(step, f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}, val accuracy {acc:.3f}")
    return model, history


# ---- output folder and cache ----


def check_out_dir(out_dir: Path, force: bool, kind: str = MANIFEST_KIND) -> None:
    """Refuse folders we might clobber or cannot write, with a message naming the folder; a folder with a
    manifest of ``kind`` may be replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyBuildError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise TinyBuildError(
            f"--out {out_dir} is a non-empty folder without a {MANIFEST_NAME}: refusing to overwrite it; "
            "pass an empty or new folder"
        )
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            found = json.loads((out_dir / MANIFEST_NAME).read_text()).get("kind")
        except (OSError, ValueError):
            found = None
        if found != kind:
            raise TinyBuildError(f"--out {out_dir} holds a {MANIFEST_NAME} that is not a {kind} manifest")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir.parent, prefix=".write-test-"):
            pass
    except OSError as error:
        raise TinyBuildError(f"--out {out_dir}: cannot write to {out_dir.parent} ({error})") from error


def planned_pair(out_dir: str | os.PathLike | None = None) -> TinyPair:
    """Where `build_tiny_pair` puts (or finds) the pair's files, without building or reading anything; the
    manifest is left empty. For plans that print paths before the pair exists."""
    root = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    return _pair_from(root.resolve(), {})


def _pair_from(root: Path, manifest: dict) -> TinyPair:
    return TinyPair(
        root=root,
        teacher=root / "teacher",
        student=root / "student",
        train_parquet=root / "train.parquet",
        val_parquet=root / "val.parquet",
        manifest=manifest,
    )


def load_cached(out_dir: Path, settings: BuildSettings) -> TinyPair | None:
    """The pair in ``out_dir`` if its manifest matches ``settings`` and every file is there, else None."""
    path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("kind") != MANIFEST_KIND or manifest.get("settings_hash") != settings_hash(settings):
        return None
    pair = _pair_from(out_dir, manifest)
    needed = [pair.train_parquet, pair.val_parquet]
    needed += [
        folder / name
        for folder in (pair.teacher, pair.student)
        for name in ("config.json", "model.safetensors")
    ]
    return pair if all(p.is_file() for p in needed) else None


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_tiny_pair(
    out_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    seed: int = 0,
    quiet: bool = False,
    **overrides,
) -> TinyPair:
    """Build the pair into ``out_dir`` (default `default_out_dir()`), or return the cached one.

    ``overrides`` replace `BuildSettings` fields (e.g. ``teacher_steps=40`` for a shortened build);
    ``force`` rebuilds even when the cache matches. Raises `TinyBuildError` for an unusable folder.
    """
    unknown = set(overrides) - {f.name for f in dataclasses.fields(BuildSettings)}
    if unknown:
        raise TinyBuildError(f"unknown build setting(s): {', '.join(sorted(unknown))}")
    settings = BuildSettings(seed=seed, **overrides)
    out_dir = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    out_dir = out_dir.resolve()
    if not force and (cached := load_cached(out_dir, settings)) is not None:
        if not quiet:
            print(f"tiny pair: cache hit at {out_dir}", flush=True)
        return cached
    check_out_dir(out_dir, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        manifest = _build_into(staging, settings, quiet)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pair = _pair_from(out_dir, manifest)
    if not quiet:
        print(summary(pair), flush=True)
    if not manifest["meets_targets"]:
        print(
            f"tiny pair: WARNING: accuracies outside the targets (teacher >= {TEACHER_TARGET}, student in "
            f"{list(STUDENT_BAND)}); see {out_dir / MANIFEST_NAME}",
            file=sys.stderr,
            flush=True,
        )
    return pair


def _build_into(staging: Path, settings: BuildSettings, quiet: bool) -> dict:
    """Train the tokenizer and both models, evaluate them, and write the pair's files and manifest into
    ``staging``; returns the manifest."""
    started = time.perf_counter()
    evaluation, val = heldout_problems(settings)
    excluded = {p.prompt for p in evaluation} | {p.prompt for p in val}
    with pinned_threads(1):
        tokenizer = train_tokenizer(_tokenizer_corpus(settings))
        teacher = train_teacher(tokenizer, settings, excluded, val, quiet)
        student = _train_student(
            tokenizer, settings, _training_stream(_seed(settings, "student-data"), excluded), val, quiet
        )
    train_seconds = time.perf_counter() - started
    trained = {"teacher": teacher, "student": student}
    evals = {name: greedy_accuracy(model, tokenizer, evaluation) for name, (model, _) in trained.items()}
    for name, (model, _) in trained.items():
        model.save_pretrained(staging / name, safe_serialization=True)
        tokenizer.save_pretrained(staging / name)
    write_parquet(
        staging / "train.parquet",
        settings.train_rows,
        _seed(settings, "train-rows"),
        "train",
        exclude_prompts=excluded,
        tasks=TASKS,
    )
    write_problems_parquet(staging / "val.parquet", val, "val")
    manifest = _manifest(settings, len(tokenizer), trained, evals, len(evaluation), train_seconds, started)
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(
    settings: BuildSettings,
    vocab_size: int,
    trained: dict[str, tuple[object, list[dict]]],
    evals: dict[str, dict],
    eval_problems: int,
    train_seconds: float,
    started: float,
) -> dict:
    """The manifest of a built pair, as a cache hit reads it back (JSON types: tuples become lists)."""
    (teacher, teacher_history), (student, student_history) = trained["teacher"], trained["student"]
    manifest = {
        "kind": MANIFEST_KIND,
        "format_version": FORMAT_VERSION,
        "settings_hash": settings_hash(settings),
        "settings": dataclasses.asdict(settings),
        "torch_version": torch.__version__,
        "vocab_size": vocab_size,
        "teacher": {
            "params": param_count(teacher),
            "steps": settings.teacher_steps,
            "eval": evals["teacher"],
            "history": teacher_history,
        },
        "student": {
            "params": param_count(student),
            "stopped_at_step": settings.student_steps,
            "eval": evals["student"],
            "history": student_history,
        },
        "eval_problems": eval_problems,
        "meets_targets": evals["teacher"]["accuracy"] >= TEACHER_TARGET
        and STUDENT_BAND[0] <= evals["student"]["accuracy"] <= STUDENT_BAND[1],
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    return json.loads(json.dumps(manifest))


def publish(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the finished ``staging`` folder, readable by everyone the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the pair is meant to be shared
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def summary(pair: TinyPair) -> str:
    m = pair.manifest
    return (
        f"tiny pair at {pair.root}\n"
        f"  teacher: {m['teacher']['params']:,} params, "
        f"greedy accuracy {m['teacher']['eval']['accuracy']:.3f} "
        f"on {m['eval_problems']} held-out problems\n"
        f"  student: {m['student']['params']:,} params, stopped at step {m['student']['stopped_at_step']}, "
        f"greedy accuracy {m['student']['eval']['accuracy']:.3f}\n"
        f"  data: {pair.train_parquet.name}, {pair.val_parquet.name}; built in {m['build_seconds']}s"
    )


# The BuildSettings fields the command line can shorten (tests, smoke runs).
SHORTENING_OPTIONS = ("teacher_steps", "student_steps", "eval_problems", "train_rows", "val_rows")


def argument_parser() -> argparse.ArgumentParser:
    """The arguments of ``ta-opd build-tiny`` (`ta_opd_verl.tiny.command` adds ``--teacher-own-format``)."""
    parser = argparse.ArgumentParser(prog="ta-opd build-tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help=f"output folder (default: ${ENV_DIR} or <repo>/.cache/tiny-pair)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    group = parser.add_argument_group("shortening (tests, smoke runs)")
    for name in SHORTENING_OPTIONS:
        group.add_argument(f"--{name.replace('_', '-')}", type=int)
    return parser


def settings_overrides(args: argparse.Namespace) -> dict:
    """The `BuildSettings` fields ``args`` sets (`build_tiny_pair`'s ``overrides``)."""
    return {name: getattr(args, name) for name in SHORTENING_OPTIONS if getattr(args, name) is not None}


def run(args: argparse.Namespace, builder: Callable = build_tiny_pair) -> int:
    """Build or reuse what ``builder`` builds (the pair; `ta_opd_verl.tiny.own_format` passes its teacher's
    builder, same arguments) for parsed `argument_parser` arguments; the exit status. ``--quiet`` prints
    only the built folder."""
    try:
        built = builder(
            args.out, force=args.force, seed=args.seed, quiet=args.quiet, **settings_overrides(args)
        )
    except TinyBuildError as error:
        print(f"ta-opd build-tiny: error: {error}", file=sys.stderr)
        return 2
    if args.quiet:
        print(built.root)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argument_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
