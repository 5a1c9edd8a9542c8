"""Is teachability meaningful on the tiny pair? Spread of D and C, ties, and selection overlaps.

Samples student rollouts (temperature 1.0, HF ``generate``), scores every valid response position with
`ta_opd_verl.teachability.token_statistics` (K = 8; the teacher's top-32 as a vLLM teacher server would
return them, C both as the lower bound of Eq. 17 and exact), and reports:

- Q05 / Q50 / Q95 of D, C (lower bound and exact) and H, and how often C is saturated (>= 0.99);
- the share of valid positions whose teachability score s = D̃·C̃ ties with another position, and how
  many positions tie with the score at the 5% selection boundary;
- the Jaccard overlap of the 5% teachability selection with the raw-KL (D̃) and random selections.

    python -m ta_opd_verl.tiny.measure --json outputs/tiny-teachability.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ta_opd_verl.teachability import select_positions, selector_scores, token_statistics
from ta_opd_verl.tiny.build import build_tiny_pair
from ta_opd_verl.tiny.evaluate import generate_responses
from ta_opd_verl.tiny.tokenizer import render_chat


def _quantiles(values: torch.Tensor, valid: torch.Tensor) -> dict:
    v = values[valid].double()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"q05": q[0], "q50": q[1], "q95": q[2], "spread_q05_q95": q[2] - q[0], "mean": float(v.mean())}


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _tie_stats(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> dict:
    values = scores[valid]
    _, counts = torch.unique(values, return_counts=True)
    n = values.numel()
    n_keep = math.ceil(ratio * n)
    boundary = torch.sort(values, descending=True).values[n_keep - 1]
    return {
        "tied_share": float(counts[counts > 1].sum()) / n,
        "zero_share": float((values == 0).sum()) / n,
        "one_share": float((values == 1).sum()) / n,
        "n_keep": n_keep,
        "tied_at_boundary": int((values == boundary).sum()),
    }


@torch.no_grad()
def _logits(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def measure_teachability(
    teacher_path,
    student_path,
    prompts: list[str],
    *,
    samples: int = 2,
    k: int = 8,
    teacher_topk: int = 32,
    ratio: float = 0.05,
    seed: int = 0,
    max_new_tokens: int = 32,
) -> dict:
    """Figures for ``samples`` student rollouts of each prompt; see the module docstring."""
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        rollout_prompts = [p for p in prompts for _ in range(samples)]
        responses = generate_responses(
            student,
            tokenizer,
            rollout_prompts,
            do_sample=True,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
        )
        prompt_ids = tokenizer([render_chat(p) for p in rollout_prompts], add_special_tokens=False).input_ids
        sequences = [p + r for p, r in zip(prompt_ids, responses, strict=True)]
        student_logits = _logits(student, sequences, tokenizer.pad_token_id)
        teacher_logits = _logits(teacher, sequences, tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(before)

    batch, length = len(sequences), max(map(len, responses))
    vocab = student_logits.shape[-1]
    s_logits = torch.zeros(batch, length, vocab)
    t_logits = torch.zeros(batch, length, teacher_logits.shape[-1])
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, responses, strict=True)):
        # Position j of the response is predicted from the logits at index len(prompt) + j - 1.
        s_logits[i, : len(r)] = student_logits[i, len(p) - 1 : len(p) - 1 + len(r)]
        t_logits[i, : len(r)] = teacher_logits[i, len(p) - 1 : len(p) - 1 + len(r)]
        valid[i, : len(r)] = True
    teacher_lp = torch.log_softmax(t_logits, dim=-1)
    top_lp, top_ids = torch.topk(teacher_lp, teacher_topk, dim=-1)
    student_topk = torch.topk(s_logits, k, dim=-1).indices
    lower = token_statistics(s_logits, top_ids, top_lp, k=k)
    exact = token_statistics(
        s_logits, top_ids, top_lp, k=k, teacher_logprobs_at_student_topk=teacher_lp.gather(-1, student_topk)
    )

    generator = torch.Generator().manual_seed(seed)
    selections = {
        name: select_positions(name, lower, valid, ratio, generator=generator if name == "random" else None)
        for name in ("teachability", "raw_kl", "random", "entropy")
    }
    exact_selection = select_positions("teachability", exact, valid, ratio)
    teacher_argmax_in_student_topk = (student_topk == t_logits.argmax(-1, keepdim=True)).any(-1)
    return {
        "rollouts": batch,
        "valid_positions": int(valid.sum()),
        "vocab_size": vocab,
        "k": k,
        "teacher_topk": teacher_topk,
        "ratio": ratio,
        "disagreement": _quantiles(lower.disagreement, valid),
        "compatibility_lower_bound": _quantiles(lower.compatibility, valid),
        "compatibility_exact": _quantiles(exact.compatibility, valid),
        "entropy": _quantiles(lower.entropy, valid),
        "compatibility_saturated_share": float((exact.compatibility[valid] >= 0.99).float().mean()),
        "teacher_argmax_in_student_topk_share": float(teacher_argmax_in_student_topk[valid].float().mean()),
        "teacher_entropy": _quantiles(-(teacher_lp.exp() * teacher_lp).sum(-1), valid),
        "teachability_ties": _tie_stats(selector_scores("teachability", lower, valid), valid, ratio),
        "selected": {name: int(mask.sum()) for name, mask in selections.items()},
        "jaccard": {
            "teachability_vs_raw_kl": _jaccard(selections["teachability"], selections["raw_kl"]),
            "teachability_vs_random": _jaccard(selections["teachability"], selections["random"]),
            "teachability_vs_entropy": _jaccard(selections["teachability"], selections["entropy"]),
            "teachability_lower_bound_vs_exact_c": _jaccard(selections["teachability"], exact_selection),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ta_opd_verl.tiny.measure", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pair", help="tiny-pair folder (default: the builder's default, built if missing)")
    parser.add_argument("--json", help="write the figures here as well as to stdout")
    parser.add_argument("--prompts", type=int, default=64, help="prompts from the pair's train.parquet")
    parser.add_argument("--samples", type=int, default=2, help="student samples per prompt")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pair = build_tiny_pair(args.pair, quiet=True)
    frame = pd.read_parquet(pair.train_parquet).head(args.prompts)
    prompts = [messages[0]["content"] for messages in frame["prompt"]]
    figures = measure_teachability(
        pair.teacher, pair.student, prompts, samples=args.samples, k=args.k, ratio=args.ratio, seed=args.seed
    )
    figures["pair"] = str(pair.root)
    text = json.dumps(figures, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
