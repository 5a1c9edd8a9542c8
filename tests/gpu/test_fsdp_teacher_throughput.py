"""tests/gpu/fsdp_teacher_throughput.py: the code path and its JSON on CPU at tiny shapes (always), the
full-size measurement on CUDA (skipped without it).

The script must run where only torch and transformers exist (the lent GPU machine has no verl, Ray or
vLLM): the CPU test runs it in a subprocess in which importing those three fails.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "fsdp_teacher_throughput.py"
REPORT_KEYS = {
    "design",
    "device",
    "device_name",
    "torch",
    "transformers",
    "dtype",
    "logits_dtype",
    "student",
    "teacher",
    "vocab",
    "batch",
    "seq_len",
    "tokens_per_pass",
    "k",
    "teacher_topk",
    "chunk_rows",
    "repeats",
    "seconds",
    "student_side_seconds",
    "teacher_side_seconds",
    "student_side_tokens_per_s",
    "teacher_side_tokens_per_s",
    "scoring_tokens_per_s",
    "scoring_chunk_rows_tokens_per_s",
    "teacher_gathers_tokens_per_s",
    "both_sides_tokens_per_s",
    "peak_memory_gib",
    "notes",
}
PHASES = {"student_forward", "teacher_forward", "teacher_gathers", "scoring", "scoring_chunk_rows"}
# Runs the script as __main__ with verl, Ray and vLLM unimportable (a None entry in sys.modules makes
# `import x` raise ImportError), from a folder outside the repository and without PYTHONPATH.
WITHOUT_VERL = """
import runpy, sys
for name in ("verl", "ray", "vllm"):
    sys.modules[name] = None
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _load_script():
    spec = importlib.util.spec_from_file_location("fsdp_teacher_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(arguments: list[str], tmp_path: Path, timeout: int) -> dict:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_VERL, str(SCRIPT), *arguments, "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    written = json.loads((out / "gpu_check.json").read_text())
    assert json.loads(completed.stdout) == written
    return written


def _check_report(report: dict) -> None:
    assert set(report) == REPORT_KEYS
    assert set(report["seconds"]) == PHASES
    assert all(seconds > 0 for seconds in report["seconds"].values())
    tokens = report["tokens_per_pass"]
    assert tokens == report["batch"] * report["seq_len"]
    assert report["student_side_tokens_per_s"] == pytest.approx(
        tokens / (report["seconds"]["student_forward"] + report["seconds"]["scoring"])
    )
    assert report["teacher_side_tokens_per_s"] == pytest.approx(
        tokens / (report["seconds"]["teacher_forward"] + report["seconds"]["teacher_gathers"])
    )
    assert report["both_sides_tokens_per_s"] < min(
        report["student_side_tokens_per_s"], report["teacher_side_tokens_per_s"]
    )


def test_tiny_run_on_cpu_without_verl_ray_or_vllm_writes_the_report(tmp_path):
    report = _run(["--preset", "tiny", "--device", "cpu", "--repeats", "1"], tmp_path, timeout=180)
    _check_report(report)
    assert report["device"] == "cpu" and report["peak_memory_gib"] is None
    assert report["vocab"] == 1000 and report["dtype"] == "bfloat16"
    assert report["student"]["shape"] == "tiny-student" and report["teacher"]["shape"] == "tiny-teacher"


def test_full_shapes_have_the_published_qwen3_sizes():
    # Qwen's model cards: Qwen3-1.7B has 1.7B parameters (1.4B without embeddings), Qwen3-4B 4.0B (3.6B).
    script = _load_script()
    for shape, total, non_embedding in (("qwen3-1.7b", 1.7e9, 1.4e9), ("qwen3-4b", 4.0e9, 3.6e9)):
        model = script.build_model(shape, script.QWEN3_VOCAB, torch.bfloat16, torch.device("meta"))
        parameters = sum(parameter.numel() for parameter in model.parameters())
        embedding = model.get_input_embeddings().weight.numel()
        assert embedding == script.QWEN3_VOCAB * script.SHAPES[shape]["hidden_size"]
        assert round(parameters / 1e8) == round(total / 1e8), shape
        assert round((parameters - embedding) / 1e8) == round(non_embedding / 1e8), shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_on_cuda(tmp_path):
    report = _run(["--preset", "full"], tmp_path, timeout=900)
    _check_report(report)
    assert report["device"].startswith("cuda") and report["vocab"] == 151_669
    memory = report["peak_memory_gib"]
    assert (
        0
        < memory["weights_student"]
        < memory["weights_both"]
        < memory["teacher_side"]
        < memory["device_total"]
    )
