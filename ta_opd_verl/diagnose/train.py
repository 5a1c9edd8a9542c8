"""The masked-training intervention (the paper's Table 2): train θ0 on the frozen bank with one selector's
mask and measure what that does to every bank position.

A plain PyTorch loop, no rollouts and no verl trainer. What it shares with the plugin's verl path:
- the mask: `select_positions` over the whole bank as ONE batch (the global budget of Eq. 13), from θ0's
  scores, frozen for the whole run (the paper's fixed-context setting);
- the per-token losses and their aggregation: `reverse_kl_topk` is the plugin's
  `reverse_kl_on_teacher_support` on the teacher's top-`topk` entries; `pg_k1` is the sampled-token
  advantage -(log p_θ(y) - log p_T(y)), clamped like verl's `loss_max_clamp`, in a policy gradient;
  both go through the plugin's `masked_aggregate` (token-mean over the selected positions, Eq. 7).
Every step is one full pass over the rollouts that hold a selected position (the others add nothing
to a masked loss), in micro-batches whose gradients add up to the whole-bank loss: full-batch Adam, so a
run is deterministic and budgets differ only in their mask.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ta_opd_verl.diagnose.bank import Bank
from ta_opd_verl.diagnose.models import autocast_context, response_logits
from ta_opd_verl.diagnose.passes import TeacherEntries
from ta_opd_verl.diagnose.progress import Progress
from ta_opd_verl.opd_loss import masked_aggregate, reverse_kl_on_teacher_support

LOSSES = ("reverse_kl_topk", "pg_k1")


@dataclass(frozen=True)
class TrainSettings:
    """steps: optimiser steps (each a full pass over the selected rollouts). lr: Adam learning rate.
    loss: `reverse_kl_topk` or `pg_k1` (module docstring). loss_max_clamp: bound on |k1| of `pg_k1`
    (verl's `distillation_loss.loss_max_clamp`). grad_clip: max gradient norm (verl's actor `grad_clip`).
    micro_batch: rollouts per forward/backward."""

    steps: int
    lr: float
    loss: str = "reverse_kl_topk"
    loss_max_clamp: float = 10.0
    grad_clip: float = 1.0
    micro_batch: int = 64

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.steps < 1 or self.lr <= 0 or self.micro_batch < 1:
            raise ValueError("steps and micro_batch must be >= 1 and lr > 0")


def per_token_loss(
    logits: torch.Tensor, responses: torch.Tensor, entries: TeacherEntries, settings: TrainSettings
) -> torch.Tensor:
    """`[B, L]` differentiable per-token loss of the chosen estimator (module docstring), from `[B, L, V]`
    logits, the `[B, L]` sampled ids and the teacher's entries at those positions."""
    if settings.loss == "reverse_kl_topk":
        return reverse_kl_on_teacher_support(logits, entries.top_ids, entries.top_logprobs)
    log_prob = torch.log_softmax(logits.float(), dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    k1 = (log_prob - entries.sampled_logprob).clamp(-settings.loss_max_clamp, settings.loss_max_clamp)
    # One update per step from the current weights: the PPO ratio is exactly 1 and its clip never binds,
    # so the clipped surrogate's gradient is the policy gradient -advantage * ∇ log p_θ(y).
    ratio = torch.exp(log_prob - log_prob.detach())
    return k1.detach() * ratio


def train_on_bank(
    initial_student,
    bank: Bank,
    selected: torch.Tensor,
    entries: TeacherEntries,
    settings: TrainSettings,
    *,
    pad_id: int,
    vocab_size: int,
    device: str,
    dtype: torch.dtype,
    name: str,
    quiet: bool = False,
):
    """A float32 copy of `initial_student` trained on the `selected` `[rollouts, L]` positions of the bank.

    Returns the trained model (eval mode) and the loss at each step (the whole-bank loss before the step).
    """
    model = copy.deepcopy(initial_student).float().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    selected = selected & bank.valid_mask()
    total_selected = float(selected.sum())
    rows_with_selection = torch.nonzero(selected.any(-1)).squeeze(-1).tolist()
    responses = bank.response_tensor()
    subset = _sub_bank(bank, rows_with_selection)
    index = torch.tensor(rows_with_selection, dtype=torch.long)
    progress = Progress(name, quiet)
    losses = []
    for step in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for start in range(0, subset.rollouts, settings.micro_batch):
            rows = slice(start, min(start + settings.micro_batch, subset.rollouts))
            bank_rows = index[rows]
            with autocast_context(device, dtype):
                logits = response_logits(model, subset, rows, pad_id)[..., :vocab_size]
            width = logits.shape[1]
            micro_entries = TeacherEntries(*(t[bank_rows, :width].to(logits.device) for t in entries))
            per_token = per_token_loss(
                logits, responses[bank_rows, :width].to(logits.device), micro_entries, settings
            )
            loss = masked_aggregate(
                per_token,
                selected[bank_rows, :width].to(logits.device),
                "token-mean",
                dp_size=1,
                batch_num_selected=total_selected,
                global_batch_size=bank.rollouts,
            )
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(step_loss)
        progress(step + 1, settings.steps, f"steps, loss {step_loss:.4f}")
    return model.eval(), losses


def _sub_bank(bank: Bank, rows: list[int]) -> Bank:
    """The rollouts `rows` of the bank, in order (the ones a masked loss reads)."""
    return Bank(
        prompt_index=tuple(bank.prompt_index[i] for i in rows),
        sample=tuple(bank.sample[i] for i in rows),
        prompts=tuple(bank.prompts[i] for i in rows),
        prompt_ids=tuple(bank.prompt_ids[i] for i in rows),
        response_ids=tuple(bank.response_ids[i] for i in rows),
        settings=bank.settings,
    )
