"""Rewards for GRPO: plain Python callables, built-in verifiable task rewards, and a scorer that
turns a reward function's mistakes into counted failures instead of crashes.

A reward function is any callable

    reward(prompt: str, completion: str, example: Example) -> float

where `completion` is the generated text (special tokens removed) and `example` the task record
the prompt came from (its `answer` and `meta` are what a verifier needs). Several functions are
summed.

Time limit. `RewardScorer(..., timeout=SECONDS)` (`dsv32 grpo --reward-timeout SECONDS`) runs
the calls in a worker process that is reused across steps and killed and restarted when a call
overruns (`dsv32.rl.reward_worker`); the functions must then be picklable (module-level). Without
a limit they run in the trainer's process, and a function that hangs stalls the run.

Failures. A call that raises, overruns the time limit, or returns NaN, +-inf, a number beyond
float32's range (the scores are float32: 1e308 would overflow) or something that is not a real
number, is a *failure*: it scores `failure_value` (0 by default), is counted in the step's
metrics (`reward_failures`, and `reward_failures/NAME` per function), and is reported once per
kind (function, exception type or bad value) as a `RewardWarning` with the exception's type and
message. A function that fails on EVERY sample of a batch is broken, not unlucky — training on
its constant failure value would be silent nonsense — so the scorer stops with a `RewardError`
that names it.

Left out on purpose: reward models (a neural scorer is just another callable here) and reward
shaping beyond summing (length penalties and format bonuses are further callables).
"""

from __future__ import annotations

import importlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..tasks import Example, get_task, score_exact
from .reward_worker import Outcome, RewardWorker

RewardFn = Callable[[str, str, Example], float]


class RewardError(RuntimeError):
    """A reward function failed on every sample of a batch."""


class RewardWarning(UserWarning):
    """A reward call failed (raised, or returned NaN/inf/a non-number); scored as a failure."""


def reward_name(fn: RewardFn) -> str:
    """A readable name for messages and metrics: the function's name, else its repr."""
    return getattr(fn, "__name__", None) or repr(fn)


class TaskReward:
    """The reward of a built-in task (`task_reward`); a class, not a closure, so that it pickles
    into the reward worker process."""

    def __init__(self, task: str) -> None:
        get_task(task)                                   # an unknown task fails here
        self.task = task
        self.__name__ = f"{task}_exact"

    def __call__(self, prompt: str, completion: str, example: Example) -> float:
        return get_task(self.task).score(example, completion)

    def __repr__(self) -> str:
        return f"task_reward({self.task!r})"


def task_reward(task: str) -> RewardFn:
    """Exact-match (or, for countdown, verified) reward of a built-in task: 1.0 or 0.0.

    Uses the task's own scorer (`dsv32.tasks`), which forgives only whitespace and a
    trailing end-of-text marker, so the reward cannot be gamed by a lenient parser.
    """
    return TaskReward(task)


def is_correct(example: Example, completion: str) -> bool:
    """Whether `completion` solves `example` by its task's scorer (`meta["task"]`), or by exact
    match with the answer for examples from no built-in task. The accuracy metric, kept apart
    from the (possibly shaped) reward being optimised."""
    task = example.meta.get("task")
    score = get_task(task).score if task is not None else score_exact
    return score(example, completion) == 1.0


