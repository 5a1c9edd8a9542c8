"""Shared fixture and rank body for tests/test_fsdp_engine_aggregation.py (a module of its own: spawned
processes import it by path).

The rank body builds verl 0.9.1's actor training worker exactly as ``ActorRolloutRefWorker.init_model``
does (``verl/workers/engine_workers.py``): a ``TrainingWorkerConfig`` from the actor's dataclasses, then
``TrainingWorker`` -> ``EngineRegistry.new`` -> ``FSDPEngineWithLMHead`` (FSDP2,
``verl/workers/engine/fsdp/transformer_impl.py``), ``reset()`` (builds the model, FSDP2 wrap, optimizer),
``set_loss_fn``. It then runs ``train_mini_batch``: the method verl's ``update_actor`` calls, which splits
the rank's share into micro-batches, counts ``loss_mask`` over all ranks (``batch_num_tokens``) and runs
forward, loss, backward and the optimizer step. No Ray: ``TrainingWorker`` reads its rank from the
environment, as Ray's worker group would set it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from verl_rank import actor_training_worker, start_cpu_rank

# ---- the rollout batch (shared by the driver side of the test and the ranks) -------------------------
VOCAB = 48
TEACHER_TOPK = 6  # teacher entries per position, then one column for the sampled token
SUPPORT_K = 4  # ta_opd.k: the score's support; the loss uses the teacher's TEACHER_TOPK entries
PROMPT_LENGTHS = (3, 4, 2, 5, 3, 4, 2, 3)
RESPONSE_LENGTHS = (6, 4, 7, 5, 6, 3, 7, 8)  # 46 valid response positions
SAMPLES = len(PROMPT_LENGTHS)
WORLD_SIZE = 2
MICRO_BATCH_SIZE = 2  # 4 samples per rank -> 2 micro-batches per rank
RATIO = 0.25  # ceil(0.25 * 46) = 12 selected positions
# The positions given high D and C: the global top-12. Rank 0 (samples 0-3) holds 9 of them, rank 1 holds
# 3, and rank 1's first micro-batch (samples 4, 5) none, so a per-rank or per-micro-batch budget or
# denominator would give a different mask or a different loss.
PLANTED = {0: (0, 2, 5), 1: (1, 3), 2: (6,), 3: (0, 3, 4), 6: (2, 3, 6)}

# (loss, aggregation) cases run on one engine, one after the other (lr = 0 keeps the weights).
CASES = (
    ("reverse_kl_topk", "token-mean"),
    ("reverse_kl_topk", "seq-mean-token-mean"),
    ("reverse_kl_topk_tail", "token-mean"),
    ("pg_k1", "token-mean"),
)


def write_student(folder: Path) -> None:
    """A tiny random Qwen3 (tied embeddings, like the real small Qwen3 models), saved for verl to load."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(5)
        Qwen3ForCausalLM(config).save_pretrained(folder)


