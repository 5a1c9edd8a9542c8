"""The student's tokenizer and the text of each token, so that byte-level BPE pieces (Qwen's, the tiny
pair's) read as text."""

from __future__ import annotations

from pathlib import Path

# Tokens of context before the first undecoded one in `_incremental_texts`, enough for any tokenizer whose
# text of a token depends on the tokens before it (a SentencePiece leading space, say); also the longest
# run of tokens `_join_split_characters` waits on for a character to end (UTF-8 has at most 4 bytes).
_CONTEXT_TOKENS = 6
# What a byte-level decoder writes for bytes that do not form a whole UTF-8 character.
_REPLACEMENT = "\ufffd"


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer folder where the dump's header (or ``--tokenizer``) points."""


def load_tokenizer(folder: str | Path):
    """The Hugging Face tokenizer of a local model folder (no download)."""
    # transformers takes seconds to import; only a page that decodes tokens needs it.
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise TokenizerNotFoundError(
            f"tokenizer folder {path} does not exist; pass --tokenizer DIR, a local Hugging Face folder "
            "with the student's tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def decode(tokenizer, ids: list[int]) -> str:
    """The text of ``ids`` as written: special tokens kept, no clean-up of spaces."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text; joined, they are ``decode(ids)``. A token that ends inside a UTF-8 character
    (byte-level BPE splits some characters over tokens) gets "" and the token completing the character
    gets all of it."""
    pieces = tokenizer.batch_decode(
        [[token] for token in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    texts = _join_split_characters(tokenizer, ids, pieces)
    # Token by token is right when it adds up to the whole; a tokenizer whose text of a token depends on
    # the tokens before it (a SentencePiece leading space, say) does not.
    if "".join(texts) == decode(tokenizer, ids):
        return texts
    return _incremental_texts(tokenizer, ids)


def _join_split_characters(tokenizer, ids: list[int], pieces: list[str]) -> list[str]:
    """``pieces`` (each token decoded alone) with every run of tokens that ends inside a character
    decoded together, its text on the run's last token and "" on the others."""
    texts = []
    run: list[int] = []  # the tokens since the last whole character
    for position, piece in enumerate(pieces):
        if not run and _REPLACEMENT not in piece:
            texts.append(piece)
            continue
        run.append(ids[position])
        text = decode(tokenizer, run)
        if text.endswith(_REPLACEMENT) and position + 1 < len(ids) and len(run) < _CONTEXT_TOKENS:
            texts.append("")
            continue
        texts.append(text)
        run = []
    return texts


def _incremental_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as the difference of two decodes with a few tokens of context before it (how
    streaming detokenisers do it), holding back tokens that end inside a character."""
    texts = []
    done = 0  # ids[:done] have their text
    for end in range(1, len(ids) + 1):
        start = max(0, done - _CONTEXT_TOKENS)
        text = decode(tokenizer, ids[start:end])
        if text.endswith(_REPLACEMENT) and end < len(ids):
            texts.append("")
            continue
        before = decode(tokenizer, ids[start:done])
        texts.append(text[len(before) :] if text.startswith(before) else decode(tokenizer, ids[done:end]))
        done = end
    return texts
