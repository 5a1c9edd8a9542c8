"""verl 0.9.1's actor worker and FSDP engine, as TA-OPD's loss callable and colocated teacher use them.

What we lean on, each checked by a fingerprint (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``TrainingWorker.set_loss_fn`` (``verl/workers/engine_workers.py``, ONE_TO_ALL): the trainer replaces the
  actor's loss callable with ours.
- ``FSDPEngineWithLMHead.prepare_model_outputs`` (``verl/workers/engine/fsdp/transformer_impl.py``) calls
  the loss callable as a logits processor, ``fn(student_logits=(1, nnz, V), data=micro_batch)``, when the
  micro-batch's non-tensor flag ``distillation_use_topk`` is set, and stores each returned ``(1, nnz)``
  tensor as ``model_output[key]`` (nested by sequence). Logits arrive already divided by the temperature,
  in packed order (sequence after sequence, padding dropped); ``input_ids`` / ``position_ids`` are nested;
  with ``use_remove_padding`` the student saw the packed sequence with ``position_ids`` and no attention
  mask, without it right-padded rows with ``build_attention_mask_from_nested``.
- ``FSDPEngine.forward_backward_batch`` sets ``batch_num_tokens`` to the sum of ``loss_mask`` over the
  global mini-batch (all data-parallel ranks): with the selection in ``loss_mask`` it is the number of
  SELECTED positions, the denominator of the paper's Eq. 7 (`batch_info`).
- ``distillation_loss`` (``verl/trainer/distillation/losses.py``): the ``pg_k1`` loss mirrors it (k1 of
  the sampled token as the advantage of verl's policy loss) with the selection as the response mask.
- ``create_device_mesh`` and ``apply_fsdp2`` wrap a forward-only model as verl wraps its reference policy
  (`shard_like_reference_policy`).
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
    DistillationLossSettings,
    register_distillation_loss,
)
from verl.trainer.ppo.core_algos import get_policy_loss_fn, kl_penalty
from verl.utils import tensordict_utils
from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor
from verl.workers.utils.padding import build_attention_mask_from_nested, no_padding_2_padding

from ta_opd_verl.verl_fence import FINGERPRINTS

__all__ = [
    "batch_info",
    "build_attention_mask_from_nested",
    "get_policy_loss_fn",
    "kl_penalty",
    "no_padding_2_padding",
    "non_tensor",
    "register_loss_mode",
    "sequence_parallel_size",
    "shard_like_reference_policy",
    "slice_for_sequence_parallel",
]

FINGERPRINTS.update(
    {
        "verl.workers.engine_workers:TrainingWorker.set_loss_fn": "e9304c63648d4e83",
        "verl.workers.engine.fsdp.transformer_impl:"
        "FSDPEngineWithLMHead.prepare_model_outputs": "5239f536e8f617e3",
        "verl.workers.engine.fsdp.transformer_impl:FSDPEngine.forward_backward_batch": "be92c8d155f0c179",
        "verl.trainer.distillation.losses:distillation_loss": "2e6165dd431f2741",
        "verl.workers.engine.fsdp.utils:create_device_mesh": "c88642ef6e66ea25",
        "verl.utils.fsdp_utils:apply_fsdp2": "bd9d609b3414e015",
    }
)


def non_tensor(data, key: str, default=None):
    """A micro-batch's non-tensor flag (what the driver put in ``batch.extra_info``)."""
    return tensordict_utils.get_non_tensor_data(data=data, key=key, default=default)


def batch_info(data, loss_scale_factor) -> dict:
    """The global mini-batch figures verl's engine writes into each micro-batch."""
    return {
        "dp_size": data["dp_size"],
        "batch_num_tokens": max(float(data["batch_num_tokens"]), 1.0),
        "global_batch_size": data["global_batch_size"],
        "loss_scale_factor": loss_scale_factor,
    }


def sequence_parallel_size() -> int:
    return get_ulysses_sequence_parallel_world_size()


def slice_for_sequence_parallel(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under Ulysses sequence parallelism each rank sees a slice of the sequence dimension; slice per-token
    tensors ``(1, nnz, ...)`` the same way (as verl's ``fsdp/losses.py`` does)."""
    if sequence_parallel_size() <= 1:
        return tensors
    return tuple(slice_input_tensor(t, dim=1) for t in tensors)


def register_loss_mode(name: str, loss_fn, *, use_topk: bool) -> None:
    """Register ``loss_fn`` as ``distillation.distillation_loss.loss_mode=name`` (idempotent)."""
    if name not in DISTILLATION_LOSS_REGISTRY:
        register_distillation_loss(DistillationLossSettings(names=[name], use_topk=use_topk))(loss_fn)


def shard_like_reference_policy(model: torch.nn.Module, fsdp_size: int, device: torch.device) -> None:
    """FSDP2-shard a frozen model on the actor's mesh, every decoder layer and the root, its parameter
    shards offloaded to the CPU between forwards on an accelerator (a no-op policy on CPU)."""
    # The FSDP engine's modules import the CPU-platform patch targets: loaded here, in the worker, once the
    # platform is set up (never while verl loads its plugins).
    from verl.utils.fsdp_utils import apply_fsdp2
    from verl.workers.engine.fsdp.utils import create_device_mesh

    world_size = torch.distributed.get_world_size()
    mesh = create_device_mesh(world_size=world_size, fsdp_size=fsdp_size)
    offload = CPUOffloadPolicy(pin_memory=True) if device.type != "cpu" else OffloadPolicy()
    apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": True, "offload_policy": offload}, {})