def make_rollout_batch() -> dict:
    """Token ids, teacher rows and injected per-position scores for the whole rollout batch."""
    generator = torch.Generator().manual_seed(3)
    longest = max(RESPONSE_LENGTHS)
    valid = torch.zeros(SAMPLES, longest, dtype=torch.bool)
    planted = torch.zeros(SAMPLES, longest, dtype=torch.bool)
    # Invalid positions carry the largest scores of all: selecting one would show at once.
    disagreement = torch.full((SAMPLES, longest), 5.0)
    compatibility = torch.full((SAMPLES, longest), 5.0)
    sequences, teacher_ids, teacher_logprobs = [], [], []
    for sample, (prompt_length, response_length) in enumerate(
        zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)
    ):
        valid[sample, :response_length] = True
        planted[sample, list(PLANTED.get(sample, ()))] = True
        # Planted positions get D and C in [0.6, 1), the others in [0, 0.5): Eq. 11 is monotone, so each
        # planted D̃ and C̃ is at least the largest unplanted one, and the product D̃·C̃ ranks every planted
        # position first whatever the batch quantiles are.
        for scores in (disagreement, compatibility):
            low = torch.rand(response_length, generator=generator) * 0.5
            high = 0.6 + torch.rand(response_length, generator=generator) * 0.4
            scores[sample, :response_length] = torch.where(planted[sample, :response_length], high, low)
        length = prompt_length + response_length
        sequence = torch.randint(2, VOCAB, (length,), generator=generator)
        sequences.append(sequence)
        # Row t describes token t + 1 (verl's layout): the teacher's top-K ids, then the sampled token.
        ids = torch.stack([torch.randperm(VOCAB, generator=generator)[:TEACHER_TOPK] for _ in range(length)])
        next_tokens = torch.cat([sequence[1:], sequence[:1]]).unsqueeze(-1)
        teacher_ids.append(torch.cat([ids, next_tokens], dim=-1))
        logprobs = torch.sort(
            -torch.rand(length, TEACHER_TOPK, generator=generator) * 4, dim=-1, descending=True
        )[0]
        # A teacher's top-K holds part of its mass (here 80%): the tail loss reads the rest.
        logprobs = logprobs - torch.logsumexp(logprobs, -1, keepdim=True) + math.log(0.8)
        sampled = -torch.rand(length, 1, generator=generator) * 6
        teacher_logprobs.append(torch.cat([logprobs, sampled], dim=-1))
    entropy = torch.rand(SAMPLES, longest, generator=generator)
    return {
        "sequences": sequences,
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs,
        "disagreement": disagreement,
        "compatibility": compatibility,
        "entropy": entropy,
        "valid": valid,
        "planted": planted,
    }


def global_selection(batch: dict) -> torch.Tensor:
    """The driver's selection over the whole batch, as TA-OPD's trainer makes it (``_select``)."""
    from ta_opd_verl.batch_selection import select_rollout_batch
    from ta_opd_verl.teachability import SelectionRules, TokenStatistics

    stats = TokenStatistics(batch["disagreement"], batch["compatibility"], batch["entropy"])
    mask, _ = select_rollout_batch(
        stats,
        batch["valid"],
        [f"uid{sample:02d}_0" for sample in range(SAMPLES)],
        selector="teachability",
        ratio=RATIO,
        rules=SelectionRules(),
        seed=0,
        global_step=1,
    )
    return mask


def expected_budget(batch: dict) -> int:
    return math.ceil(RATIO * int(batch["valid"].sum()))


# ---- one data-parallel rank ---------------------------------------------------------------------------
def _config_overrides(model_dir: str) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={model_dir}",
        # No tokenizer: the engine only needs the weights and the HF config.
        "+actor_rollout_ref.model.load_tokenizer=false",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={SAMPLES}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO_BATCH_SIZE}",
        # lr 0: the cases share one set of weights; clip_grad high: the captured gradient is the raw one.
        "actor_rollout_ref.actor.optim.lr=0.0",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        "actor_rollout_ref.actor.optim.clip_grad=1.0e9",
        # fp32 compute (verl's default is bf16 mixed precision), so the reference comparison can be tight.
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        f"distillation.distillation_loss.topk={TEACHER_TOPK}",
        f"distillation.distillation_loss.ta_opd.k={SUPPORT_K}",
        # DistillationConfig insists on a teacher; no teacher model is loaded here.
        "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher",
    ]


