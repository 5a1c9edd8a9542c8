"""The tiny pair's shared tokenizer: a byte-level BPE in the style of Qwen2's, trained on the task corpus.

Why this shape:
- Byte-level (all 256 byte symbols in the vocabulary) so any text encodes and decodes losslessly, spaces
  and newlines of the chat template included. A character-level WordLevel tokenizer loses spaces when a
  `qwen2` model folder makes transformers swap in Qwen's tokenizer class.
- Digits split one by one, as Qwen's pre-tokenizer does, so arithmetic works digit by digit; a leading
  space may stay glued to a digit (`" 7"` is one token) to keep sequences short.
- The merges are learned on the task corpus until every task word is a single token, so the model sees a
  word-level vocabulary (task words, number words, fillers) on top of the byte alphabet.
- ChatML-style chat template; `<|im_end|>` is EOS and `<|endoftext|>` the (distinct) pad token.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def render_chat(prompt: str, response: str | None = None) -> str:
    """Text of ``CHAT_TEMPLATE`` for one user turn (with the generation prompt), plus ``response`` + EOS.

    Equal to ``tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
    add_generation_prompt=True)``; the tests pin that equality.
    """
    text = f"{BOS_TOKEN}user\n{prompt}{EOS_TOKEN}\n{BOS_TOKEN}assistant\n"
    return text if response is None else text + response + EOS_TOKEN


def train_tokenizer(corpus: Iterable[str], max_vocab_size: int = 1024):
    """Train the byte-level BPE on ``corpus`` and wrap it as a transformers fast tokenizer.

    Merging stops when no pair inside a pre-token repeats (every task word is one token) or at
    ``max_vocab_size``. Training is deterministic for a given corpus.
    """
    # transformers takes seconds to import; `render_chat`, which every tool uses, needs none of it.
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