def load_reward(spec: str) -> RewardFn:
    """A reward from a spec: "task:NAME" for a built-in task, or "package.module:function"."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward must be 'task:NAME' or 'module:function', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if module_name == "task":
        return task_reward(attr)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def call_reward(fn: RewardFn, prompt: str, completion: str, example: Example) -> Outcome:
    """One reward call: ("ok", value) for a finite real number within float32's range, else
    ("fail", kind, description of what went wrong). Runs in the trainer or in the worker."""
    try:
        value = fn(prompt, completion, example)
    except Exception as e:  # a user's function may raise anything; it must not end the run
        return "fail", type(e).__name__, f"raised {type(e).__name__}: {e}"
    if not isinstance(value, numbers.Real):
        return "fail", f"non-number {type(value).__name__}", f"returned {type(value).__name__} {value!r:.60}"
    try:
        value = float(value)
    except (OverflowError, ValueError, TypeError) as e:   # a huge int, or a Real that will not convert
        return "fail", "overflow", f"returned {value!r:.60}, not a float ({e})"
    if math.isnan(value):
        return "fail", "NaN", "returned NaN"
    if math.isinf(value):
        return "fail", "inf", f"returned {value}"
    if abs(value) > _FLOAT32_MAX:
        return "fail", "overflow", f"returned {value:g}, beyond float32's range (|r| <= {_FLOAT32_MAX:.3g})"
    return "ok", value


@dataclass
class RewardScores:
    rewards: torch.Tensor           # (B,) float32: the sum of all functions, failures scored as failure_value
    failures: int                   # failed calls in this batch, all functions together
    per_function: dict[str, torch.Tensor]   # name -> (B,) float32, each function's own scores
    failures_by_function: dict[str, int]    # name -> failed calls of that function in this batch


class RewardScorer:
    """Scores batches with a list of reward functions, handling their failures (module docstring).

    reward_fns: one or more callables (prompt, completion, example) -> float, summed.
    failure_value: what a failed call scores (default 0.0, the reward of a wrong answer).
    timeout: seconds one call may take, enforced in a worker process; None = no limit, in-process.
    Call `close()` when done (it stops the worker).
    """

    def __init__(self, reward_fns: RewardFn | Sequence[RewardFn], *, failure_value: float = 0.0,
                 timeout: float | None = None) -> None:
        fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not fns:
            raise ValueError("reward_fns must hold at least one reward function")
        for fn in fns:
            if not callable(fn):
                raise TypeError(f"reward functions must be callables (prompt, completion, example) -> float, "
                                f"got {type(fn).__name__}")
        if isinstance(failure_value, bool) or not isinstance(failure_value, numbers.Real) \
                or not math.isfinite(failure_value):
            raise ValueError(f"failure_value must be a finite number, got {failure_value!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                    or not 0 < timeout < math.inf):
            raise ValueError(f"reward timeout must be a number of seconds > 0 (or None for no limit), got {timeout!r}")
        self.reward_fns = fns
        self.failure_value = float(failure_value)
        self._warned: set[tuple[str, str]] = set()
        names = [reward_name(fn) for fn in fns]
        # Two functions may share a name (two lambdas): number them so metrics keep both.
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.worker = None if timeout is None else RewardWorker(fns, self.names, call_reward, timeout)

    def close(self) -> None:
        """Stop the worker process (if any); the scorer starts a new one if called again."""
        if self.worker is not None:
            self.worker.close()

    def _outcomes(self, index: int, calls: list[tuple[str, str, Example]]) -> list[Outcome]:
        if self.worker is not None:
            return self.worker.run(index, calls)
        return [call_reward(self.reward_fns[index], *call) for call in calls]

    def _warn_once(self, name: str, kind: str, message: str) -> None:
        if (name, kind) in self._warned:
            return
        self._warned.add((name, kind))
        warnings.warn(f"reward function {name!r} {message}; scored as a failure ({self.failure_value}). "
                      f"Further failures of this kind are counted in the metrics, not shown.",
                      RewardWarning, stacklevel=3)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 examples: Sequence[Example]) -> RewardScores:
        if not len(prompts) == len(completions) == len(examples):
            raise ValueError(f"prompts, completions and examples must have one entry per sample, got "
                             f"{len(prompts)}, {len(completions)}, {len(examples)}")
        B = len(completions)
        total = torch.zeros(B, dtype=torch.float32)
        per_function: dict[str, torch.Tensor] = {}
        by_function: dict[str, int] = {}
        calls = list(zip(prompts, completions, examples))
        for index, name in enumerate(self.names):
            scores = torch.empty(B, dtype=torch.float32)
            failed, last = 0, ""
            for i, outcome in enumerate(self._outcomes(index, calls)):
                if outcome[0] == "ok":
                    scores[i] = outcome[1]
                    continue
                _, kind, message = outcome
                failed += 1
                last = message
                scores[i] = self.failure_value
                self._warn_once(name, kind, message)
            if B and failed == B:
                raise RewardError(f"reward function {name!r} failed on all {B} samples of a batch "
                                  f"(last failure: {last}); fix the function or remove it")
            by_function[name] = failed
            per_function[name] = scores
            total += scores
        return RewardScores(total, sum(by_function.values()), per_function, by_function)
