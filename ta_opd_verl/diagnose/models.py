"""Model folders for the diagnostic: checks that name the path and key, loading, and bank forwards.

A trained student θτ may come from anywhere (a verl run's Hugging Face export, a local fine-tune), so
it is checked before any weight is loaded: the folder exists, holds a `config.json` with a
`vocab_size`, and that vocabulary matches the teacher's (tokens too, when the folder has a tokenizer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ta_opd_verl.diagnose.bank import Bank
from ta_opd_verl.vocab import VocabularyMismatchError, check_same_vocabulary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


class CheckpointError(ValueError):
    """A model folder is missing, incomplete, or does not match the teacher's vocabulary."""


def config_vocab_size(path: str | os.PathLike, role: str) -> int:
    """`vocab_size` from `<path>/config.json` (or its `text_config`); errors name the path and the key."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{role} checkpoint {path} does not exist or is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{role} checkpoint {path} has no config.json (expected {config_file})")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from error
    config = config.get("text_config", config)
    if not isinstance(config.get("vocab_size"), int):
        raise CheckpointError(f"{config_file}: no integer key 'vocab_size'")
    return config["vocab_size"]


def check_trained_checkpoint(
    trained: str | os.PathLike, teacher: str | os.PathLike, student_vocab: int
) -> None:
    """Refuse a θτ folder the diagnostic cannot compare with θ0 and the teacher.

    θτ must hold weights, have θ0's embedding size (`vocab_size`, so the two students' distributions are
    over the same ids) and, when it carries a tokenizer, the teacher's tokens (the rule of
    `ta_opd_verl.vocab`).
    """
    trained_vocab = config_vocab_size(trained, "trained student")
    if not any(any(Path(trained).glob(pattern)) for pattern in _WEIGHT_FILES):
        raise CheckpointError(
            f"trained student checkpoint {trained} has config.json but no weights "
            f"({', '.join(_WEIGHT_FILES)}); a verl FSDP checkpoint's actor/huggingface folder holds only "
            "config and tokenizer: merge it first with `python -m verl.model_merger merge --backend fsdp "
            "--local_dir <step>/actor --target_dir <dir>`"
        )
    teacher_vocab = config_vocab_size(teacher, "teacher")
    if trained_vocab != student_vocab:
        raise CheckpointError(
            f"{Path(trained) / 'config.json'}: vocab_size {trained_vocab} does not match the initial "
            f"student's {student_vocab} (teacher {Path(teacher) / 'config.json'}: vocab_size "
            f"{teacher_vocab}); θτ must be the same model as θ0 after training"
        )
    if any((Path(trained) / name).is_file() for name in _TOKENIZER_FILES):
        try:
            check_same_vocabulary(trained, teacher)
        except VocabularyMismatchError as error:
            raise CheckpointError(f"trained student {trained}: {error}") from error


def load_model(path: str | os.PathLike, device: str, dtype: torch.dtype, role: str):
    """`AutoModelForCausalLM` in eval mode on `device`; the folder is checked first."""
    # transformers takes seconds to import; this module's folder checks are used without loading a model.
    from transformers import AutoModelForCausalLM

    config_vocab_size(path, role)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def autocast_context(device: str, dtype: torch.dtype):
    """Forwards in `dtype` for float32 weights (students keep float32 master weights for training)."""
    enabled = dtype != torch.float32
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=enabled)


def bank_batches(bank: Bank, batch_size: int) -> Iterator[slice]:
    for start in range(0, bank.rollouts, batch_size):
        yield slice(start, min(start + batch_size, bank.rollouts))


def response_logits(model, bank: Bank, rows: slice, pad_id: int) -> torch.Tensor:
    """Logits predicting each response token of `bank[rows]`: `[rows, max_response_length, V]`.

    Position t holds the logits of the context (prompt, response[:t]); positions past a response's end
    repeat its last context and must be masked with `bank.valid_mask()`. Right padding: with causal
    attention it never reaches the positions read back.
    """
    device = next(model.parameters()).device
    sequences = [p + r for p, r in zip(bank.prompt_ids[rows], bank.response_ids[rows], strict=True)]
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    length = bank.max_response_length
    read = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(
        zip(bank.prompt_ids[rows], bank.response_ids[rows], strict=True)
    ):
        # Response token j is predicted at index len(prompt) + j - 1.
        positions = torch.arange(length).clamp(max=len(response) - 1) + len(prompt) - 1
        read[row] = positions
    read = read.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, read)
