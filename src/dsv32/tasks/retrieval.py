"""Long-context retrieval tasks at any length and needle depth: passkey, multi-key needle in a
haystack, and variable tracking (in the spirit of the passkey test of Mohtashami & Jaggi and
RULER's NIAH/VT tasks; wording and construction are our own).

Every prompt is `instruction + haystack + question` and is exactly `length_tokens` UTF-8
bytes long — tokens of the byte tokenizer — with no tolerance. The haystack is filler text
(random sentences from a small built-in list of plain English sentences, which contain no
digits, so a number in the prompt can only come from a needle) with the needles inserted at
sentence boundaries. To hit the length exactly, the last filler piece is the start of a
sentence, cut at a word and closed with a full stop, padded with a few spaces.

Depth: with F bytes of filler, the needle (for variable tracking, the chain's first
statement, the one that holds the number) is inserted at the sentence boundary nearest to
byte `depth * F` of the filler, so it lands within `MAX_PIECE_BYTES / 2` bytes of the
requested depth (0 = right after the instruction, 1 = at the end of the filler, before the question).
`meta["needle_offset"]` is the needle's byte offset in the prompt, `meta["needle_depth"]`
the depth actually used (boundary offset / F).

Variable tracking asks for a value, not for a list of names: the prompt holds `num_chains`
chains `VAR A = 12345. ... VAR B = VAR A. ... VAR C = VAR B.`, each with its own number, and
the question asks for the value of the last variable of one chain. Following the chain is
required because the distractor chains put other numbers in the prompt, and a single number
keeps the answer exact-match scorable.

Other tokenizers: `fit_to_tokens(make, length, count)` sizes an example in the tokens of any
tokenizer — the largest prompt, in bytes, whose tokens (`count`) do not exceed `length`, found
by a few rebuilds of the example (a subword tokenizer's tokens per byte varies with the text, so
the prompt is at most `length` tokens, usually within a few of it, not exactly `length`).

Deliberately left out: non-English filler, and RULER's other task families (QA, aggregation).
"""

from __future__ import annotations

import bisect
import random
import string
from typing import Any, Callable

from .base import Example, check_int

__all__ = ["make_passkey", "make_multikey_niah", "make_variable_tracking", "fit_to_tokens", "SENTENCES",
           "MAX_PIECE_BYTES"]

# Plain, unremarkable sentences: natural-looking filler with no digits and none of the needle
# phrases ("pass key", "magic number", "VAR").
SENTENCES: tuple[str, ...] = (
    "The morning light came through the kitchen window and settled on the table.",
    "She folded the letter twice before putting it back into the envelope.",
    "A light rain had started by the time the bus reached the edge of town.",
    "Most of the shops on the old street close early on Sundays.",
    "He spent the afternoon repairing the fence behind the garden.",
    "The river was higher than usual after a week of storms in the hills.",
    "Nobody remembered who had planted the apple tree near the gate.",
    "The library keeps its oldest maps in a cool room on the top floor.",
    "They walked along the shore until the path turned inland through the dunes.",
    "A small boat drifted past the harbour wall with its sail half raised.",
    "The soup needed more salt, but everyone was too polite to say so.",
    "Every spring the swallows return to the barn and rebuild their nests.",
    "The train slowed down as it crossed the long bridge over the valley.",
    "Her grandfather taught her how to read the clouds before a storm.",
    "The committee agreed to meet again once the new figures were ready.",
    "Bread from the corner bakery is usually sold out before noon.",
    "A cat slept on the warm stone step in front of the post office.",
    "The museum added a new wing for paintings from the northern coast.",
    "He wrote his notes in pencil so that he could change them later.",
    "The forest path was covered in leaves and hard to follow in places.",
    "Children played football in the square until the street lamps came on.",
    "The old clock in the hallway ran a few minutes slow every week.",
    "Fresh snow had fallen overnight, and the roads were quiet and white.",
    "The farmer checked the sky and decided to bring the hay in early.",
    "A narrow staircase led up to a room full of books and dusty chairs.",
    "The market sells fruit, cheese, and flowers on most weekday mornings.",
    "She practised the piano every evening after the dishes were done.",
    "The lighthouse keeper wrote down the weather in a thick blue notebook.",
    "Two friends shared an umbrella while they waited for the ferry.",
    "The garden smelled of mint and wet earth after the rain stopped.",
    "Somewhere down the hall a radio was playing an old song.",
    "The mountain hut has a stove, a table, and a shelf of spare blankets.",
    "He could never decide whether he preferred tea or coffee in the morning.",
    "The bridge was painted green so that it would match the park around it.",
    "A group of students gathered on the steps to compare their notes.",
    "The wind picked up in the evening and rattled the loose shutters.",
    "Her bicycle had a basket on the front and a bell that no longer rang.",
    "The village holds a small fair at the end of every summer.",
    "Someone had left a pair of boots outside the door of the cabin.",
    "The tea had gone cold while they talked about the plans for the trip.",
    "Gulls circled above the fishing boats as they came back into port.",
    "The path through the meadow was lined with tall grass and wild flowers.",
    "He kept a list of the birds he saw on his walks to work.",
    "The new teacher arrived on a grey morning at the start of autumn.",
    "A gentle hum came from the refrigerator in the otherwise silent flat.",
    "The painter mixed blue and white until the colour matched the sky.",
    "They rested under an oak tree and watched the clouds move slowly east.",
    "The baker rises long before dawn to light the ovens.",
)
MAX_PIECE_BYTES = max(len(s) for s in SENTENCES) + 1  # a sentence and its trailing space

