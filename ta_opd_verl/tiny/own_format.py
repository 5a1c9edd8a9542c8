"""A tiny teacher trained on its OWN chat format, the tiny analogue of the paper's R1 pair:
`ta-opd build-tiny --teacher-own-format` (docs/tiny-pair.md, "A teacher in its own chat format").

DeepSeek-R1-Distill-Qwen teaching Qwen2.5: one BPE, different added tokens, so the student's end of turn
``<|im_end|>`` is the teacher's ``<｜Assistant｜>`` and the student's ChatML prompt is a format the teacher
never saw. The same here: the pair's tokenizer with ids 0, 1, 2 renamed to `R1_STYLE`'s
``<｜end▁of▁sentence｜>`` (EOS and pad), ``<｜User｜>`` and ``<｜Assistant｜>`` (`with_chat_format`:
every other id and the BPE unchanged), and a teacher of the pair's teacher shape, settings, initial
weights and problem stream (`build.train_teacher`), trained from scratch on the problems rendered in
that format. The student's EOS (id 2) reads to it as ``<｜Assistant｜>``; its own EOS is id 0.

The teacher is a Hugging Face model folder, ``<pair folder>/teacher-own-format``, with a ``manifest.json``,
built after the pair (built or reused first). The manifest holds a hash of the settings, of the pair's
sources and of this module (a second call with the same settings returns at once), and the teacher's
greedy accuracy on the pair's held-out problems in its own format and in the student's: the student's
ChatML prompt ids fed as they are, either EOS (0 or 2) ending a response, decoded and judged as usual.
Rebuilding the pair replaces the pair's folder, this teacher with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ta_opd_verl.tiny.build import (
    MANIFEST_NAME,
    BuildSettings,
    TinyPair,
    build_tiny_pair,
    check_out_dir,
    heldout_problems,
    param_count,
    pinned_threads,
    publish,
    settings_hash,
    train_teacher,
)
from ta_opd_verl.tiny.evaluate import greedy_accuracy
from ta_opd_verl.tiny.tokenizer import R1_STYLE, with_chat_format

FOLDER_NAME = "teacher-own-format"
MANIFEST_KIND = "ta_opd_tiny_teacher_own_format"
# Bump when the folder's layout or the meaning of a manifest field changes; source edits are hashed anyway.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TeacherOwnFormat:
    """A built teacher: ``root`` (its model folder), the ``pair`` it belongs to, its ``manifest``."""

    root: Path
    pair: TinyPair
    manifest: dict = field(repr=False)


def own_format_hash(settings: BuildSettings) -> str:
    """sha256 over the pair's settings hash (settings and the pair's sources), this module and the version."""
    digest = hashlib.sha256()
    digest.update(settings_hash(settings).encode())
    digest.update(f"format={FORMAT_VERSION}".encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def load_cached(root: Path, pair: TinyPair, settings: BuildSettings) -> TeacherOwnFormat | None:
    """The teacher in ``root`` if its manifest matches ``settings`` and its weights are there, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("kind") != MANIFEST_KIND or manifest.get("settings_hash") != own_format_hash(settings):
        return None
    if not all((root / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        return None
    return TeacherOwnFormat(root, pair, manifest)


def build_teacher_own_format(
    out_dir=None, *, force: bool = False, seed: int = 0, quiet: bool = False, **overrides
) -> TeacherOwnFormat:
    """Build or reuse the pair in ``out_dir`` (`build_tiny_pair`, same arguments), then build the teacher
    in ``<pair>/teacher-own-format``, or return the cached one. ``force`` rebuilds the teacher only.
    Raises `TinyBuildError` for an unusable folder or unknown settings."""
    pair = build_tiny_pair(out_dir, seed=seed, quiet=quiet, **overrides)
    settings = BuildSettings(seed=seed, **overrides)
    root = pair.root / FOLDER_NAME
    if not force and (cached := load_cached(root, pair, settings)) is not None:
        if not quiet:
            print(f"tiny teacher in its own format: cache hit at {root}", flush=True)
        return cached
    check_out_dir(root, force, MANIFEST_KIND)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.building-", dir=pair.root))
    try:
        manifest = _build_into(staging, pair, settings, quiet)
        publish(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    built = TeacherOwnFormat(root, pair, manifest)
    if not quiet:
        print(summary(built), flush=True)
    return built


def _build_into(staging: Path, pair: TinyPair, settings: BuildSettings, quiet: bool) -> dict:
    """Train the teacher on its own format, evaluate it in both formats, write the folder and manifest."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    student_tokenizer = AutoTokenizer.from_pretrained(pair.student)
    tokenizer = with_chat_format(student_tokenizer, R1_STYLE)
    evaluation, val = heldout_problems(settings)
    excluded = {p.prompt for p in evaluation} | {p.prompt for p in val}
    with pinned_threads(1):
        model, history = train_teacher(
            tokenizer, settings, excluded, val, quiet, chat_format=R1_STYLE, name=FOLDER_NAME
        )
    train_seconds = time.perf_counter() - started
    evals = {
        "own_format": greedy_accuracy(model, tokenizer, evaluation, chat_format=R1_STYLE),
        # The student's prompt ids as they are; its EOS (2) and the teacher's (0) both end a response.
        "student_format": greedy_accuracy(
            model,
            student_tokenizer,
            evaluation,
            stop_ids=(student_tokenizer.eos_token_id, tokenizer.eos_token_id),
        ),
    }
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest = {
        "kind": MANIFEST_KIND,
        "format_version": FORMAT_VERSION,
        "settings_hash": own_format_hash(settings),
        "settings": dataclasses.asdict(settings),
        "torch_version": torch.__version__,
        "vocab_size": len(tokenizer),
        "special_tokens": list(R1_STYLE.special_tokens),
        "params": param_count(model),
        "steps": settings.teacher_steps,
        "history": history,
        "eval": evals,
        "pair_teacher_eval": pair.manifest["teacher"]["eval"],
        "eval_problems": len(evaluation),
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return json.loads(json.dumps(manifest))


def summary(built: TeacherOwnFormat) -> str:
    m = built.manifest
    return (
        f"tiny teacher in its own (R1-style) chat format at {built.root}\n"
        f"  {m['params']:,} params, {m['steps']} steps; greedy accuracy on {m['eval_problems']} held-out "
        f"problems: own format {m['eval']['own_format']['accuracy']:.3f}, the student's format "
        f"{m['eval']['student_format']['accuracy']:.3f} (the pair's teacher: "
        f"{m['pair_teacher_eval']['accuracy']:.3f})\n"
        f"  built in {m['build_seconds']}s"
    )
