"""Known per-position scores and losses over 2 data-parallel ranks (gloo) x 2 micro-batches each.

The driver selects over the whole batch; each rank then sees half the samples, split into micro-batches.
verl's engine counts ``loss_mask`` (our selection) over the mini-batch on all ranks
(``forward_backward_batch``: all_reduce SUM) and data parallelism averages the ranks' gradients. The
objective every rank optimises must then be the mean of the per-token loss over the selected positions of
the whole mini-batch (Eq. 7).
"""

from __future__ import annotations

import math
import os

import torch
import torch.multiprocessing as mp
from distributed_worker import RATIO, make_batch, rank_main


def test_two_ranks_two_micro_batches_train_on_the_global_mean_over_selected_positions():
    context = mp.get_context("spawn")
    results = context.Queue()
    port = 29500 + os.getpid() % 1000
    processes = [context.Process(target=rank_main, args=(rank, 2, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    mask, objective = results.get(timeout=120)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    stats, valid, per_token = make_batch()
    n = math.ceil(RATIO * int(valid.sum()))
    # The global top-n of raw KL over all valid positions of the batch (ties are absent in random floats).
    scores = torch.where(valid, stats.disagreement, torch.tensor(-1.0))
    expected = torch.zeros_like(valid)
    expected.view(-1)[scores.view(-1).topk(n).indices] = True
    assert torch.equal(mask, expected)
    assert abs(objective - float(per_token[mask].mean())) < 1e-6
