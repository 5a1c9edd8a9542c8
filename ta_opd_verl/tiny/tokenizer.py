"""The tiny pair's shared tokenizer: a byte-level BPE in the style of Qwen2's, trained on the task corpus.

Why this shape:
- Byte-level (all 256 byte symbols in the vocabulary) so any text encodes and decodes losslessly, spaces
  and newlines of the chat template included. A character-level WordLevel tokenizer loses spaces when a
  `qwen2` model folder makes transformers swap in Qwen's tokenizer class.
- Digits split one by one, as Qwen's pre-tokenizer does, so arithmetic works digit by digit; a leading
  space may stay glued to a digit (`" 7"` is one token) to keep sequences short.
- The merges are learned on the task corpus until every task word is a single token, so the model sees a
  word-level vocabulary (task words, number words, fillers) on top of the byte alphabet.
- ChatML-style chat template (`CHATML`); `<|im_end|>` is EOS and `<|endoftext|>` the (distinct) pad token.

A `ChatFormat` holds a chat format of this tokenizer: its three special tokens (ids 0, 1, 2), EOS, pad, the
text around one user turn (`ChatFormat.render`) and the same as a Hugging Face chat template. `CHATML` is the
pair's; `R1_STYLE` is in the style of DeepSeek-R1's, for a teacher that reads another format than its student
(`ta_opd_verl.tiny.own_format`): `with_chat_format` gives the same BPE and ids under another format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Qwen2's split pattern with one change: ` ?\p{N}` instead of `\p{N}`, so " 7" is one pre-token.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat format of the tiny tokenizer (module docstring).

    special_tokens: the added tokens at ids 0, 1, 2.
    before_prompt, after_prompt: the text before and after the user's message of a one-turn prompt; the
        latter ends with the generation prompt, where the response starts.
    chat_template: the same as a Hugging Face (jinja) chat template; the tests pin that it renders `render`'s
        text.
    """

    special_tokens: tuple[str, str, str]
    eos_token: str
    pad_token: str
    before_prompt: str
    after_prompt: str
    chat_template: str

    def render(self, prompt: str, response: str | None = None) -> str:
        """One user turn with the generation prompt, plus ``response`` + EOS when given."""
        text = self.before_prompt + prompt + self.after_prompt
        return text if response is None else text + response + self.eos_token


CHATML = ChatFormat(
    special_tokens=SPECIAL_TOKENS,
    eos_token=EOS_TOKEN,
    pad_token=PAD_TOKEN,
    before_prompt=f"{BOS_TOKEN}user\n",
    after_prompt=f"{EOS_TOKEN}\n{BOS_TOKEN}assistant\n",
    chat_template=CHAT_TEMPLATE,
)
# The pair's format, which verl renders from the student's folder and every tool renders.
render_chat = CHATML.render

R1_EOS_TOKEN = "<｜end▁of▁sentence｜>"
R1_USER_TOKEN = "<｜User｜>"
R1_ASSISTANT_TOKEN = "<｜Assistant｜>"
# DeepSeek-R1's template without its BOS and reasoning handling: no role words, no newlines, a system
# message as plain text first. The assistant's turn ends in EOS, which is also the pad token.
R1_STYLE = ChatFormat(
    special_tokens=(R1_EOS_TOKEN, R1_USER_TOKEN, R1_ASSISTANT_TOKEN),
    eos_token=R1_EOS_TOKEN,
    pad_token=R1_EOS_TOKEN,
    before_prompt=R1_USER_TOKEN,
    after_prompt=R1_ASSISTANT_TOKEN,
    chat_template=(
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
        "{% else %}{{ message['content'] }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
    ),
)


def train_tokenizer(corpus: Iterable[str], max_vocab_size: int = 1024):
    """Train the byte-level BPE on ``corpus`` and wrap it as a transformers fast tokenizer.

    Merging stops when no pair inside a pre-token repeats (every task word is one token) or at
    ``max_vocab_size``. Training is deterministic for a given corpus.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return _fast_tokenizer(tokenizer, CHATML)


def with_chat_format(tokenizer, chat_format: ChatFormat):
    """``tokenizer`` (`train_tokenizer`'s, or one loaded from a pair's folder) in ``chat_format``: the same
    BPE, vocabulary and ids, with the special tokens at ids 0, 1, 2 renamed and ``chat_format``'s EOS, pad
    and chat template."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    added_ids = sorted(added["id"] for added in data["added_tokens"])
    if added_ids != [0, 1, 2]:
        raise ValueError(f"not a tiny tokenizer: its added tokens are at ids {added_ids}, not at 0, 1, 2")
    renamed = {added["content"]: chat_format.special_tokens[added["id"]] for added in data["added_tokens"]}
    for added in data["added_tokens"]:
        added["content"] = renamed[added["content"]]
    data["model"]["vocab"] = {renamed.get(token, token): i for token, i in data["model"]["vocab"].items()}
    # A saved tokenizer keeps the padding of its last batch call, which the new one would take as its
    # padding side; start from a fresh tokenizer's state instead.
    data["padding"] = data["truncation"] = None
    return _fast_tokenizer(Tokenizer.from_str(json.dumps(data)), chat_format)


def _fast_tokenizer(tokenizer: Tokenizer, chat_format: ChatFormat):
    """``tokenizer`` as a transformers fast tokenizer with ``chat_format``'s EOS, pad and template."""
    # transformers takes seconds to import; `render_chat`, which every tool uses, needs none of it.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=chat_format.eos_token,
        pad_token=chat_format.pad_token,
        unk_token=None,
        chat_template=chat_format.chat_template,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
