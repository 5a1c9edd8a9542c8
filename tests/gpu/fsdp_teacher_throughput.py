"""Per-token cost of TA-OPD's colocated-teacher design (a), torch + transformers only.

Design (a) hosts the teacher as a forward-only model on the training GPUs (like verl's reference model,
an FSDP log-prob worker colocated with the actor), so the teacher's full logits are at hand: the teacher's
own top-K, its log-probs at the student's top-K ids (exact C, Eq. 10) and at the sampled token all come
from one forward. This script times that per-token work on one device, without verl, Ray or vLLM:

  (i)  student side: student forward (logits over the vocabulary), the student's top-k ids, and TA-OPD's
       scoring (``ta_opd_verl.teachability.token_statistics``: D, exact C, full-vocabulary H);
  (ii) teacher side: teacher forward, then per position the teacher's top-K ids and log-probs, its
       log-probs at the student's top-k ids and at the sampled token.

Models are randomly initialised with the published Qwen3 shapes (the cost does not depend on the weights):
student = Qwen3-1.7B, teacher = Qwen3-4B, bf16, sdpa attention. What is simplified: one device, no FSDP
sharding or offload (on one GPU FSDP only adds its wrapper), inference mode throughout, random token ids.
The published configs pad the embedding to 151,936 rows; the default vocabulary here is the tokenizer's
151,669 tokens (``--vocab 151936`` gives the padded width).

    # the lent GPU machine (no install; writes $OUT/gpu_check.json):
    PYTHONPATH=. python tests/gpu/fsdp_teacher_throughput.py --out $OUT
    # a laptop CPU, tiny shapes (what tests/gpu/test_fsdp_teacher_throughput.py runs):
    PYTHONPATH=. python tests/gpu/fsdp_teacher_throughput.py --preset tiny --device cpu

Output: one JSON object on stdout (and in ``<out>/gpu_check.json``): timings per phase (median of
``--repeats`` after one warm-up), tokens/s per side, peak device memory per side (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# The repository root, so `ta_opd_verl.teachability` (torch only) imports without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ta_opd_verl.teachability import teacher_entries, token_statistics  # noqa: E402
from ta_opd_verl.teacher_head import logit_log_prob_blocks  # noqa: E402

REPORT_NAME = "gpu_check.json"
QWEN3_VOCAB = 151_669  # tokens of the Qwen2/2.5/3 tokenizer

# Published Qwen3 shapes (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-4B; both tie their embeddings).
SHAPES = {
    "qwen3-1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "qwen3-4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    # For the CPU test of the code path: a few seconds on 2 cores.
    "tiny-student": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
    "tiny-teacher": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
    ),
}
PRESETS = {
    "full": dict(student="qwen3-1.7b", teacher="qwen3-4b", vocab=QWEN3_VOCAB, batch=4, seq_len=2048),
    "tiny": dict(student="tiny-student", teacher="tiny-teacher", vocab=1000, batch=2, seq_len=24),
}


def build_model(shape: str, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A randomly initialised Qwen3 causal LM, created directly on ``device`` in ``dtype``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=40960, **SHAPES[shape]
    )
    config._attn_implementation = "sdpa"
    with _default_dtype(dtype), torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.inference_mode()
class PhaseTimer:
    """Wall time and peak device memory of named phases; CUDA work is synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, list[float]] = {}
        self.peak_bytes: dict[str, int] = {}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._synchronize()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        yield
        self._synchronize()
        self.seconds.setdefault(name, []).append(time.perf_counter() - started)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    student = build_model(args.student, args.vocab, dtype, device)
    weights_after_student = _allocated(device)
    teacher = build_model(args.teacher, args.vocab, dtype, device)
    weights = _allocated(device)

    tokens = args.batch * args.seq_len
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    context, sampled_ids = input_ids[:, :-1], input_ids[:, 1:].reshape(-1)
    timer = PhaseTimer(device)
    statistics_out = None
    for repeat in range(args.repeats + 1):
        if repeat == 1:  # the first pass is a warm-up (kernel selection, allocator growth)
            timer.seconds.clear()
        with torch.inference_mode():
            # (i) student side
            with timer.phase("student_forward"):
                student_logits = student(input_ids=context).logits.reshape(tokens, args.vocab)
                student_topk_ids = torch.topk(student_logits, args.k, dim=-1).indices
            # (ii) teacher side
            with timer.phase("teacher_forward"):
                teacher_logits = teacher(input_ids=context).logits.reshape(tokens, args.vocab)
            with timer.phase("teacher_gathers"):
                top_ids, top_logprobs, at_student_topk, at_sampled = teacher_entries(
                    logit_log_prob_blocks(teacher_logits, vocab=args.vocab, block_rows=args.chunk_rows),
                    student_topk_ids,
                    sampled_ids,
                    args.teacher_topk,
                )
            del teacher_logits
            # (i) student side, continued: D, exact C and H from the teacher's answers, with the library's
            # default block size (tuned on CPU) and with --chunk-rows rows per block.
            for phase, chunk_size in (("scoring", None), ("scoring_chunk_rows", args.chunk_rows)):
                with timer.phase(phase):
                    statistics_out = token_statistics(
                        student_logits,
                        top_ids,
                        top_logprobs,
                        k=args.k,
                        teacher_logprobs_at_student_topk=at_student_topk,
                        entropy_mode="full",
                        chunk_size=chunk_size,
                    )
            logits_dtype = str(student_logits.dtype).removeprefix("torch.")
            del student_logits
    assert statistics_out is not None and all(bool(torch.isfinite(s).all()) for s in statistics_out)
    assert bool(torch.isfinite(at_sampled).all())

    student_side_s = timer.median("student_forward") + timer.median("scoring")
    teacher_side_s = timer.median("teacher_forward") + timer.median("teacher_gathers")
    gib = 2.0**30
    report = {
        "design": "a: colocated forward-only teacher with full logits (exact C, sampled-token log-prob)",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "dtype": args.dtype,
        "logits_dtype": logits_dtype,
        "student": {"shape": args.student, "parameters": _parameters(student), **SHAPES[args.student]},
        "teacher": {"shape": args.teacher, "parameters": _parameters(teacher), **SHAPES[args.teacher]},
        "vocab": args.vocab,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_pass": tokens,
        "k": args.k,
        "teacher_topk": args.teacher_topk,
        "chunk_rows": args.chunk_rows,
        "repeats": args.repeats,
        "seconds": {name: timer.median(name) for name in timer.seconds},
        "student_side_seconds": student_side_s,
        "teacher_side_seconds": teacher_side_s,
        # (i) and (ii) as throughputs; the last one is both sides back to back on one device.
        "student_side_tokens_per_s": tokens / student_side_s,
        "teacher_side_tokens_per_s": tokens / teacher_side_s,
        "scoring_tokens_per_s": tokens / timer.median("scoring"),
        "scoring_chunk_rows_tokens_per_s": tokens / timer.median("scoring_chunk_rows"),
        "teacher_gathers_tokens_per_s": tokens / timer.median("teacher_gathers"),
        "both_sides_tokens_per_s": tokens / (student_side_s + teacher_side_s),
        "peak_memory_gib": None,
        "notes": [
            "student side = student_forward (logits + top-k ids) + scoring (library default block size)",
            "teacher side = teacher_forward + teacher_gathers; its peak memory includes the student's "
            "logits, held for scoring",
        ],
    }
    if device.type == "cuda":
        peaks = timer.peak_bytes
        report["peak_memory_gib"] = {
            "weights_student": weights_after_student / gib,
            "weights_both": weights / gib,
            "student_side": max(peaks["student_forward"], peaks["scoring"], peaks["scoring_chunk_rows"])
            / gib,
            "teacher_side": max(peaks["teacher_forward"], peaks["teacher_gathers"]) / gib,
            "device_total": torch.cuda.get_device_properties(device).total_memory / gib,
        }
    return report


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    # Any of these overrides the preset.
    parser.add_argument("--student", choices=sorted(SHAPES))
    parser.add_argument("--teacher", choices=sorted(SHAPES))
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    # TA-OPD's defaults: support k = 16; the teacher returns its top 32 (verl's distillation_loss.topk).
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--teacher-topk", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=2048, help="rows per float32 teacher log-softmax")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=os.environ.get("OUT"), help=f"folder for {REPORT_NAME} (default: $OUT)"
    )
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = measure(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_NAME).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
