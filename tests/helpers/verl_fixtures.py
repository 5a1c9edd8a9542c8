"""Shared helpers for tests that call verl code directly: composed configs and synthetic micro-batches in
the exact layout verl's FSDP engine hands a loss function (nested tensors, one row per position)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides or [])


def nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def synthetic_micro_batch(
    prompt_lengths: list[int],
    response_lengths: list[int],
    *,
    vocab: int,
    topk: int,
    seed: int = 0,
    selection: list[list[int]] | None = None,
) -> tuple[TensorDict, dict, dict]:
    """A micro-batch as verl's engine passes it to the loss, with the teacher rows in TA-OPD's layout
    (top-K ids and log-probs, then the sampled token). Returns (data, model_output, raw) where ``raw``
    holds the per-sample full-sequence tensors for independent reference computations."""
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(seed)
    prompts, responses, log_probs, teacher_ids, teacher_logprobs = [], [], [], [], []
    old_log_probs, response_masks, loss_masks = [], [], []
    for index, (p_len, r_len) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        sequence = torch.randint(0, vocab, (p_len + r_len,), generator=generator)
        prompts.append(sequence[:p_len])
        responses.append(sequence[p_len:])
        log_probs.append(-torch.rand(p_len + r_len, generator=generator) * 3)
        ids = torch.stack([torch.randperm(vocab, generator=generator)[:topk] for _ in range(p_len + r_len)])
        logprobs = torch.sort(
            -torch.rand(p_len + r_len, topk, generator=generator) * 4, dim=-1, descending=True
        )[0]
        sampled = -torch.rand(p_len + r_len, 1, generator=generator) * 6
        next_tokens = torch.cat([sequence[1:], torch.zeros(1, dtype=torch.long)]).unsqueeze(-1)
        teacher_ids.append(torch.cat([ids, next_tokens], dim=-1))
        teacher_logprobs.append(torch.cat([logprobs, sampled], dim=-1))
        old_log_probs.append(-torch.rand(r_len, generator=generator) * 3)
        response_masks.append(torch.ones(r_len, dtype=torch.int64))
        mask = torch.ones(r_len, dtype=torch.int64)
        if selection is not None:
            mask = torch.zeros(r_len, dtype=torch.int64)
            mask[selection[index]] = 1
        loss_masks.append(mask)
    data = TensorDict(
        {
            "input_ids": nested([torch.cat(pair) for pair in zip(prompts, responses, strict=True)]),
            "prompts": nested(prompts),
            "responses": nested(responses),
            "teacher_ids": nested(teacher_ids),
            "teacher_logprobs": nested(teacher_logprobs),
            "old_log_probs": nested(old_log_probs),
            "response_mask": nested(response_masks),
            "loss_mask": nested(loss_masks),
        },
        batch_size=len(prompt_lengths),
    )
    tu.assign_non_tensor(
        data,
        dp_size=1,
        batch_num_tokens=int(sum(int(m.sum()) for m in loss_masks)),
        global_batch_size=len(prompt_lengths),
    )
    model_output = {"log_probs": nested(log_probs)}
    raw = {"log_probs": log_probs, "teacher_logprobs": teacher_logprobs, "teacher_ids": teacher_ids}
    return data, model_output, raw


def teacher_with_swapped_tokens(teacher: Path, out: Path) -> Path:
    """A copy of a tiny-pair teacher folder whose tokenizer swaps two regular tokens' ids: a vocabulary
    the pre-flight check must refuse."""
    import json
    import shutil

    shutil.copytree(teacher, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[40:42]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out


def ta_opd_loss_function(config):
    """The loss callable TA-OPD's trainer would send to the actor workers for a composed config."""
    from verl.utils.config import omega_conf_to_dataclass

    from ta_opd_verl.loss import TAOPDLossFunction
    from ta_opd_verl.teachers import resolve_teacher

    return TAOPDLossFunction(
        omega_conf_to_dataclass(config.actor_rollout_ref.actor),
        omega_conf_to_dataclass(config.distillation),
        resolve_teacher(config),
    )


class InMemoryTransferQueue:
    """TransferQueue's key-value calls (``kv_batch_get`` / ``kv_batch_put``) over a dict of per-sample
    fields, for driver code tested without Ray; `install` puts it where `ta_opd_verl.verl_fence` calls."""

    def __init__(self, fields: dict):
        self.fields = dict(fields)

    def kv_batch_get(self, keys, partition_id, select_fields):
        from tensordict import TensorDict

        return TensorDict({name: self.fields[name] for name in select_fields}, batch_size=len(keys))

    def kv_batch_put(self, keys, partition_id, fields):
        from transfer_queue import KVBatchMeta

        self.fields.update(dict(fields.items()))
        return KVBatchMeta(
            keys=keys, tags=[{}] * len(keys), partition_id=partition_id, fields=sorted(self.fields)
        )

    def install(self, monkeypatch) -> InMemoryTransferQueue:
        from ta_opd_verl.verl_fence import transfer_queue

        monkeypatch.setattr(transfer_queue.tq, "kv_batch_get", self.kv_batch_get)
        monkeypatch.setattr(transfer_queue.tq, "kv_batch_put", self.kv_batch_put)
        return self


def refused_main_ppo(config_name: str, overrides: list[str], run_dir: Path) -> tuple[int, str]:
    """Run ``python -m verl.trainer.main_ppo`` with one of our configs on the CPU runtime, expecting a
    refusal: (exit status, stdout + stderr), after checking that Ray never started."""
    import subprocess

    from ta_opd_verl.cli.train import cpu_environment, main_ppo_command

    command = main_ppo_command(config_name, [*overrides, f"hydra.run.dir={run_dir / 'hydra'}"])
    result = subprocess.run(
        command, capture_output=True, text=True, env=cpu_environment(), cwd=run_dir, timeout=300
    )
    output = result.stdout + result.stderr
    assert "Started a local Ray instance" not in output and "TaskRunnerV1" not in output, output[-2000:]
    return result.returncode, output


def run_update(loss_fn, logits: torch.Tensor, data, offsets: torch.Tensor):
    """The update as verl's engine runs it for a logits loss: the processor on the packed student logits,
    its per-token output handed back as the model output, then the loss. Returns (per_token, loss,
    metrics)."""
    from ta_opd_verl.protocol import REVERSE_KL_FIELD

    per_token = loss_fn(student_logits=logits, data=data)[REVERSE_KL_FIELD]
    model_output = {REVERSE_KL_FIELD: torch.nested.nested_tensor_from_jagged(per_token[0], offsets)}
    loss, metrics = loss_fn(data=data, model_output=model_output)
    return per_token, loss, metrics


def selected_packed_rows(offsets: torch.Tensor, prompt_lengths: list[int], selection: list[list[int]]):
    """The packed-logit rows that score the selected response positions: row ``prompt + t - 1`` of each
    sequence scores its response token t."""
    rows = [int(offsets[b]) + prompt_lengths[b] - 1 + t for b, ts in enumerate(selection) for t in ts]
    return torch.tensor(rows)
