"""What every synthetic task shares: the `Example` record, exact-match scoring; task makers check
their arguments with `dsv32.validation.check_int` (re-exported here).

Scoring is strict on purpose — these rewards drive evaluation and RL, where a lenient parser
is reward-hacked first. A completion is compared after `normalise_completion`, which forgives
only (a) whitespace, including newlines, around the answer and (b) one trailing end-of-text
marker as the byte tokenizer renders it with `decode(..., skip_special=False)` ("<|eos|>").
Anything else — extra words, "Answer: 42", a different number format, text after a newline —
scores 0.0. Decoding with `skip_special=True` (the default) removes EOS for any tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..tokenizer import ByteTokenizer
from ..validation import check_int  # re-exported: the task makers' argument check

__all__ = ["Example", "normalise_completion", "score_exact", "check_int"]

EOS_TEXT = ByteTokenizer.SPECIAL_TEXT[ByteTokenizer.EOS]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the reference answer; the model's text should follow the prompt directly
    meta: dict[str, Any] = field(default_factory=dict)  # task name, parameters, needle offsets...

    @property
    def text(self) -> str:
        """Prompt and answer as one training text."""
        return self.prompt + self.answer


def normalise_completion(completion: str) -> str:
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = completion.strip()
    if text.endswith(EOS_TEXT):
        text = text[:-len(EOS_TEXT)].rstrip()
    return text


def score_exact(example: Example, completion: str) -> float:
    """1.0 when the normalised completion equals the reference answer, else 0.0."""
    return 1.0 if normalise_completion(completion) == example.answer else 0.0