_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy",
               "jolly", "keen", "lively", "mellow", "noble", "odd", "pale", "quiet", "rapid",
               "silent", "tidy", "upper", "vivid", "wooden", "young", "zesty")
_NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island",
          "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
          "saddle", "tunnel", "valley", "willow", "yarrow", "zephyr")
_MAX_KEY_BYTES = max(map(len, _ADJECTIVES)) + 1 + max(map(len, _NOUNS))

_PASSKEY_HEADER = ("A pass key is hidden somewhere in the text below. Find it and remember it; "
                   "you will be asked for it at the end.\n\n")
_MULTIKEY_HEADER = ("Special magic numbers for several keys are hidden in the text below. Remember "
                    "them; you will be asked for the number of one key at the end.\n\n")
_VT_HEADER = ("Variable assignments are hidden in the text below. A variable assigned another "
              "variable takes that variable's value. Track them; you will be asked for the value "
              "of one variable at the end.\n\n")
_MULTIKEY_VALUE_DIGITS = 7
_VT_VALUE_DIGITS = 5
_VT_NAME_LETTERS = 5


def _check_common(length_tokens: Any, depth: Any) -> None:
    check_int("length_tokens", length_tokens, 1)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")


def _number(rng: random.Random, digits: int) -> str:
    """A `digits`-digit number without a leading zero, so its length is fixed."""
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _filler(rng: random.Random, size: int) -> list[str]:
    """Pieces of filler, each ending in a space, `size` bytes in all: random whole sentences
    while any fits, then the first words of one more sentence closed with a full stop, then
    spaces (fewer than the shortest sentence needs)."""
    pieces: list[str] = []
    rest = size
    while True:
        fitting = [s for s in SENTENCES if len(s) + 1 <= rest]
        if not fitting:
            break
        pieces.append(rng.choice(fitting) + " ")
        rest -= len(pieces[-1])
    if rest:
        words: list[str] = []
        for word in rng.choice(SENTENCES).rstrip(".").split():
            if len(" ".join(words + [word])) + 2 > rest:  # room for ". "
                break
            words.append(word)
        tail = " ".join(words) + ". " if words else ""
        pieces.append(tail + " " * (rest - len(tail)))
    return pieces


