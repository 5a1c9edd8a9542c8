"""The frozen context bank: N student rollouts, the first L response tokens of each, saved to one parquet.

A bank row is one rollout: the prompt (verl's chat messages), its token ids with the chat template and
the generation prompt (as verl builds them), and the response ids the initial student sampled, cut at L
tokens. Every response position t of every row is a context c_t = (x, y_<t) the diagnostic scores.
The bank's settings (student, L, temperature, seed, data file) travel in the parquet's schema metadata,
so a saved bank is self-describing and `load_bank(save_bank(bank))` returns an equal bank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

BANK_FORMAT = 1
# Key of the bank's settings in the parquet schema metadata.
METADATA_KEY = b"ta_opd_bank"
BANK_COLUMNS = ("prompt_index", "sample", "prompt", "prompt_ids", "response_ids")


class BankError(ValueError):
    """A bank or prompt file cannot be read (missing file, column or metadata key, bad values)."""


@dataclass(frozen=True)
class Bank:
    """Rollouts of the initial student on fixed prompts.

    prompt_index: the prompt's row in the data file; rollouts of one prompt share it (bootstrap cluster).
    sample: which sample of that prompt (0 .. samples_per_prompt - 1).
    prompts: the chat messages of each rollout's prompt.
    prompt_ids / response_ids: token ids; a response holds at most `settings["response_tokens"]` ids.
    settings: how the bank was made (student, data, response_tokens, temperature, seed, ...).
    """

    prompt_index: tuple[int, ...]
    sample: tuple[int, ...]
    prompts: tuple[tuple[dict, ...], ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    response_ids: tuple[tuple[int, ...], ...]
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        sizes = {len(getattr(self, name)) for name in BANK_COLUMNS if name != "prompt"} | {len(self.prompts)}
        if len(sizes) != 1:
            raise BankError(f"bank columns have different lengths: {sorted(sizes)}")
        if any(len(response) == 0 for response in self.response_ids):
            raise BankError("every bank rollout needs at least one response token")

    @property
    def rollouts(self) -> int:
        return len(self.response_ids)

    @property
    def max_response_length(self) -> int:
        return max(map(len, self.response_ids), default=0)

    def valid_mask(self) -> torch.Tensor:
        """bool `[rollouts, max_response_length]`: True at response positions that exist."""
        lengths = torch.tensor([len(r) for r in self.response_ids])
        return torch.arange(self.max_response_length).unsqueeze(0) < lengths.unsqueeze(1)

    def response_tensor(self, pad_id: int = 0) -> torch.Tensor:
        """long `[rollouts, max_response_length]` response ids, `pad_id` past each response's end."""
        out = torch.full((self.rollouts, self.max_response_length), pad_id, dtype=torch.long)
        for row, response in enumerate(self.response_ids):
            out[row, : len(response)] = torch.tensor(response)
        return out


