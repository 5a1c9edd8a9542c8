"""The tiny pair's task mixture: a seeded problem generator and the one answer parser.

Every response has the shape ``[opener] [work] marker answer``:

- ``opener`` is one of ``OPENERS`` or absent, drawn uniformly. The checker ignores it, so the teacher
  learns a genuinely soft distribution (about 1/13 per option, more options than the scoring K = 8) at
  the response's first position.
- ``work`` is a written scratchpad for the arithmetic tasks (one column per digit, least significant
  first, as in the spec's addition pair); its column separator is drawn from ``SEPARATORS`` once per
  response, which makes the first separator another soft position and the later ones copies.
- ``marker`` is one of ``MARKERS``, drawn uniformly (soft again); the answer is everything after the LAST
  marker word. ``parse_answer`` implements that rule for both the builder's accuracy eval and the verl
  reward (`ta_opd_verl.tiny.reward`), so the two can never disagree.

Task formats (prompt -> answer); the arithmetic ones carry the scratchpad:

- ``add``: ``add 347 and 586`` -> ``933``; columns ``a b carry_in sum`` (sum as two digits).
- ``sub``: ``subtract 586 from 947`` -> ``361``; columns ``a b borrow_in digit borrow_out``.
- ``say``: ``say 4071`` -> ``four zero seven one``.
- ``reverse``: ``reverse 48213`` -> ``31284``.
- ``spell``: ``spell 347`` -> ``three hundred forty seven``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("add", "sub", "say", "reverse", "spell")
# Sampling weights of the training streams: the scratchpad tasks are the hard ones, so they get more of
# every pre-training batch. The held-out sets and the parquet files draw tasks uniformly (`tiny.build`).
TASK_WEIGHTS: tuple[float, ...] = (0.3, 0.3, 0.12, 0.12, 0.16)
OPENERS: tuple[str, ...] = (
    "ok",
    "so",
    "well",
    "sure",
    "right",
    "now",
    "hmm",
    "fine",
    "yes",
    "good",
    "then",
    "alright",
)
SEPARATORS: tuple[str, ...] = (",", ";", "|")
MARKERS: tuple[str, ...] = ("answer", "result", "total", "final")

# The tiny tokenizer's EOS and pad (`tokenizer.EOS_TOKEN`, `tokenizer.PAD_TOKEN`; a test pins the match).
_TRAILING_SPECIALS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = (
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


@dataclass(frozen=True)
class Problem:
    """One generated problem: ``prompt`` is the user message, ``response`` one accepted assistant reply
    (the training target), ``answer`` the canonical final answer that ``parse_answer`` must return."""

    task: str
    prompt: str
    response: str
    answer: str


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999 without "and" or hyphens: 347 -> "three hundred forty seven"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n == 0:
        return _ONES[0]
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if 10 <= rest <= 19:
        words.append(_TEENS[rest - 10])
    else:
        tens, ones = divmod(rest, 10)
        if tens:
            words.append(_TENS[tens])
        if ones:
            words.append(_ONES[ones])
    return " ".join(words)


def parse_answer(text: str | None) -> str | None:
    """The final answer in a response: the words after the last marker word, joined by single spaces.

    Returns None for a malformed response (no marker, or nothing after the last one). verl's reward
    managers decode with ``skip_special_tokens=True``, so the text normally holds no special tokens; a
    trailing EOS/pad (text decoded with special tokens) is dropped, any other special token stays part of
    the answer and makes it wrong.
    """
    if not isinstance(text, str):
        return None
    text = text.rstrip()
    while text.endswith(_TRAILING_SPECIALS):
        text = next(text.removesuffix(s) for s in _TRAILING_SPECIALS if text.endswith(s)).rstrip()
    words = text.split()
    last = max((i for i, word in enumerate(words) if word in MARKERS), default=None)
    if last is None or last == len(words) - 1:
        return None
    return " ".join(words[last + 1 :])


def is_correct(response: str | None, ground_truth: str) -> bool:
    """Exact match of the parsed final answer against the canonical answer (whitespace-normalised)."""
    answer = parse_answer(response)
    return answer is not None and answer == " ".join(str(ground_truth).split())


def _digits(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(low, high)))


def _operand(rng: random.Random) -> int:
    # Always three digits, as in the spec's pair: mixed widths make the column alignment much harder.
    return rng.randint(100, 999)


def _add_work(a: int, b: int, sep: str) -> str:
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    columns, carry = [], 0
    for x, y in zip(da, db, strict=True):
        total = int(x) + int(y) + carry
        columns.append(f"{x}{y}{carry}{total:02d}")
        carry = total // 10
    return sep.join(columns)


def _sub_work(a: int, b: int, sep: str) -> str:
    width = len(str(a))
    da, db = str(a)[::-1], str(b).zfill(width)[::-1]
    columns, borrow = [], 0
    for x, y in zip(da, db, strict=True):
        diff = int(x) - int(y) - borrow
        borrow_out = int(diff < 0)
        columns.append(f"{x}{y}{borrow}{diff % 10}{borrow_out}")
        borrow = borrow_out
    return sep.join(columns)


def _task_body(task: str, rng: random.Random, sep: str) -> tuple[str, str | None, str]:
    """(prompt, scratchpad or None, answer) for one task."""
    if task == "add":
        a, b = _operand(rng), _operand(rng)
        return f"add {a} and {b}", _add_work(a, b, sep), str(a + b)
    if task == "sub":
        a, b = sorted((_operand(rng), _operand(rng)), reverse=True)
        return f"subtract {b} from {a}", _sub_work(a, b, sep), str(a - b)
    if task == "say":
        digits = _digits(rng, 3, 5)
        return f"say {digits}", None, " ".join(_ONES[int(d)] for d in digits)
    if task == "reverse":
        digits = _digits(rng, 4, 7)
        return f"reverse {digits}", None, digits[::-1]
    if task == "spell":
        n = rng.randint(1, 999)
        return f"spell {n}", None, number_words(n)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def generate_problem(rng: random.Random, task: str | None = None) -> Problem:
    """One problem (task drawn by ``TASK_WEIGHTS`` unless given) with one randomly styled response."""
    task = task or rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
    opener = rng.choice((*OPENERS, None))
    sep = rng.choice(SEPARATORS)
    marker = rng.choice(MARKERS)
    prompt, work, answer = _task_body(task, rng, sep)
    parts = [p for p in (opener, work, marker, answer) if p is not None]
    return Problem(task=task, prompt=prompt, response=" ".join(parts), answer=answer)


def generate_problems(
    n: int, seed: int, *, exclude_prompts: Iterable[str] = (), tasks: Sequence[str] | None = None
) -> list[Problem]:
    """``n`` problems from ``random.Random(seed)`` with distinct prompts, none in ``exclude_prompts``.

    ``tasks`` restricts the mixture (uniform over the given tasks); the default is the weighted mixture.
    """
    rng = random.Random(seed)
    seen = set(exclude_prompts)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(
                f"could not draw {n} distinct problems (seed {seed}); the task space is too small"
            )
        problem = generate_problem(rng, rng.choice(tasks) if tasks else None)
        if problem.prompt in seen:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems
