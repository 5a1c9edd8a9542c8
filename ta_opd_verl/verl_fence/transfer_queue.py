"""verl 0.9.1's TransferQueue batches on the driver: reading and writing per-sample fields, and what a
batch's keys and tags mean.

What we lean on (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``AgentLoopWorkerTQ._agent_loop_postprocess`` (``verl/trainer/ppo/v1/agent_loop_tq.py``) writes keys
  ``{uid}_{session}_{index}``, ``uid`` drawn with ``uuid4`` per run: `rollout_ids`.
- ``upsample_batch_to_divisible_size`` (``verl/trainer/ppo/padding_utils.py``) tags the padding rows that
  ``_balance_batch`` adds with ``is_padding``: `not_padding_rows`.
- ``response_from_nested`` / ``response_to_nested`` (``verl/workers/utils/padding.py``) cut a per-token
  field of the whole sequence to the response and back.
"""

from __future__ import annotations

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.workers.utils.padding import response_from_nested, response_to_nested

from ta_opd_verl.verl_fence import FINGERPRINTS

__all__ = [
    "not_padding_rows",
    "read_fields",
    "read_per_sample",
    "response_from_nested",
    "response_to_nested",
    "rollout_ids",
    "write_fields",
]

FINGERPRINTS.update(
    {
        "verl.trainer.ppo.padding_utils:upsample_batch_to_divisible_size": "65c6774fbd9dad48",
        "verl.trainer.ppo.v1.agent_loop_tq:AgentLoopWorkerTQ._agent_loop_postprocess": "523edacbff73640d",
        "verl.workers.utils.padding:response_from_nested": "41a4bf54aa981c09",
        "verl.workers.utils.padding:response_to_nested": "a2272158cd69af64",
    }
)


def read_fields(batch, fields: list[str]) -> TensorDict:
    return tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)


def read_per_sample(batch, field: str) -> list:
    """A per-sample field of ``batch`` as one Python object per row (a dataset column such as verl's
    ``raw_prompt`` chat messages, or ``extra_fields``), in the batch's row order."""
    value = read_fields(batch, [field])[field]
    return value.tolist() if hasattr(value, "tolist") else list(value)


def write_fields(batch, fields: TensorDict | dict):
    """Store per-sample fields of ``batch`` in TransferQueue; returns the batch's updated meta."""
    if not isinstance(fields, TensorDict):
        fields = TensorDict(fields, batch_size=len(batch.keys))
    return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)


def not_padding_rows(batch) -> torch.Tensor:
    """Bool ``[B]``: the rows that are real samples, not the padding rows batch balancing added."""
    return torch.tensor([not tag.get("is_padding", False) for tag in batch.tags], dtype=torch.bool)


def rollout_ids(batch) -> list[str]:
    """Per row, the ``{session}_{index}`` part of its TransferQueue key (the per-run ``uid`` dropped); the
    whole key where it has another shape."""
    ids = []
    for key in batch.keys:
        parts = key.rsplit("_", 2)
        ids.append("_".join(parts[1:]) if len(parts) == 3 else key)
    return ids
