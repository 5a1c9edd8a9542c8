"""Rank body for tests/test_fsdp_teacher_engine.py (a module of its own: spawned processes import it by path).

Builds verl 0.9.1's actor ``TrainingWorker`` (FSDP2 on gloo, no Ray) as tests/fsdp_engine_worker.py does,
with the tiny pair's student, installs TA-OPD's loss with ``ta_opd.teacher=fsdp`` and runs ``infer_batch``
(what the actor's ``compute_log_prob`` calls) with the flags TA-OPD's trainer sets for the scoring forward.
The processor loads the tiny teacher in the same process on the first micro-batch, sharded with FSDP2
over both ranks.
"""

from __future__ import annotations

import torch
from verl_rank import actor_training_worker, start_cpu_rank

WORLD_SIZE = 2
MICRO_BATCH_SIZE = 2  # 4 sequences per rank -> 2 scoring micro-batches per rank
TOPK, K = 16, 8
PROMPT_LENGTHS = (4, 6, 3, 5, 7, 4, 5, 3)
RESPONSE_LENGTHS = (6, 3, 8, 5, 4, 7, 2, 6)


def make_sequences(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [
        torch.randint(3, vocab, (prompt + response,), generator=generator)
        for prompt, response in zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)
    ]


def _overrides(student: str, teacher: str) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={student}",
        "+actor_rollout_ref.model.load_tokenizer=false",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        # fp32 compute, so the comparison with an unsharded float32 reference can be tight.
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        f"distillation.distillation_loss.topk={TOPK}",
        f"distillation.distillation_loss.ta_opd.k={K}",
        "distillation.distillation_loss.ta_opd.teacher=fsdp",
        f"distillation.distillation_loss.ta_opd.teacher_path={teacher}",
        "distillation.distillation_loss.ta_opd.compatibility=exact",
        # DistillationConfig validates verl's teacher entry while enabled; the fsdp teacher never loads it.
        "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher",
    ]


def rank_main(rank: int, port: int, student: str, teacher: str, sequences, report_path: str) -> None:
    start_cpu_rank(rank, WORLD_SIZE, port)
    from tensordict import TensorDict
    from torch.distributed.fsdp import FSDPModule
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass

    from ta_opd_verl.loss import TAOPDLossFunction
    from ta_opd_verl.protocol import PHASE_KEY, SCORE_PHASE
    from ta_opd_verl.teachers import colocated, resolve_teacher

    config, actor, worker = actor_training_worker(
        "ta_opd_cpu", _overrides(student, teacher), MICRO_BATCH_SIZE
    )
    worker.set_loss_fn(
        TAOPDLossFunction(actor, omega_conf_to_dataclass(config.distillation), resolve_teacher(config))
    )

    rows = range(rank * len(sequences) // WORLD_SIZE, (rank + 1) * len(sequences) // WORLD_SIZE)
    mine = [sequences[row] for row in rows]

    def nested(values):
        return torch.nested.as_nested_tensor(values, layout=torch.jagged)

    data = TensorDict(
        {
            "input_ids": nested(mine),
            "position_ids": nested([torch.arange(s.numel()) for s in mine]),
            "loss_mask": nested([torch.ones(RESPONSE_LENGTHS[row], dtype=torch.int64) for row in rows]),
        },
        batch_size=len(mine),
    )
    # The flags TA-OPD's trainer sets in `_compute_old_log_prob` (ta_opd_verl/trainer.py).
    tu.assign_non_tensor(
        data,
        **{
            "calculate_entropy": True,
            "compute_loss": True,
            "distillation_use_topk": True,
            PHASE_KEY: SCORE_PHASE,
            "temperature": 1.0,
            "global_token_num": [s.numel() for s in mine],
        },
    )
    output = worker.infer_batch(data)
    (loaded,) = colocated._LOADED.values()
    embedding = loaded.model.get_input_embeddings().weight
    report = {
        "rows": list(rows),
        # TrainingWorker._postprocess_output: the model-output fields, nested by sequence, in batch order.
        "outputs": {
            key: [row.clone() for row in output[key].unbind()]
            for key in output.keys()
            if isinstance(output[key], torch.Tensor) and output[key].is_nested
        },
        "teacher_is_fsdp2": isinstance(loaded.model, FSDPModule),
        "teacher_embedding_local_rows": embedding.to_local().shape[0],
        "teacher_embedding_rows": embedding.shape[0],
    }
    torch.save(report, report_path.format(rank=rank))
    torch.distributed.destroy_process_group()
