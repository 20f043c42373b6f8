"""Short verifiable reasoning tasks for RL: multi-digit arithmetic and Countdown.

Arithmetic: `a op b` with `digits`-digit operands and op in + - *; the answer is the exact
integer (negative for some subtractions), scored by exact match. Division is left out: its
answers would need a rounding or fraction convention that exact match cannot forgive.

Countdown: reach `target` from the given numbers with + - * / and parentheses, each number
used at most once (not all need be used). Every puzzle is solvable: the target is built by
combining all the numbers with positive-integer intermediate results, and that expression is
the reference answer. Any correct expression earns the reward, so the scorer VERIFIES
instead of comparing strings: `parse_expression` is a small recursive-descent parser over
integers, + - * / and parentheses (no eval, no `ast`, nothing else accepted — no names,
calls, unary minus or exponentiation), capped at `MAX_EXPRESSION_CHARS` and 32 levels of
parentheses so a hostile completion cannot cost much. The expression is evaluated in exact
rational arithmetic; unlike the TV show, and like the usual RL Countdown rewards, fractional
intermediate results are allowed (7/2*2 reaches 7). A division by zero scores 0.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction
from typing import Union

from .base import Example, check_int, normalise_completion

__all__ = ["make_arithmetic", "make_countdown", "score_countdown", "check_countdown", "parse_expression",
           "evaluate_expression", "Expression", "MAX_EXPRESSION_CHARS"]

MAX_EXPRESSION_CHARS = 256
_OPS = "+-*"


def make_arithmetic(rng: random.Random, digits: int = 3, ops: str = _OPS) -> Example:
    """`What is a op b?` with two `digits`-digit operands and op drawn from `ops`."""
    check_int("digits", digits, 1, 30)
    if not isinstance(ops, str) or not ops or set(ops) - set(_OPS):
        raise ValueError(f"ops must be a non-empty string of characters from {_OPS!r}, got {ops!r}")
    low = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randint(low, 10 ** digits - 1), rng.randint(low, 10 ** digits - 1)
    op = rng.choice(ops)
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return Example(prompt=f"Question: What is {a} {op} {b}?\nAnswer: ", answer=str(result),
                   meta={"task": "arithmetic", "a": a, "b": b, "op": op, "digits": digits})


# ----------------------------------------------------------------------------- Countdown
# A parsed expression: an int leaf, or (op, left, right).
Expression = Union[int, tuple[str, "Expression", "Expression"]]
# [0-9], not \d: \d also matches other scripts' digits, which int() would accept.
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_MAX_NESTING = 32
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def parse_expression(text: str) -> Expression:
    """Parse `text` (integers, + - * /, parentheses, spaces). Raises ValueError if it is
    anything else, too long, or malformed."""
    if not isinstance(text, str):
        raise TypeError(f"expression must be a str, got {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[int | str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected character {text[pos]!r} at {pos} in expression {text!r}")
        tokens.append(int(match.group(1)) if match.group(1) else match.group(2))
        pos = match.end()
    nesting = 0
    for token in tokens:  # bound the parser's recursion before it starts
        nesting += (token == "(") - (token == ")")
        if nesting > _MAX_NESTING:
            raise ValueError(f"expression nests parentheses deeper than {_MAX_NESTING}")
    parser = _Parser(tokens)
    tree = parser.expression()
    if parser.pos != len(tokens):
        raise ValueError(f"unexpected {tokens[parser.pos]!r} in expression {text!r}")
    return tree


class _Parser:
    """expression := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := INTEGER | '(' expression ')'."""

    def __init__(self, tokens: list[int | str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self) -> Expression:
        node = self.term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            node = (op, node, self.term())
        return node

    def term(self) -> Expression:
        node = self.factor()
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            node = (op, node, self.factor())
        return node

    def factor(self) -> Expression:
        token = self._peek()
        self.pos += 1
        if isinstance(token, int):
            return token
        if token == "(":
            node = self.expression()
            if self._peek() != ")":
                raise ValueError("missing ')'")
            self.pos += 1
            return node
        raise ValueError(f"expected a number or '(', got {'end of input' if token is None else repr(token)}")


def _leaves(tree: Expression) -> list[int]:
    return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


def evaluate_expression(tree: Expression) -> Fraction:
    """Exact value of a parsed expression; ValueError on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = evaluate_expression(left), evaluate_expression(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ValueError("division by zero")
    return a / b


def check_countdown(expression: str, numbers: list[int], target: int) -> bool:
    """True when `expression` parses, uses each of `numbers` at most once (as a multiset) and
    no other number, and equals `target` exactly."""
    try:
        tree = parse_expression(expression)
    except ValueError:
        return False
    # Check the numbers before evaluating, so only the given (small) numbers are ever multiplied.
    if Counter(_leaves(tree)) - Counter(numbers):
        return False
    try:
        return evaluate_expression(tree) == target
    except ValueError:
        return False


def score_countdown(example: Example, completion: str) -> float:
    """1.0 when the normalised completion is a valid expression for the example's puzzle."""
    return 1.0 if check_countdown(normalise_completion(completion), example.meta["numbers"],
                                  example.meta["target"]) else 0.0


def make_countdown(rng: random.Random, count: int = 4, max_number: int = 100,
                   max_target: int = 1000) -> Example:
    """`count` numbers in [1, max_number] and a target in [1, max_target] reachable by
    combining all of them; the target is never one of the numbers, so some arithmetic is needed."""
    check_int("count", count, 2, 8)
    check_int("max_number", max_number, 2)
    check_int("max_target", max_target, 3)
    # Any draw can be rejected (a target out of range, or equal to a number); with these bounds
    # a few tries usually suffice, and 2 + 1 = 3 <= max_target is always reachable eventually.
    for _ in range(10_000):
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        value, text = _combine(rng, numbers)
        if 1 <= value <= max_target and value not in numbers:
            break
    else:
        raise RuntimeError(f"no countdown puzzle found for count={count}, max_number={max_number}, "
                           f"max_target={max_target}")
    prompt = (f"Using the numbers {numbers}, each at most once, and + - * / with parentheses, "
              f"write an expression that equals {value}.\nAnswer: ")
    return Example(prompt=prompt, answer=text,
                   meta={"task": "countdown", "numbers": numbers, "target": value, "count": count})


def _combine(rng: random.Random, numbers: list[int]) -> tuple[int, str]:
    """Combine all `numbers` in a random order with random operations whose results are
    positive integers; returns the value and the expression with only needed parentheses."""
    pool: list[tuple[int, str, int]] = [(n, str(n), _ATOM) for n in numbers]  # value, text, precedence
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        if a[0] < b[0]:
            a, b = b, a  # larger first keeps subtraction positive and makes division possible
        ops = ["+", "*"]
        if a[0] > b[0]:
            ops.append("-")
        if b[0] > 1 and a[0] % b[0] == 0:
            ops.append("/")
        op = rng.choice(ops)
        value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0], "/": a[0] // b[0]}[op]
        prec = _PRECEDENCE[op]
        left = a[1] if a[2] >= prec else f"({a[1]})"
        # The right operand of - or / needs parentheses at equal precedence too: a-(b-c) != a-b-c.
        right = b[1] if b[2] > prec or (b[2] == prec and op in "+*") else f"({b[1]})"
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"{left} {op} {right}", prec)]
    return pool[0][0], pool[0][1]
