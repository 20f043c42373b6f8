"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al.,
2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"), written for
this library: sequences of integer token ids, labels in Hugging Face's convention.

    task = MQAR(vocab_size=256, num_pairs=64, seq_len=1024)
    batch = task.batch(torch.Generator().manual_seed(0), 32)    # TokenBatch (ids, labels)
    data = MQARSequences(task, seed=0)                          # a resumable trainer data source

One sequence of length T with N pairs (the construction of Zoology's generator):

    position  0   1   2   3  ...  2N-2 2N-1 | 2N ...                                  T-1
    token     k1  v1  k2  v2 ...  kN   vN   | filler, and each key once more as a query q
                                            |   at an even offset 2N + 2g, followed by its value

* keys are N distinct ids from [1, V/2), values N distinct ids from [V/2, V) (`V = vocab_size`;
  with `distinct_values=False` values may repeat, as two keys may share a value in real data);
* the query region has S = (T - 2N) // 2 slots; each key is queried once, at the slot g drawn
  without replacement with probability p(g) proportional to (g + 1)^(power_a - 1): Zoology's
  power law (power_a = 0.01 puts most queries close to the pairs, 1.0 spreads them uniformly);
* only the position after a query carries a label, the key's value: the model, reading the
  query, must predict the value it saw after that key in the context. As in Zoology, that
  position's input is filler and the value is only in the labels (`show_answers=False`), so
  every value occurs once in the ids, in its pair;
* every other query-region position is filler: 0 (`random_fill=False`, Zoology's default) or a
  random id from [1, V/2) that is not one of this sequence's keys, so no key ever repeats
  except as its query (Zoology's random filler draws from the whole vocabulary, so a filler
  may equal a key).

`show_answers=True` writes each value into the ids after its query too (one plain text that
teacher forcing reads left to right). Then a later query sees the earlier answers, and a
model that never binds a key to its value scores H_N / N (H_N = 1 + 1/2 + ... + 1/N; 0.34 at
N = 8) by guessing among the values not yet answered: a 2-layer model trained 3000 steps at
T = 128, N = 8 plateaued there (README, "Retrieval: does DSA keep it?"). Keep it off to
measure recall.

Accuracy = argmax of the logits at each query position equals the value (`answer_accuracy`);
`meta` records, per answer, the context position of the value it must copy (the "needle" that
sparse attention has to keep: `evaluate.needle_selected`).

`MQARSequences(..., stages=...)` is a curriculum over (T, N), easiest first: what lets a small
model learn the binding on CPU (see its docstring).

Left out: Zoology's multi-pass contexts and mixtures of several (T, N) settings in one batch
(a mixture from the start learned slower here than the staged curriculum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..training.data import TokenBatch
from ..training.losses import IGNORE_INDEX
from ..validation import check_bool, check_int

__all__ = ["MQAR", "MQARSequences", "answer_accuracy"]


@dataclass(frozen=True)
class MQAR:
    vocab_size: int = 256        # ids 0 .. V-1 (0 = filler); the model's vocabulary must hold them
    num_pairs: int = 64          # N key-value pairs, each queried once
    seq_len: int = 1024          # T
    power_a: float = 0.01        # query-slot distribution, p(g) ~ (g + 1)^(power_a - 1)
    random_fill: bool = True     # filler: random unused keys (True) or 0
    distinct_values: bool = True
    show_answers: bool = False   # also write each value into the ids after its query (see above)

    def __post_init__(self) -> None:
        check_int("num_pairs", self.num_pairs, 1)
        check_int("vocab_size", self.vocab_size, 4)
        check_int("seq_len", self.seq_len, 2)
        for name in ("random_fill", "distinct_values", "show_answers"):
            check_bool(name, getattr(self, name))
        keys = self.vocab_size // 2 - 1
        if self.num_pairs > keys or (self.distinct_values and self.num_pairs > self.vocab_size - self.vocab_size // 2):
            raise ValueError(f"num_pairs={self.num_pairs} needs as many distinct keys in [1, vocab_size/2): "
                             f"vocab_size must be >= {2 * self.num_pairs + 2}, got {self.vocab_size}")
        if self.random_fill and self.num_pairs == keys:
            raise ValueError(f"random_fill draws filler from the unused keys; num_pairs={self.num_pairs} uses all "
                             f"{keys} keys of vocab_size={self.vocab_size}: raise vocab_size or set random_fill=False")
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(f"seq_len must be >= 4 * num_pairs = {4 * self.num_pairs} (the pairs, then a query "
                             f"and its answer per pair), got {self.seq_len}")
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise ValueError(f"power_a must be a number > 0, got {self.power_a!r}")

    @property
    def slots(self) -> int:
        return (self.seq_len - 2 * self.num_pairs) // 2

    def slot_weights(self) -> torch.Tensor:
        """(S,) float64: p(g) of a query at slot g, Zoology's power law, normalised."""
        g = torch.arange(1, self.slots + 1, dtype=torch.float64)
        p = g ** (self.power_a - 1)
        return p / p.sum()

    def batch(self, generator: torch.Generator, batch_size: int) -> TokenBatch:
        """`batch_size` sequences: ids (B, T) int64 and labels (B, T), IGNORE_INDEX except at the
        answers."""
        check_int("batch_size", batch_size, 1)
        B, N, T, half = batch_size, self.num_pairs, self.seq_len, self.vocab_size // 2
        keys = torch.rand(B, half - 1, generator=generator).argsort(-1) + 1            # a permutation of keys
        pair_keys = keys[:, :N]
        if self.distinct_values:
            values = torch.rand(B, self.vocab_size - half, generator=generator).argsort(-1)[:, :N] + half
        else:
            values = torch.randint(half, self.vocab_size, (B, N), generator=generator)
        if self.random_fill:
            unused = keys[:, N:]
            pick = torch.randint(0, unused.shape[1], (B, T), generator=generator)
            ids = unused.gather(1, pick)
        else:
            ids = torch.zeros(B, T, dtype=torch.int64)
        ids[:, 0:2 * N:2], ids[:, 1:2 * N:2] = pair_keys, values
        slot = torch.multinomial(self.slot_weights().expand(B, -1).float(), N, replacement=False, generator=generator)
        query = 2 * N + 2 * slot                                                          # (B, N) positions
        ids.scatter_(1, query, pair_keys)
        if self.show_answers:
            ids.scatter_(1, query + 1, values)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels.scatter_(1, query + 1, values)
        return TokenBatch(ids, labels)

    def settings(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "num_pairs": self.num_pairs, "seq_len": self.seq_len,
                "power_a": self.power_a, "random_fill": self.random_fill, "distinct_values": self.distinct_values,
                "show_answers": self.show_answers}


def needle_positions(ids: torch.Tensor, labels: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """For every position, the context position of the value it must copy: (B, T) int64, -1
    where the label is ignored. The value at answer position t is the one that followed the
    key ids[t - 1] in the context (positions 0 .. 2N-1)."""
    B, T = ids.shape
    context_keys = ids[:, 0:2 * num_pairs:2]                                      # (B, N)
    query_keys = torch.cat((ids[:, :1], ids[:, :-1]), dim=1)                      # token before each position
    match = query_keys[:, :, None] == context_keys[:, None, :]                    # (B, T, N)
    pair = match.float().argmax(-1)
    found = match.any(-1) & (labels != IGNORE_INDEX)
    return torch.where(found, 2 * pair + 1, torch.full_like(pair, -1))


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Over the labelled positions: accuracy of argmax (the logits at t - 1 predict label t),
    mean answer NLL, and the share of sequences with every answer right ("exact_match").
    logits (B, T, V), labels (B, T)."""
    target = labels[:, 1:]
    counted = target != IGNORE_INDEX
    pred = logits[:, :-1].float()
    right = (pred.argmax(-1) == target) & counted
    logp = torch.log_softmax(pred, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    n = int(counted.sum())
    if n == 0:
        raise ValueError("no labelled positions to score")
    rows = counted.any(1)
    exact = ((right | ~counted).all(1) & rows).sum() / rows.sum()
    return {"accuracy": float(right.sum()) / n, "answer_nll": float(-(logp * counted).sum()) / n,
            "exact_match": float(exact), "answers": n}


class MQARSequences:
    """The trainer's data source: `next_batch(n)` is the next n sequences of `task`, each batch
    from a generator seeded by (seed, batch index), so the state is the index (and the stage).

    `lengths`, if given, cycles: batch i uses seq_len lengths[i % len(lengths)] (same pairs), so
    one run covers every evaluation length.

    `stages`, if given, is a curriculum over (seq_len, num_pairs), easiest first, ending at the
    task's own (seq_len, num_pairs): batches come from the current stage until `advance()`
    moves to the next (the caller decides when, e.g. once held-out accuracy on the stage passes
    a threshold: `recall_study`). Each stage's batch holds the same number of tokens as a batch
    of the final stage: `next_batch(n)` returns n * seq_len // stage_seq_len sequences. Why: a
    2-layer model trained straight on many pairs sits at the 1/N floor of guessing among the
    context's values for thousands of steps; with 2 pairs the key-value binding (an induction
    head) forms within a few hundred, and then carries over as pairs and length grow
    (README, "Retrieval: does DSA keep it?")."""

    def __init__(self, task: MQAR, seed: int = 0, *, lengths: tuple[int, ...] | None = None,
                 stages: tuple[tuple[int, int], ...] | None = None) -> None:
        check_int("seed", seed, 0)
        if lengths and stages:
            raise ValueError("give lengths (cycled) or stages (a curriculum), not both")
        self.task, self.seed = task, seed
        self.stages = self._stages(task, stages) if stages else ()
        if self.stages:
            self.variants = []
            for i, (t, n) in enumerate(self.stages):
                try:
                    self.variants.append(MQAR(**{**task.settings(), "seq_len": t, "num_pairs": n}))
                except ValueError as e:
                    raise ValueError(f"stages[{i}] = {(t, n)}: {e}") from None
        else:
            self.variants = [task] if not lengths else [MQAR(**{**task.settings(), "seq_len": n}) for n in lengths]
        self.seq_len = max(t.seq_len for t in self.variants)
        self._index = 0
        self.stage = 0

    @staticmethod
    def _stages(task: MQAR, stages) -> tuple[tuple[int, int], ...]:
        out = []
        for i, stage in enumerate(stages):
            if (not isinstance(stage, (tuple, list)) or len(stage) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in stage)):
                raise ValueError(f"stages[{i}] must be a pair (seq_len, num_pairs) of ints, got {stage!r}")
            out.append((int(stage[0]), int(stage[1])))
        if out[-1] != (task.seq_len, task.num_pairs):
            raise ValueError(f"the last stage must be the task's own (seq_len, num_pairs) = "
                             f"{(task.seq_len, task.num_pairs)}, got {out[-1]}")
        return tuple(out)

    @property
    def current(self) -> MQAR:
        """The task batches come from now."""
        return self.variants[self.stage] if self.stages else self.variants[self._index % len(self.variants)]

    @property
    def last_stage(self) -> bool:
        return not self.stages or self.stage == len(self.stages) - 1

    def advance(self) -> bool:
        """Move to the next curriculum stage; False (and no change) at the last."""
        if self.last_stage:
            return False
        self.stage += 1
        return True

    def next_batch(self, batch_size: int) -> TokenBatch:
        task = self.current
        if self.stages:
            batch_size = max(1, batch_size * self.task.seq_len // task.seq_len)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._index)
        self._index += 1
        return task.batch(g, batch_size)

    def _settings(self) -> dict[str, Any]:
        settings = {"seed": self.seed, **self.task.settings()}
        if self.stages:
            return {**settings, "stages": [list(s) for s in self.stages]}
        return {**settings, "lengths": [t.seq_len for t in self.variants]}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self._index, "stage": self.stage, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(f"state was saved with {key}={state.get(key)!r} but this task has {key}={value!r}")
        self._index = int(state["index"])
        self.stage = int(state.get("stage", 0))


def chance_accuracy(task: MQAR) -> float:
    """Accuracy of guessing a value uniformly: the floor a model that has not learned sits at."""
    return 1.0 / math.ceil(task.vocab_size - task.vocab_size // 2)