def read_prompts(path: str | os.PathLike, limit: int) -> list[tuple[int, list[dict]]]:
    """The first `limit` prompts of a verl-format parquet: `(row index, chat messages)` pairs.

    verl's format stores each prompt as a list of `{"role": ..., "content": ...}` messages in the column
    `prompt`; the error names the file, the column and the row when that is not what the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise BankError(f"prompt file {path} does not exist")
    frame = pd.read_parquet(path)
    if "prompt" not in frame.columns:
        raise BankError(f"{path}: no column 'prompt' (verl's format); columns: {list(frame.columns)}")
    prompts = []
    for row, messages in enumerate(frame["prompt"].head(limit)):
        messages = [dict(message) for message in messages] if messages is not None else []
        if not messages or any({"role", "content"} - set(m) for m in messages):
            raise BankError(
                f"{path}: column 'prompt', row {row}: expected a list of chat messages with "
                f"'role' and 'content', got {messages!r}"
            )
        prompts.append((row, messages))
    if not prompts:
        raise BankError(f"{path}: no prompts")
    return prompts


def prompt_token_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of the chat template with the generation prompt, as verl's dataset builds the prompt."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def sample_bank(
    model,
    tokenizer,
    prompts: Sequence[tuple[int, list[dict]]],
    *,
    samples_per_prompt: int,
    response_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    settings: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Bank:
    """Sample `samples_per_prompt` responses of at most `response_tokens` tokens per prompt (pure sampling
    at `temperature`, no top-k/top-p, as verl's rollouts for OPD) and return them as a bank.

    The responses stop at EOS (kept, as verl's response mask keeps it) or at `response_tokens`.
    `progress(done, total)` is called after each generation batch.
    """
    if samples_per_prompt < 1 or response_tokens < 1:
        raise BankError("samples_per_prompt and response_tokens must be >= 1")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    rollouts = [
        (index, sample, messages) for index, messages in prompts for sample in range(samples_per_prompt)
    ]
    encoded = [prompt_token_ids(tokenizer, messages) for _, _, messages in rollouts]
    was_training = model.training
    model.eval()
    responses: list[tuple[int, ...]] = []
    try:
        for start in range(0, len(rollouts), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(map(len, batch))
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=response_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
            for row in generated[:, width:].tolist():
                responses.append(_cut_response(row, eos_id, pad_id))
            if progress is not None:
                progress(min(start + batch_size, len(rollouts)), len(rollouts))
    finally:
        model.train(was_training)
    return Bank(
        prompt_index=tuple(index for index, _, _ in rollouts),
        sample=tuple(sample for _, sample, _ in rollouts),
        prompts=tuple(tuple(messages) for _, _, messages in rollouts),
        prompt_ids=tuple(tuple(ids) for ids in encoded),
        response_ids=tuple(responses),
        settings={
            **(settings or {}),
            "format": BANK_FORMAT,
            "response_tokens": response_tokens,
            "samples_per_prompt": samples_per_prompt,
            "temperature": temperature,
            "seed": seed,
        },
    )


def _cut_response(tokens: list[int], eos_id: int, pad_id: int) -> tuple[int, ...]:
    """A generated row up to and including EOS; the padding `generate` adds after a finished row is cut."""
    ids = []
    for token in tokens:
        if token == pad_id and pad_id != eos_id:
            break
        ids.append(token)
        if token == eos_id:
            break
    return tuple(ids)


def save_bank(bank: Bank, path: str | os.PathLike) -> Path:
    """Write the bank to one parquet file (settings in the schema metadata); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "prompt_index": pa.array(bank.prompt_index, pa.int64()),
            "sample": pa.array(bank.sample, pa.int64()),
            "prompt": pa.array([json.dumps(list(m)) for m in bank.prompts], pa.string()),
            "prompt_ids": pa.array([list(ids) for ids in bank.prompt_ids], pa.list_(pa.int64())),
            "response_ids": pa.array([list(ids) for ids in bank.response_ids], pa.list_(pa.int64())),
        }
    )
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(bank.settings).encode()})
    pq.write_table(table, path)
    return path


def load_bank(path: str | os.PathLike) -> Bank:
    """Read a bank written by `save_bank`; errors name the file and the missing column or key."""
    path = Path(path)
    if not path.is_file():
        raise BankError(f"bank file {path} does not exist")
    table = pq.read_table(path)
    missing = [name for name in BANK_COLUMNS if name not in table.column_names]
    if missing:
        raise BankError(f"{path}: not a diagnostic bank, missing column(s) {missing}")
    metadata = (table.schema.metadata or {}).get(METADATA_KEY)
    if metadata is None:
        raise BankError(
            f"{path}: not a diagnostic bank, no {METADATA_KEY.decode()!r} key in the schema metadata"
        )
    settings = json.loads(metadata)
    if settings.get("format") != BANK_FORMAT:
        raise BankError(f"{path}: bank format {settings.get('format')!r}, this version reads {BANK_FORMAT}")
    columns = table.to_pydict()
    return Bank(
        prompt_index=tuple(columns["prompt_index"]),
        sample=tuple(columns["sample"]),
        prompts=tuple(tuple(json.loads(text)) for text in columns["prompt"]),
        prompt_ids=tuple(tuple(ids) for ids in columns["prompt_ids"]),
        response_ids=tuple(tuple(ids) for ids in columns["response_ids"]),
        settings=settings,
    )
