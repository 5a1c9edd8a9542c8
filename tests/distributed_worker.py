"""Rank body for tests/test_distributed_aggregation.py (a module of its own: spawned processes import it)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ta_opd_verl.batch_selection import select_rollout_batch
from ta_opd_verl.loss import masked_aggregate
from ta_opd_verl.teachability import TokenStatistics

SAMPLES, POSITIONS, RATIO = 8, 6, 0.25


def make_batch():
    generator = torch.Generator().manual_seed(11)
    raw_kl = torch.rand(SAMPLES, POSITIONS, generator=generator)
    stats = TokenStatistics(
        raw_kl, torch.rand(SAMPLES, POSITIONS, generator=generator), torch.zeros(SAMPLES, POSITIONS)
    )
    valid = torch.ones(SAMPLES, POSITIONS, dtype=torch.bool)
    valid[3, 4:] = False
    per_token = torch.randn(SAMPLES, POSITIONS, generator=generator)
    return stats, valid, per_token


def rank_main(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stats, valid, per_token = make_batch()
    ids = [f"s{index:02d}" for index in range(SAMPLES)]
    mask, _ = select_rollout_batch(
        stats,
        valid,
        ids,
        selector="raw_kl",
        ratio=RATIO,
        min_keep_per_sample=0,
        q_low=0.05,
        q_high=0.95,
        seed=0,
        global_step=1,
    )
    # Rank r holds samples [4r, 4r + 4), fed as two micro-batches of 2 samples.
    rows = slice(rank * SAMPLES // world, (rank + 1) * SAMPLES // world)
    local_mask, local_loss = mask[rows], per_token[rows]
    batch_num_tokens = torch.tensor(float(local_mask.sum()))
    dist.all_reduce(batch_num_tokens, op=dist.ReduceOp.SUM)
    objective = torch.zeros(())
    for micro in (slice(0, 2), slice(2, 4)):
        objective = objective + masked_aggregate(
            local_loss[micro],
            local_mask[micro],
            "token-mean",
            dp_size=world,
            batch_num_selected=float(batch_num_tokens),
            global_batch_size=SAMPLES,
        )
    dist.all_reduce(objective, op=dist.ReduceOp.AVG)  # what gradient averaging over ranks amounts to
    if rank == 0:
        results.put((mask, float(objective)))
    dist.destroy_process_group()