def _assemble(rng: random.Random, *, task: str, length_tokens: int, depth: float, min_length: int,
              header: str, question: str, target: list[str], distractors: list[list[str]],
              answer: str, meta: dict[str, Any]) -> Example:
    """Build `header + haystack + question` of exactly `length_tokens` bytes.

    `target` is a chain of statements whose first one goes at `depth` and the rest, in order,
    at random later boundaries; each distractor chain goes, in order, at random boundaries.
    """
    if length_tokens < min_length:
        raise ValueError(f"length_tokens must be >= {min_length} for {task} with these settings "
                         f"(instruction, needles and question alone), got {length_tokens}")
    inserted = sum(len(s) for s in target) + sum(len(s) for chain in distractors for s in chain)
    filler_bytes = length_tokens - len(header) - len(question) - inserted
    assert filler_bytes >= 0, "min_length must bound the fixed parts"
    pieces = _filler(rng, filler_bytes)
    boundaries = [0]  # byte offset, within the filler, of the start of each piece, then the end
    for piece in pieces:
        boundaries.append(boundaries[-1] + len(piece))

    goal = depth * filler_bytes
    first = bisect.bisect_left(boundaries, goal)  # a boundary at or after goal: goal <= boundaries[-1]
    if first > 0 and goal - boundaries[first - 1] <= boundaries[first] - goal:
        first -= 1  # the boundary before goal is at least as near
    last = len(pieces)
    # Statements to insert before each piece (or, at the last boundary, before the question);
    # the flag marks the target's first statement, whose offset is reported.
    slots: list[list[tuple[str, bool]]] = [[] for _ in boundaries]
    slots[first].append((target[0], True))
    for statement, place in zip(target[1:], sorted(rng.randint(first, last) for _ in target[1:])):
        slots[place].append((statement, False))
    for chain in distractors:
        for statement, place in zip(chain, sorted(rng.randint(0, last) for _ in chain)):
            slots[place].append((statement, False))

    parts = [header]
    offset = len(header)
    needle_offset = -1
    for i, slot in enumerate(slots):
        for statement, is_needle in slot:
            if is_needle:
                needle_offset = offset
            parts.append(statement)
            offset += len(statement)
        if i < last:
            parts.append(pieces[i])
            offset += len(pieces[i])
    parts.append(question)
    prompt = "".join(parts)
    assert len(prompt.encode("utf-8")) == length_tokens
    meta = {"task": task, "length_tokens": length_tokens, "depth": depth,
            "needle_depth": boundaries[first] / filler_bytes if filler_bytes else 0.0,
            "needle_offset": needle_offset, "filler_bytes": filler_bytes,
            "filler_offset": boundaries[first], **meta}
    return Example(prompt=prompt, answer=answer, meta=meta)


def make_passkey(rng: random.Random, length_tokens: int, depth: float = 0.5, *, digits: int = 5) -> Example:
    """One `digits`-digit pass key hidden in filler; the answer is the key."""
    _check_common(length_tokens, depth)
    check_int("digits", digits, 1, 30)
    key = _number(rng, digits)
    needle = f"The pass key is {key}. Remember it: {key} is the pass key. "
    question = "\n\nQuestion: What is the pass key?\nAnswer: "
    return _assemble(rng, task="passkey", length_tokens=length_tokens, depth=depth,
                     min_length=len(_PASSKEY_HEADER) + len(needle) + len(question),
                     header=_PASSKEY_HEADER, question=question, target=[needle], distractors=[],
                     answer=key, meta={"digits": digits})


