"""Prompt datasets for SFT and GRPO: examples from the task registry or a JSONL file, the one
prompt encoding both use, and a resumable sampler of prompt batches.

    examples = task_examples("countdown", 500, seed=0, options={"count": 3})
    train, held_out = train_eval_split("arithmetic", 2000, 200, options={"digits": 2})   # disjoint
    sampler = PromptSampler(train, seed=0)
    batch = sampler.take(8)          # next 8 examples of a seeded per-epoch shuffle

The sampler's whole state is one integer (`position`): epoch e's order is a function of
(seed, e), so resuming needs nothing else.

Left out on purpose: chat templates (prompts are raw text, as the built-in tasks write them),
and streaming datasets too large for memory — RL prompt sets are small.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..tokenizer import Tokenizer
from ..tasks import Example, get_task


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Prompt ids: BOS (when the tokenizer has one) then the text. SFT and GRPO both use this, so
    the policy is trained on exactly the prompts it is later sampled from."""
    return tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)


def task_examples(task: str, n: int, *, seed: int = 0, options: dict[str, Any] | None = None,
                  exclude: Iterable[str] = ()) -> list[Example]:
    """`n` examples of a built-in task, seeded. options: the task's `make_example` keywords
    (retrieval tasks need `length_tokens`; their needle depth is drawn uniformly unless `depth`
    is given). exclude: prompts to leave out (e.g. a held-out set's), so two sets are disjoint.
    Duplicates within the set are allowed (small problem spaces, e.g. 1-digit arithmetic, have
    fewer distinct prompts than a training run draws)."""
    spec = get_task(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"number of examples must be an integer >= 0, got {n!r}")
    options = dict(options or {})
    if spec.kind == "retrieval" and "length_tokens" not in options:
        raise ValueError(f"task {task!r} needs task_options.length_tokens (the prompt length in bytes)")
    excluded = set(exclude)
    rng = random.Random(f"{task}/{seed}")
    out: list[Example] = []
    misses = 0
    while len(out) < n:
        kwargs = dict(options)
        if spec.kind == "retrieval" and "depth" not in kwargs:
            kwargs["depth"] = rng.random()
        try:
            ex = spec.make_example(rng, **kwargs)
        except TypeError as e:   # an unknown option name
            raise ValueError(f"task_options for {task!r}: {e}") from None
        if ex.prompt in excluded:
            misses += 1
            if misses > 100 * (n + 10):
                raise ValueError(f"task {task!r} with options {options} has too few prompts outside the "
                                 f"excluded set to draw {n} examples")
            continue
        out.append(ex)
    return out


def train_eval_split(task: str, train_size: int, eval_size: int, *, seed: int = 0,
                     options: dict[str, Any] | None = None) -> tuple[list[Example], list[Example]]:
    """A training set and a held-out set of a built-in task with no prompt in common."""
    held_out = task_examples(task, eval_size, seed=seed + 1, options=options)
    train = task_examples(task, train_size, seed=seed, options=options, exclude={ex.prompt for ex in held_out})
    return train, held_out


def load_examples(path: str | Path) -> list[Example]:
    """Examples from a JSONL file: one {"prompt": str, "answer": str, "meta": {...}?} per line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    out = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("answer"), str) or not isinstance(row.get("meta", {}), dict):
            raise ValueError(f"{path}:{number}: each line must be an object with string 'prompt' and "
                             f"'answer' and an optional object 'meta'")
        out.append(Example(row["prompt"], row["answer"], row.get("meta", {})))
    return out


class PromptSampler:
    """Draws examples in a seeded shuffle, epoch after epoch, without replacement within one.

    dataset: a non-empty sequence of examples. `take(n)` returns the next n (crossing into the
    next epoch's shuffle when one runs out); `position` counts examples drawn so far.
    """

    def __init__(self, dataset: Sequence[Example], seed: int = 0, position: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: give at least one example")
        self.dataset = dataset
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: list[int] = []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.dataset)))
            random.Random(f"prompts/{self.seed}/{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.dataset))
            out.append(self.dataset[self._order_of(epoch)[i]])
            self.position += 1
        return out
