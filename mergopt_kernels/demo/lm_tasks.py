"""The LM protocol's tasks: seven character-level sequence tasks, generated here or read from the
installed Python standard library, so that nothing is downloaded.

Six tasks ask a question with one exact answer, scored by exact match of the generated answer:

* ``arithmetic``: ``"add 42+79="`` -> ``"121"`` (the sum of two 2-digit numbers, 3 digits).
* ``sorting``: ``"sort 83159="`` -> ``"13589"`` (five digits in ascending order).
* ``reversal``: ``"rev kqzbw="`` -> ``"wbzqk"`` (five letters reversed).
* ``brackets``: ``"brk ([)]()()="`` -> ``"n"`` (is the string of ``()[]`` balanced? ``y``/``n``).
* ``grammar``: ``"anbn   aaabbb="`` -> ``"y"`` (is the string in the context-free language
  a^n b^n, n >= 1? Negatives are near misses: unequal counts or one swapped pair).
* ``lookup``: ``"kv d3a7q1m0|q="`` -> ``"1"`` (the value of a key in a list of four pairs).

The seventh, ``python``, is source code of modules of the standard library (``PYTHON_MODULES``):
fixed-length chunks of text, scored by next-character accuracy on held-out modules.

Every prompt of a task has the same length (``grammar`` right-aligns its string), so that a batch
of prompts generates in lockstep. Examples are drawn from ``random.Random`` and depend only on the
task, the split (pre-training, train, test: each its own seed) and the count. Test examples are
i.i.d. draws, not filtered against train: ``grammar`` has only 30 distinct prompts and
``brackets`` a few thousand, so there the test measures the rule on strings mostly seen in
training; the other tasks have 10^4 to 10^10 prompts.
"""

from __future__ import annotations

import random
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PAD = 0
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {char: i + 1 for i, char in enumerate(_CHARS)}
TEXT_LENGTH = 24  # characters per chunk of the python task
PYTHON_MODULES = {"train": ("textwrap", "string", "fnmatch", "shlex", "calendar", "glob", "bisect",
                            "colorsys", "keyword", "heapq", "queue", "sched", "copy", "pprint"),
                  "test": ("reprlib", "netrc", "tabnanny", "graphlib")}
_SPLIT_SEEDS = {"pretrain": 1, "train": 2, "test": 3}


def vocab_size() -> int:
    """Number of token ids: PAD (0), newline and the 95 printable ASCII characters."""
    return len(_CHARS) + 1


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (characters outside the vocabulary raise ``KeyError``)."""
    return [_INDEX[char] for char in text]


def decode(tokens) -> str:
    """The text of token ids (PAD is dropped)."""
    return "".join(_CHARS[t - 1] for t in tokens if t != PAD)


@dataclass(frozen=True)
class Sequences:
    """Token sequences ``tokens`` (int64 ``[n, length]``, right-padded with PAD) and ``mask`` (bool,
    same shape): the positions whose token the loss predicts (answers; all text of ``python``)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def select(self, index: torch.Tensor) -> "Sequences":
        """The rows ``index``."""
        return Sequences(self.tokens[index], self.mask[index])

    def to(self, device) -> "Sequences":
        """The same sequences on ``device``."""
        return Sequences(self.tokens.to(device), self.mask.to(device))

    def padded(self, length: int) -> "Sequences":
        """The sequences right-padded with PAD (masked out) to ``length`` tokens."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"length must be >= {self.tokens.shape[1]}, got {length}")
        return Sequences(torch.nn.functional.pad(self.tokens, (0, extra), value=PAD),
                         torch.nn.functional.pad(self.mask, (0, extra), value=False))

    @staticmethod
    def concat(parts: list["Sequences"]) -> "Sequences":
        """All rows of ``parts``, padded to the longest."""
        length = max(part.tokens.shape[1] for part in parts)
        padded = [part.padded(length) for part in parts]
        return Sequences(torch.cat([p.tokens for p in padded]), torch.cat([p.mask for p in padded]))


@dataclass(frozen=True)
class LMTask:
    """A task's train and test sequences; for exact-answer tasks also the test prompts
    (int64 ``[n, prompt_length]``) and answers (int64 ``[n, answer_length]``), else ``None``."""

    name: str
    train: Sequences
    test: Sequences
    test_prompts: torch.Tensor | None
    test_answers: torch.Tensor | None

    @property
    def answer_length(self) -> int:
        """Tokens per answer (0 for a task without exact answers)."""
        return 0 if self.test_answers is None else self.test_answers.shape[1]

    def to(self, device) -> "LMTask":
        """The same task with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)
        return LMTask(self.name, self.train.to(device), self.test.to(device), move(self.test_prompts),
                      move(self.test_answers))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a:02d}+{b:02d}=", f"{a + b:03d}"


def _sorting(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng, 5)
    return f"sort {digits}=", "".join(sorted(digits))


def _reversal(rng: random.Random) -> tuple[str, str]:
    letters = _letters(rng, 5)
    return f"rev {letters}=", letters[::-1]


