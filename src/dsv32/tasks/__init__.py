"""Synthetic tasks for long-context training/evaluation and for RL, and a registry by name.

    task = get_task("passkey")
    ex = task.make_example(random.Random(0), length_tokens=4096, depth=0.25)
    reward = task.score(ex, completion)          # 1.0 or 0.0

Retrieval tasks ("passkey", "multikey_niah", "variable_tracking") take
`make_example(rng, length_tokens, depth=0.5, **options)`; reasoning tasks ("arithmetic",
"countdown") take `make_example(rng, **options)`. `Task.kind` says which. Formats and
scoring rules are documented in `retrieval`, `reasoning` and `base`; `mixing` interleaves
retrieval examples with corpus text for pretraining. `mqar` is multi-query associative recall
over integer token ids (no text), a trainer data source of its own.
"""

from __future__ import annotations

from .base import Example, normalise_completion, score_exact
from .mixing import MixedSequences
from .mqar import MQAR, MQARSequences
from .reasoning import check_countdown, make_arithmetic, make_countdown, score_countdown
from .registry import TASKS, Task, get_task
from .retrieval import make_multikey_niah, make_passkey, make_variable_tracking

__all__ = ["Example", "Task", "TASKS", "get_task", "normalise_completion", "score_exact", "MixedSequences", "MQAR",
           "MQARSequences",
           "make_passkey", "make_multikey_niah", "make_variable_tracking", "make_arithmetic",
           "make_countdown", "score_countdown", "check_countdown"]