def _distillation_config(config, loss: str, aggregation: str):
    """The composed ``distillation`` block with one case's loss keys, as verl's dataclass."""
    import copy

    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    config = copy.deepcopy(config)
    OmegaConf.update(config, "distillation.distillation_loss.ta_opd.loss", loss)
    OmegaConf.update(config, "distillation.distillation_loss.ta_opd.aggregation", aggregation)
    OmegaConf.update(config, "distillation.distillation_loss.use_policy_gradient", loss == "pg_k1")
    return omega_conf_to_dataclass(config.distillation)


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def rank_batch(batch: dict, mask: torch.Tensor, old_log_probs: list[torch.Tensor], rows: range, flags: dict):
    """This rank's contiguous share of the batch in the layout verl's trainer hands ``update_actor``: nested
    tensors, teacher rows over the whole sequence, response fields (``loss_mask`` = the selection) over
    the response."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    fields: dict[str, list[torch.Tensor]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        fields.setdefault(key, []).append(value)

    for sample in rows:
        prompt_length, response_length = PROMPT_LENGTHS[sample], RESPONSE_LENGTHS[sample]
        sequence = batch["sequences"][sample]
        add("input_ids", sequence)
        add("position_ids", torch.arange(sequence.numel()))
        add("prompts", sequence[:prompt_length])
        add("responses", sequence[prompt_length:])
        add("response_mask", torch.ones(response_length, dtype=torch.int64))
        add("loss_mask", mask[sample, :response_length].to(torch.int64))
        add("teacher_ids", batch["teacher_ids"][sample])
        add("teacher_logprobs", batch["teacher_logprobs"][sample])
        add("old_log_probs", old_log_probs[sample])
    data = TensorDict({key: _nested(values) for key, values in fields.items()}, batch_size=len(rows))
    tu.assign_non_tensor(data, **flags)
    return data


def rank_main(
    rank: int, port: int, model_dir: str, batch: dict, mask: torch.Tensor, old_log_probs, report_path: str
) -> None:
    """Build verl's FSDP2 actor worker on this rank, train once per case, report losses and gradients."""
    start_cpu_rank(rank, WORLD_SIZE, port)
    from torch.distributed.fsdp import FSDPModule
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from ta_opd_verl.config import LOGITS_LOSSES
    from ta_opd_verl.loss import TAOPDLossFunction
    from ta_opd_verl.protocol import PHASE_KEY, TRAIN_PHASE
    from ta_opd_verl.teachers import resolve_teacher

    config, actor, worker = actor_training_worker(
        "ta_opd_cpu", _config_overrides(model_dir), MICRO_BATCH_SIZE
    )
    assert isinstance(worker.engine, FSDPEngineWithLMHead) and isinstance(worker.engine.module, FSDPModule)
    assert worker.engine.get_data_parallel_size() == WORLD_SIZE

    # FSDPEngine.optimizer_step clips, then steps; a step pre-hook sees the reduced gradient of every
    # parameter shard. full_tensor() gathers the shards (a collective: every rank runs the hook).
    names = {id(parameter): name for name, parameter in worker.engine.module.named_parameters()}
    captured: dict[str, torch.Tensor] = {}

    def capture_gradients(optimizer, *_):
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                captured[names[id(parameter)]] = parameter.grad.full_tensor().clone()

    worker.engine.optimizer.register_step_pre_hook(capture_gradients)

    reports = []
    rows = range(rank * SAMPLES // WORLD_SIZE, (rank + 1) * SAMPLES // WORLD_SIZE)
    for case in CASES:
        loss, aggregation = case
        worker.set_loss_fn(
            TAOPDLossFunction(actor, _distillation_config(config, loss, aggregation), resolve_teacher(config))
        )
        # The flags TA-OPD's trainer sets in `_update_actor` (ta_opd_verl/trainer.py).
        flags = {
            PHASE_KEY: TRAIN_PHASE,
            "distillation_use_topk": loss in LOGITS_LOSSES,
            "distillation_only": False,
            "calculate_entropy": False,
            "global_batch_size": SAMPLES,
            "mini_batch_size": SAMPLES,
            "epochs": 1,
            "seed": 42,
            "dataloader_kwargs": {"shuffle": False},
            "temperature": 1.0,
        }
        output = worker.train_mini_batch(rank_batch(batch, mask, old_log_probs, rows, flags))
        if rank == 0:
            # Per mini-batch (one here): verl's loss is the sum of the micro-batch losses averaged over
            # ranks (TrainingWorker._postprocess_output); grad_norm is the norm before clipping.
            metrics = tu.get(output, "metrics")
            reports.append(
                {
                    "case": case,
                    "loss": metrics["loss"],
                    "grad_norm": metrics["grad_norm"],
                    "gradients": dict(captured),
                }
            )
        captured.clear()
    if rank == 0:
        torch.save(reports, report_path)
    torch.distributed.destroy_process_group()