def is_balanced(text: str) -> bool:
    """Whether ``text`` (of ``()[]``) is a balanced bracket string."""
    stack = []
    for char in text:
        if char in "([":
            stack.append(char)
        elif not stack or stack.pop() != {")": "(", "]": "["}[char]:
            return False
    return not stack


def _balanced(rng: random.Random, pairs: int) -> str:
    if pairs == 0:
        return ""
    inner = rng.randrange(pairs)
    left, right = rng.choice(["()", "[]"])
    return left + _balanced(rng, inner) + right + _balanced(rng, pairs - 1 - inner)


def _brackets(rng: random.Random) -> tuple[str, str]:
    text = list(_balanced(rng, 4))
    if rng.random() < 0.5:  # a near miss: swap two different characters, or change one
        i, j = rng.sample(range(len(text)), 2)
        if text[i] != text[j]:
            text[i], text[j] = text[j], text[i]
        else:
            text[i] = rng.choice([c for c in "()[]" if c != text[i]])
    text = "".join(text)
    return f"brk {text}=", "y" if is_balanced(text) else "n"


def in_anbn(text: str) -> bool:
    """Whether ``text`` is a^n b^n with n >= 1."""
    n = len(text) // 2
    return n >= 1 and text == "a" * n + "b" * n


def _grammar(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 5)
    kind = rng.randrange(3)
    if kind == 0:
        text = "a" * n + "b" * n
    elif kind == 1:
        m = rng.choice([k for k in range(1, 6) if k != n])
        text = "a" * n + "b" * m
    else:
        text = list("a" * n + "b" * n)
        i = rng.randrange(len(text) - 1)
        text[i], text[i + 1] = text[i + 1], text[i]
        text = "".join(text)
    return f"anbn {text:>10}=", "y" if in_anbn(text) else "n"


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(string.ascii_lowercase, 4)
    values = _digits(rng, 4)
    query = rng.randrange(4)
    pairs = "".join(k + v for k, v in zip(keys, values))
    return f"kv {pairs}|{keys[query]}=", values[query]


QUESTION_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "sorting": _sorting, "reversal": _reversal, "brackets": _brackets,
    "grammar": _grammar, "lookup": _lookup}
LM_TASKS = (*QUESTION_TASKS, "python")


def question_examples(name: str, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs of the question task ``name`` from ``random.Random`` seeded
    with the task's name and ``seed``. Every prompt of a task has the same length."""
    rng = random.Random(f"{name}/{seed}")
    return [QUESTION_TASKS[name](rng) for _ in range(count)]


def _question_sequences(pairs: list[tuple[str, str]]) -> Sequences:
    tokens = torch.tensor([encode(prompt + answer) for prompt, answer in pairs], dtype=torch.int64)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, len(pairs[0][0]):] = True
    return Sequences(tokens, mask)


def python_source(split: str) -> str:
    """The source of the ``split``'s standard-library modules (``PYTHON_MODULES``), concatenated in
    order, tabs as four spaces, lines with characters outside the vocabulary dropped."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for module in PYTHON_MODULES[split]:
        text = (folder / f"{module}.py").read_text(encoding="utf-8").replace("\t", "    ")
        lines += [line for line in text.splitlines() if all(char in _INDEX for char in line)]
    return "\n".join(lines) + "\n"


def python_chunks(split: str, count: int, seed: int) -> Sequences:
    """``count`` chunks of ``TEXT_LENGTH`` characters at positions drawn from ``random.Random(seed)``
    in ``python_source(split)``; every token is predicted."""
    text = python_source(split)
    rng = random.Random(f"python/{seed}")
    starts = [rng.randrange(len(text) - TEXT_LENGTH) for _ in range(count)]
    tokens = torch.tensor([encode(text[s:s + TEXT_LENGTH]) for s in starts], dtype=torch.int64)
    return Sequences(tokens, torch.ones_like(tokens, dtype=torch.bool))


def make_lm_task(name: str, train_count: int, test_count: int) -> LMTask:
    """The task ``name`` with ``train_count`` train and ``test_count`` test examples."""
    if name == "python":
        return LMTask(name, python_chunks("train", train_count, _SPLIT_SEEDS["train"]),
                      python_chunks("test", test_count, _SPLIT_SEEDS["test"]), None, None)
    test = question_examples(name, test_count, _SPLIT_SEEDS["test"])
    prompts = torch.tensor([encode(prompt) for prompt, _ in test], dtype=torch.int64)
    answers = torch.tensor([encode(answer) for _, answer in test], dtype=torch.int64)
    return LMTask(name, _question_sequences(question_examples(name, train_count, _SPLIT_SEEDS["train"])),
                  _question_sequences(test), prompts, answers)


def pretraining_mixture(names, count_per_task: int) -> Sequences:
    """The pre-training data: ``count_per_task`` examples of each task in ``names`` (with the
    pre-training seed, apart from the fine-tuning data), padded to one length."""
    parts = []
    for name in names:
        if name == "python":
            parts.append(python_chunks("train", count_per_task, _SPLIT_SEEDS["pretrain"]))
        else:
            parts.append(_question_sequences(question_examples(name, count_per_task, _SPLIT_SEEDS["pretrain"])))
    return Sequences.concat(parts)