def make_multikey_niah(rng: random.Random, length_tokens: int, depth: float = 0.5, *,
                       num_keys: int = 4) -> Example:
    """`num_keys` "key -> 7-digit number" needles; the question names one key (the one placed
    at `depth`), the answer is its number. The others sit at random depths."""
    _check_common(length_tokens, depth)
    check_int("num_keys", num_keys, 1, 64)
    keys = [f"{a}-{n}" for a, n in rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], num_keys)]
    values = [_number(rng, _MULTIKEY_VALUE_DIGITS) for _ in keys]
    while len(set(values)) < len(values):  # equal values would make two keys' answers collide
        values = [_number(rng, _MULTIKEY_VALUE_DIGITS) for _ in keys]
    needles = [f"The special magic number for {k} is {v}. " for k, v in zip(keys, values)]
    question = f"\n\nQuestion: What is the special magic number for {keys[0]}?\nAnswer: "
    longest_needle = len(f"The special magic number for {'k' * _MAX_KEY_BYTES} is {'0' * _MULTIKEY_VALUE_DIGITS}. ")
    longest_question = len(question) - len(keys[0]) + _MAX_KEY_BYTES
    return _assemble(rng, task="multikey_niah", length_tokens=length_tokens, depth=depth,
                     min_length=len(_MULTIKEY_HEADER) + num_keys * longest_needle + longest_question,
                     header=_MULTIKEY_HEADER, question=question, target=[needles[0]],
                     distractors=[[n] for n in needles[1:]], answer=values[0],
                     meta={"num_keys": num_keys, "key": keys[0], "keys": keys, "values": values})


def make_variable_tracking(rng: random.Random, length_tokens: int, depth: float = 0.5, *,
                           hops: int = 4, num_chains: int = 2) -> Example:
    """`num_chains` assignment chains of `hops` copies each; the answer is the 5-digit value of
    the last variable of the chain whose first statement is placed at `depth`."""
    _check_common(length_tokens, depth)
    check_int("hops", hops, 1, 64)
    check_int("num_chains", num_chains, 1, 16)
    count = num_chains * (hops + 1)
    name_list: list[str] = []
    while len(name_list) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(_VT_NAME_LETTERS))
        if name not in name_list:
            name_list.append(name)
    values: list[str] = []
    while len(set(values)) < num_chains:
        values = [_number(rng, _VT_VALUE_DIGITS) for _ in range(num_chains)]
    chains: list[list[str]] = []
    for c in range(num_chains):
        chain_names = name_list[c * (hops + 1):(c + 1) * (hops + 1)]
        statements = [f"VAR {chain_names[0]} = {values[c]}. "]
        statements += [f"VAR {new} = VAR {old}. " for old, new in zip(chain_names, chain_names[1:])]
        chains.append(statements)
    last = name_list[hops]
    question = f"\n\nQuestion: What is the value of VAR {last}?\nAnswer: "
    return _assemble(rng, task="variable_tracking", length_tokens=length_tokens, depth=depth,
                     min_length=(len(_VT_HEADER) + len(question)
                                 + sum(len(s) for chain in chains for s in chain)),
                     header=_VT_HEADER, question=question, target=chains[0], distractors=chains[1:],
                     answer=values[0],
                     meta={"hops": hops, "num_chains": num_chains, "variable": last,
                           "chain": name_list[:hops + 1], "values": values})


def fit_to_tokens(make: Callable[[int], Example], length: int, count: Callable[[str], int],
                  tries: int = 16) -> Example:
    """The example `make(n_bytes)` (built afresh, from the same seed, at each size) whose prompt
    has the most tokens (`count`) found without exceeding `length`. Tokens never outnumber the
    bytes of this ASCII text, so `length` bytes always fit; the next size extrapolates from the
    tokens per byte of the largest fitting size until one does not fit, then sizes are bisected
    between the two. With one token per byte the first try is exact."""
    check_int("length", length, 1)
    best = make(length)
    best_tokens = count(best.prompt)
    if best_tokens > length:
        raise ValueError(f"a prompt of {length} bytes is {best_tokens} tokens: this tokenizer makes more tokens "
                         f"than bytes, so the prompt cannot be sized in its tokens")
    fit, fit_tokens, over = length, best_tokens, None          # sizes in bytes: fits, and too long
    for _ in range(tries):
        if best_tokens == length or (over is not None and over - fit <= 1):
            break
        size = max(fit + 1, fit * length // max(fit_tokens, 1)) if over is None else (fit + over) // 2
        example = make(size)
        n = count(example.prompt)
        if n > length:
            over = size
            continue
        fit, fit_tokens = size, n
        if n > best_tokens:
            best, best_tokens = example, n
    return best
