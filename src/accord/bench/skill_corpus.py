"""The synthetic corpora of the skill-transfer benchmark (:mod:`accord.bench.skill`).

One character per token (:data:`VOCABULARY`). *General* lines apply a string task to 2 to 6
symbols (``c:ab3>ab3`` copy, ``r:`` reverse, ``s:`` sort, ``h:`` shift each symbol by one,
``d:`` double each symbol; :data:`CORPORA` says which tasks each corpus uses); *skill* lines
are additions ``123+45=168`` whose operands have 1 to ``digits`` digits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

VOCABULARY = "\n0123456789abcdefghijklmnopqrstuvwxyz:>+="
SYMBOLS = VOCABULARY[1:37]  # the digits and letters the string tasks are made of
_INDEX = {c: i for i, c in enumerate(VOCABULARY)}
TASKS: dict[str, Callable[[str], str]] = {
    "c": lambda s: s,
    "r": lambda s: s[::-1],
    "s": lambda s: "".join(sorted(s)),
    "h": lambda s: "".join(SYMBOLS[(SYMBOLS.index(c) + 1) % len(SYMBOLS)] for c in s),
    "d": lambda s: "".join(c + c for c in s),
}
CORPORA = {"general": "crs", "receiver": "rhd"}  # corpus → its tasks


def encode(text: str) -> Tensor:
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCABULARY[i] for i in ids)


def general_line(rng: random.Random, tasks: str) -> str:
    """``<task>:<string>><result>``, the task drawn from ``tasks``, the string of 2 to 6."""
    task = rng.choice(tasks)
    string = "".join(rng.choices(SYMBOLS, k=rng.randint(2, 6)))
    return f"{task}:{string}>{TASKS[task](string)}\n"


def general_text(seed: int, lines: int, tasks: str) -> str:
    rng = random.Random(seed)
    return "".join(general_line(rng, tasks) for _ in range(lines))


def operand(rng: random.Random, digits: int) -> int:
    """A number of 1 to ``digits`` digits: the digit count uniform, then the value."""
    count = rng.randint(1, digits)
    return rng.randint(0 if count == 1 else 10 ** (count - 1), 10**count - 1)


def addition_problems(seed: int, count: int, digits: int) -> list[tuple[int, int]]:
    """``count`` distinct pairs of :func:`operand`."""
    if count > 10 ** (2 * digits) // 4:  # far fewer than all pairs, or the draw drags on
        raise ValueError(f"{count} distinct problems of {digits} digits; ask for fewer")
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < count:
        pairs[operand(rng, digits), operand(rng, digits)] = None
    return list(pairs)


def skill_text(
    seed: int, lines: int, digits: int, held_out: set[tuple[int, int]], replay: float = 0.0
) -> tuple[str, Tensor]:
    """Lines ``a+b=c`` (no pair of ``held_out``), a fraction ``replay`` of them general lines
    instead (a fine-tune on a data mix keeps the base's skills, so τ holds the new skill rather
    than forgetting), and the mask of the characters the loss is taken on: each answer with its
    newline (the operands are random), and the whole of a general line."""
    rng = random.Random(seed)
    parts: list[str] = []
    mask: list[bool] = []
    while len(parts) < lines:
        if rng.random() < replay:
            parts.append(general_line(rng, CORPORA["general"]))
            mask += [True] * len(parts[-1])
            continue
        a, b = operand(rng, digits), operand(rng, digits)
        if (a, b) not in held_out:
            prompt, answer = f"{a}+{b}=", f"{a + b}\n"
            parts.append(prompt + answer)
            mask += [False] * len(prompt) + [True] * len(answer)
    return "".join(parts), torch.tensor(mask)
