"""Corpus text interleaved with long-context retrieval examples, for pretraining.

    corpus = PackedSequences(stdlib_documents(), ByteTokenizer(), seq_len=4096)
    mixed = MixedSequences(corpus, ByteTokenizer(), task_fraction=0.2)
    batch = mixed.next_batch(8)                   # (8, 4096) int64
    answers = MixedSequences(corpus, ByteTokenizer(), task_loss="answer")
    ids, labels = answers.next_batch(8)           # TokenBatch: -100 on the task prompts

Each sequence is, with probability `task_fraction`, one retrieval example — `prompt + answer`
as a single text, `[BOS] text EOS`, at a random needle depth — sized to fill the sequence
but for a few tokens, which are topped up with the next corpus tokens; otherwise it is the
next corpus sequence. No token is padding, and the corpus stream is consumed in order, so its
exactly-once-per-epoch coverage is kept.

Loss: `task_loss="all"` trains every token (batches are plain id tensors); `"answer"` trains a
task example on its answer and EOS only (batches are `TokenBatch(ids, labels)` with -100 on
the prompt: the answers are a few bytes of a long sequence and otherwise drown in the
prompt's filler), while corpus text, including the corpus tokens that top up a task row,
keeps its all-token loss. `length_range` draws each example's prompt length uniformly from
(low, high) tokens instead of filling the sequence, so training covers the lengths evaluation
asks at (a curriculum over lengths; needle depths are always uniform in [0, 1]); the rest of
the row is corpus text.

What each sequence is, and every random choice in it, is a function of (seed, sequence
index), so the state is the index plus the corpus sampler's state.

Prompt lengths are in the tokenizer's tokens: exact with the byte tokenizer; with a subword
tokenizer the longest prompt found within the length (`retrieval.fit_to_tokens`), so a few
more corpus tokens top the row up.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import torch

from ..tokenizer import Tokenizer
from ..training.data import PackedSequences, TokenBatch
from ..training.losses import IGNORE_INDEX
from .registry import TASKS
from .retrieval import fit_to_tokens

__all__ = ["MixedSequences"]

RETRIEVAL_TASKS = tuple(name for name, task in TASKS.items() if task.kind == "retrieval")
TASK_LOSSES = ("all", "answer")
# Bytes left for the answer after the prompt; answers are at most 30 digits (passkey digits<=30).
_ANSWER_ROOM = 32


class MixedSequences:
    """An endless, deterministic, resumable stream of (seq_len,) int64 sequences mixing
    `corpus` (whose seq_len is used; this object takes tokens from it) with retrieval tasks.

    `task_options` maps a task name to extra arguments for its make_example (e.g.
    {"variable_tracking": {"hops": 2}}).
    """

    def __init__(self, corpus: PackedSequences, tokenizer: Tokenizer, *, task_fraction: float = 0.25,
                 tasks: Sequence[str] = RETRIEVAL_TASKS,
                 task_options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
                 task_loss: str = "all", length_range: tuple[int, int] | None = None) -> None:
        if isinstance(task_fraction, bool) or not isinstance(task_fraction, (int, float)) \
                or not 0.0 <= task_fraction <= 1.0:
            raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction!r}")
        if isinstance(tasks, str) or not tasks or any(t not in RETRIEVAL_TASKS for t in tasks):
            raise ValueError(f"tasks must be a non-empty list of retrieval tasks from {list(RETRIEVAL_TASKS)}, "
                             f"got {tasks!r}")
        options = {name: dict(opts) for name, opts in (task_options or {}).items()}
        if set(options) - set(tasks):
            raise ValueError(f"task_options names tasks not in tasks={list(tasks)}: "
                             f"{sorted(set(options) - set(tasks))}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {list(TASK_LOSSES)}, got {task_loss!r}")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = corpus.seq_len
        self.task_fraction = float(task_fraction)
        self.tasks = list(tasks)
        self.task_options = options
        self.seed = seed
        self._index = 0
        self._length = self.seq_len - 1 - int(corpus.add_bos) - _ANSWER_ROOM  # EOS, BOS, answer
        self.task_loss = task_loss
        if length_range is not None:
            low, high = length_range
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= self._length):
                raise ValueError(f"length_range must be (low, high) with 1 <= low <= high <= {self._length} "
                                 f"(seq_len={self.seq_len} less BOS, EOS and {_ANSWER_ROOM} bytes of answer room), "
                                 f"got {length_range!r}")
            length_range = (low, high)
        self.length_range = length_range
        shortest = self._length if length_range is None else length_range[0]
        # Minimum lengths are deterministic: one try tells. With no task share, none is drawn.
        for name in (self.tasks if self.task_fraction > 0 else []):
            try:
                TASKS[name].make_example(random.Random(0), shortest, 0.5, **options.get(name, {}))
            except ValueError as e:
                what = (f"seq_len={self.seq_len} is too short" if length_range is None
                        else f"length_range={length_range} starts too short")
                raise ValueError(f"{what} for task {name!r} (it leaves {shortest} bytes for the prompt): "
                                 f"{e}") from None
            except TypeError as e:
                raise ValueError(f"task_options[{name!r}] has an argument its make_example does not "
                                 f"take: {e}") from None

    def __iter__(self) -> "MixedSequences":
        return self

    def __next__(self) -> torch.Tensor:
        return self._row()[0]

    def _row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next sequence's ids (seq_len,) and labels (seq_len,)."""
        rng = random.Random(f"dsv32-mix/{self.seed}/{self._index}")
        self._index += 1
        if rng.random() >= self.task_fraction:
            ids = self.corpus.take(self.seq_len)
            return ids, ids
        name = rng.choice(self.tasks)
        length = self._length if self.length_range is None else rng.randint(*self.length_range)
        depth, state = rng.random(), rng.getstate()

        def make(n_bytes: int):
            draws = random.Random()
            draws.setstate(state)                    # every size from the same draws
            return TASKS[name].make_example(draws, n_bytes, depth, **self.task_options.get(name, {}))
        example = fit_to_tokens(make, length, lambda text: len(self.tokenizer.encode(text)))
        prompt = self.tokenizer.encode(example.prompt, add_bos=self.corpus.add_bos)
        ids = prompt + self.tokenizer.encode(example.answer, add_eos=True)
        if len(ids) > self.seq_len:
            raise ValueError(f"a {name} example with a {length}-token prompt became {len(ids)} tokens, more "
                             f"than seq_len={self.seq_len}: its answer takes more than the {_ANSWER_ROOM} tokens "
                             f"left for it")
        rest = self.corpus.take(self.seq_len - len(ids))
        ids_t = torch.cat([torch.tensor(ids, dtype=torch.int64), rest])
        labels = ids_t.clone()
        if self.task_loss == "answer":
            labels[:len(prompt)] = IGNORE_INDEX
        return ids_t, labels

    def next_batch(self, batch_size: int) -> torch.Tensor | TokenBatch:
        """(batch_size, seq_len) int64 ids, or with task_loss="answer" a `TokenBatch` of ids
        and labels."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        rows = [self._row() for _ in range(batch_size)]
        ids = torch.stack([r[0] for r in rows])
        if self.task_loss == "all":
            return ids
        return TokenBatch(ids, torch.stack([r[1] for r in rows]))

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "task_fraction": self.task_fraction, "tasks": self.tasks,
                "task_options": self.task_options, "task_loss": self.task_loss,
                "length_range": None if self.length_range is None else list(self.length_range)}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self._index, "corpus": self.corpus.state_dict(), **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"index", "corpus", *self._settings()}
        if set(state) != expected:
            raise ValueError(f"state must have keys {sorted(expected)}, got {sorted(state)}")
        for key, value in self._settings().items():
            if state[key] != value:
                raise ValueError(f"state was saved with {key}={state[key]!r} but this mix has "
                                 f"{key}={value!r}; resume with the same settings")
        if not (isinstance(state["index"], int) and state["index"] >= 0):
            raise ValueError(f"state['index'] must be a non-negative integer, got {state['index']!r}")
        self.corpus.load_state_dict(state["corpus"])
        self._index = state["index"]
