"""Batched generation and greedy accuracy for the tiny pair (Hugging Face `generate`, CPU)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ta_opd_verl.tiny.tasks import Problem, is_correct
from ta_opd_verl.tiny.tokenizer import CHATML, ChatFormat


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 128,
    threads: int | None = 1,
    chat_format: ChatFormat = CHATML,
    stop_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Response token ids (the stop id included when produced, padding removed) for each prompt.

    ``top_p`` < 1 samples from the nucleus (as vLLM's ``top_p``), else from the full distribution.
    The prompt is ``chat_format``'s rendering with the generation prompt (default the pair's, as verl
    builds it), tokenised by ``tokenizer``; ``stop_ids`` end a response (default the tokenizer's EOS).
    Sampling draws from torch's global generator: seed it before calling for reproducible samples.
    ``threads`` pins torch's thread count for the call (None: leave it): on models this small, extra threads
    only add OpenMP synchronisation, which on a busy 2-core machine made generation many times slower.
    """
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id
    stop = list(stop_ids) if stop_ids is not None else [tokenizer.eos_token_id]
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_format.render(p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            kwargs = (
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
                if do_sample
                else {"do_sample": False}
            )
            generated = model.generate(
                **batch, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id, **kwargs
            )
            for row in generated[:, batch["input_ids"].shape[1] :].tolist():
                ids: list[int] = []
                for token in row:
                    # A stop id first: the pad may be one (R1's EOS pads), and a stop id is kept.
                    if token in stop:
                        ids.append(token)
                        break
                    if token == pad_id:
                        break
                    ids.append(token)
                out.append(ids)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.set_num_threads(threads_before)
    return out


def greedy_accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    batch_size: int = 128,
    chat_format: ChatFormat = CHATML,
    stop_ids: Sequence[int] | None = None,
) -> dict:
    """Greedy accuracy overall and per task: ``{"accuracy": float, "per_task": {task: float}, "n": int}``.

    Prompts in ``chat_format``, responses ended by ``stop_ids`` (both as in `generate_responses`), decoded by
    ``tokenizer`` with ``skip_special_tokens=True`` and checked by `tasks.is_correct`, exactly as verl's
    reward loop does with `ta_opd_verl.tiny.reward.compute_score`.
    """
    prompts = [p.prompt for p in problems]
    responses = generate_responses(
        model, tokenizer, prompts, batch_size=batch_size, chat_format=chat_format, stop_ids=stop_ids
    )
    hits: dict[str, list[bool]] = defaultdict(list)
    for problem, ids in zip(problems, responses, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        hits[problem.task].append(is_correct(text, problem.answer))
    flat = [h for task_hits in hits.values() for h in task_hits]
    return {
        "accuracy": sum(flat) / max(1, len(flat)),
        "per_task": {task: sum(h) / len(h) for task, h in sorted(hits.items())},
        "n": len(flat),
    }
