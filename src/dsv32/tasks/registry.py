"""The task registry: each task's name, kind, example generator and scorer."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from .base import Example, score_exact
from .reasoning import make_arithmetic, make_countdown, score_countdown
from .retrieval import make_multikey_niah, make_passkey, make_variable_tracking

__all__ = ["Task", "TASKS", "get_task"]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "retrieval": make_example(rng, length_tokens, depth, ...); "reasoning": make_example(rng, ...)
    make_example: Callable[..., Example]
    score: Callable[[Example, str], float]
    description: str


TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in (
    Task("passkey", "retrieval", make_passkey, score_exact,
         "a number hidden in filler text, asked for at the end"),
    Task("multikey_niah", "retrieval", make_multikey_niah, score_exact,
         "several key -> number needles in filler; the number of one key is asked for"),
    Task("variable_tracking", "retrieval", make_variable_tracking, score_exact,
         "chains of variable assignments in filler; the value of a chain's last variable is asked for"),
    Task("arithmetic", "reasoning", make_arithmetic, score_exact,
         "a + b, a - b or a * b with multi-digit operands; exact integer answer"),
    Task("countdown", "reasoning", make_countdown, score_countdown,
         "reach a target from given numbers with + - * /; the expression is verified"),
)})


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
