"""Text corpora packed into fixed-length token sequences, with a deterministic, resumable sampler.

    docs = read_documents("my_corpus/")              # or stdlib_documents(max_bytes=...)
    train_docs, val_docs = split_documents(docs, val_fraction=0.05)
    train = PackedSequences(train_docs, ByteTokenizer(), seq_len=1024, seed=0)
    batch = train.next_batch(8)                      # (8, 1024) int64
    state = train.state_dict()                       # a small JSON-able dict
    ...
    train.load_state_dict(state)                     # continues with the very same batches

Corpus: files named directly, or found recursively under folders by extension, read in
sorted path order; files that are not UTF-8 text (a NUL byte, or invalid UTF-8) are skipped,
as are hidden files and folders. `max_bytes` caps the text taken, cutting the last file at a
line break, so tests and demos stay fast. The default corpus is this Python's own standard
library source (`*.py` under `sysconfig.get_paths()["stdlib"]`, without site-packages): it is
on every machine, needs no download, and is real text. It differs between Python versions,
so results on it are comparable only on the same interpreter.

Packing: in each epoch the documents, in an order shuffled by (seed, epoch), are tokenized as
`[BOS] text EOS` (BOS optional) and concatenated into one stream, which is cut into sequences
of `seq_len` tokens. The stream runs on from one epoch into the next, so every sequence is
full, nothing is padded or dropped, and each epoch's text is covered exactly once; the
sequence that straddles an epoch boundary holds the end of one epoch and the start of the
next. A training step predicts tokens 1..T-1 of a sequence from tokens 0..T-2, so `seq_len`
must be at least 2.

Resuming: the sampler's whole state is (epoch, token position within the epoch's stream) plus
the seed, because each epoch's order is derived from (seed, epoch) alone, not from a running
RNG. `state_dict()` also records the settings and a fingerprint of the tokenized corpus, and
`load_state_dict` refuses a state from a different corpus or settings.

Train/validation split is by a hash of each document's text, so it does not depend on file
order, and duplicated documents land on the same side.

Labelled data: `TokenBatch(ids, labels)` is the batch of a data source whose sequences are
not trained on every token (labels in Hugging Face's convention, -100 = not trained; see
`losses`). `JsonlSequences` reads a user's dataset in that form, one example per line:

    {"ids": [5, 17, 17, 3], "labels": [-100, -100, 17, 3]}     # "labels" optional: all trained

Each example is one row of a batch, right-padded to `seq_len` with `pad_id` and label -100
(causal attention never lets a real token see the padding after it, so no attention mask is
needed; MoE load statistics do count the pads). An example longer than `seq_len`, or a bad
line, is a ValueError naming the file and line. Order: a shuffle per (seed, epoch), as above.

Deliberately left out: streaming corpora larger than memory (the tokenized corpus is held as
one int32 tensor per document), sharding across data-parallel ranks, and per-document
attention masks (sequences attend across EOS separators, as in GPT-style pretraining).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, NamedTuple, Sequence

import torch

from ..tokenizer import Tokenizer

__all__ = ["Document", "DEFAULT_EXTENSIONS", "read_documents", "stdlib_documents", "split_documents",
           "PackedSequences", "TokenBatch", "read_jsonl_examples", "JsonlSequences"]

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py")


@dataclass(frozen=True)
class Document:
    source: str  # the file it was read from (or any label for text built in memory)
    text: str


def read_documents(paths: str | Path | Sequence[str | Path], *,
                   extensions: Sequence[str] = DEFAULT_EXTENSIONS, max_bytes: int | None = None,
                   exclude_dirs: Collection[str] = ()) -> list[Document]:
    """Read text files: each path is a file (taken whatever its extension) or a folder searched
    recursively for files ending in one of `extensions`. Folders named in `exclude_dirs` are
    not entered. Stops once `max_bytes` of UTF-8 text have been taken."""
    roots = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not roots:
        raise ValueError("paths is empty; give at least one file or folder")
    if isinstance(extensions, str):
        raise TypeError(f"extensions must be a sequence of suffixes like ('.txt', '.py'), got {extensions!r}")
    suffixes = tuple(e if e.startswith(".") else "." + e for e in extensions)
    if not suffixes or not all(len(s) > 1 for s in suffixes):
        raise ValueError(f"extensions must be non-empty suffixes like ('.txt', '.py'), got {extensions!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")

    documents: list[Document] = []
    budget = max_bytes
    for root in roots:
        root = Path(root)
        if root.is_file():
            files: Iterator[Path] = iter([root])
        elif root.is_dir():
            files = _walk(root, suffixes, set(exclude_dirs))
        else:
            raise ValueError(f"corpus path {str(root)!r} does not exist")
        for file in files:
            if budget is not None and budget <= 0:
                break
            data = file.read_bytes()
            if b"\0" in data:  # binary
                continue
            cut = budget is not None and len(data) > budget
            if cut:
                data = _cut(data, budget)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not text:
                continue
            documents.append(Document(str(file), text))
            if budget is not None:
                # The file that reaches the cap is the last one, however little it left over.
                budget = 0 if cut else budget - len(data)
    if not documents:
        names = ", ".join(repr(str(r)) for r in roots)
        raise ValueError(f"no text found in corpus path(s) {names} (looked for UTF-8 files ending in "
                         f"{list(suffixes)}; binary, undecodable and empty files are skipped)")
    return documents


def _walk(root: Path, suffixes: tuple[str, ...], exclude_dirs: set[str]) -> Iterator[Path]:
    # os.walk does not follow symlinked folders, so a link loop cannot recurse forever.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude_dirs)
        for name in sorted(filenames):
            if not name.startswith(".") and name.endswith(suffixes):
                yield Path(dirpath, name)


def _cut(data: bytes, size: int) -> bytes:
    """The first `size` bytes, shortened to the last line break, then to whole UTF-8 characters."""
    data = data[:size]
    newline = data.rfind(b"\n")
    if newline >= 0:
        return data[:newline + 1]
    # A UTF-8 character is at most 4 bytes: drop up to 3 to end on a character boundary. If
    # none decodes the file is not UTF-8 and the caller skips it.
    for end in range(len(data), max(len(data) - 4, 0), -1):
        try:
            data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return data[:end]
    return data


def stdlib_documents(max_bytes: int = 1_000_000) -> list[Document]:
    """The default corpus: the `*.py` source of this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    return read_documents(root, extensions=(".py",), max_bytes=max_bytes,
                          exclude_dirs={"site-packages", "dist-packages"})


def split_documents(documents: Sequence[Document], val_fraction: float = 0.05, *,
                    salt: str = "") -> tuple[list[Document], list[Document]]:
    """(train, validation): a document goes to validation when a hash of (salt, text) falls in
    the first `val_fraction` of the hash range. Order within each side is kept. A change of
    `salt` draws a different split; a small corpus may get an empty validation side."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    train: list[Document] = []
    val: list[Document] = []
    for doc in documents:
        digest = hashlib.sha256(f"{salt}\0{doc.text}".encode("utf-8")).digest()
        (val if int.from_bytes(digest[:8], "big") / 2.0 ** 64 < val_fraction else train).append(doc)
    return train, val


class PackedSequences:
    """An endless, deterministic stream of (seq_len,) int64 token sequences over `documents`.

    `shuffle=False` keeps the documents in the given order every epoch (for validation).
    """

    def __init__(self, documents: Sequence[Document], tokenizer: Tokenizer, seq_len: int, *,
                 seed: int = 0, shuffle: bool = True, add_bos: bool = False) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (inputs and shifted targets), got {seq_len!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not documents:
            raise ValueError("documents is empty; read_documents() or stdlib_documents() give a corpus")
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.add_bos = add_bos
        self._docs = [torch.tensor(tokenizer.encode(d.text, add_bos=add_bos, add_eos=True), dtype=torch.int32)
                      for d in documents]
        fingerprint = hashlib.sha256()
        for ids in self._docs:
            fingerprint.update(len(ids).to_bytes(8, "little"))
            fingerprint.update(ids.numpy().tobytes())
        self.fingerprint = fingerprint.hexdigest()[:16]
        self.epoch_tokens = sum(len(ids) for ids in self._docs)
        self._epoch = 0
        self._position = 0
        self._stream_epoch = -1
        self._stream = torch.empty(0, dtype=torch.int32)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Tokens of the current epoch's stream already handed out."""
        return self._position

    @property
    def sequences_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def epoch_order(self, epoch: int) -> list[int]:
        """The document order of `epoch`, a function of (seed, epoch) only."""
        order = list(range(len(self._docs)))
        if self.shuffle:
            # Seeding with a string is stable across processes (no PYTHONHASHSEED dependence).
            random.Random(f"dsv32-pack/{self.seed}/{epoch}").shuffle(order)
        return order

    def _epoch_stream(self, epoch: int) -> torch.Tensor:
        if epoch != self._stream_epoch:
            self._stream = torch.cat([self._docs[i] for i in self.epoch_order(epoch)])
            self._stream_epoch = epoch
        return self._stream

    def take(self, num_tokens: int) -> torch.Tensor:
        """The next `num_tokens` tokens of the stream, (num_tokens,) int64, crossing epochs."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
        pieces = []
        need = num_tokens
        while need:
            stream = self._epoch_stream(self._epoch)
            n = min(need, len(stream) - self._position)
            pieces.append(stream[self._position:self._position + n])
            self._position += n
            need -= n
            if self._position == len(stream):
                self._epoch += 1
                self._position = 0
        if not pieces:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(pieces).long()

    def __iter__(self) -> "PackedSequences":
        return self

    def __next__(self) -> torch.Tensor:
        return self.take(self.seq_len)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """(batch_size, seq_len) int64: the next `batch_size` sequences, in stream order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self.take(batch_size * self.seq_len).view(batch_size, self.seq_len)

    # ------------------------------------------------------------------ resume
    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "add_bos": self.add_bos, "fingerprint": self.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"epoch", "position", *self._settings()}
        if set(state) != expected:
            raise ValueError(f"state must have keys {sorted(expected)}, got {sorted(state)}")
        for key, value in self._settings().items():
            if state[key] != value:
                raise ValueError(f"state was saved with {key}={state[key]!r} but this sampler has "
                                 f"{key}={value!r}; resume with the same corpus and settings")
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"state['epoch'] must be a non-negative integer, got {epoch!r}")
        if not (isinstance(position, int) and 0 <= position < self.epoch_tokens):
            raise ValueError(f"state['position'] must be in [0, {self.epoch_tokens}), got {position!r}")
        self._epoch, self._position = epoch, position

    def __repr__(self) -> str:
        return (f"PackedSequences(documents={len(self._docs)}, tokens/epoch={self.epoch_tokens}, "
                f"seq_len={self.seq_len}, seed={self.seed}, epoch={self._epoch}, position={self._position})")


# ------------------------------------------------------------------------------ labelled data
class TokenBatch(NamedTuple):
    """A batch whose labels are not simply its ids: ids (B, T) int64, labels (B, T) int64 with
    -100 on the positions that are not trained (`losses.IGNORE_INDEX`)."""
    ids: torch.Tensor
    labels: torch.Tensor


def read_jsonl_examples(path: str | Path) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of every line of a JSONL file of {"ids": [...], "labels": [...]} objects
    ("labels" optional: the ids, every token trained). Blank lines are skipped. Raises a
    ValueError naming the file and line of the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data-jsonl file {str(path)!r} does not exist")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or "ids" not in record:
                raise ValueError(f'{where}: expected an object with "ids" (and optionally "labels"), '
                                 f"got {line.strip()[:80]!r}")
            ids, labels = record["ids"], record.get("labels", record["ids"])
            if set(record) - {"ids", "labels"}:
                raise ValueError(f"{where}: unknown keys {sorted(set(record) - {'ids', 'labels'})}; "
                                 f'an example has "ids" and optionally "labels"')
            for name, values, low in (("ids", ids, 0), ("labels", labels, -100)):
                if not isinstance(values, list) or not values or not all(
                        isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
                    raise ValueError(f"{where}: {name!r} must be a non-empty list of integers >= {low}")
            if len(labels) != len(ids):
                raise ValueError(f"{where}: 'labels' has {len(labels)} entries but 'ids' has {len(ids)}; "
                                 f"they must align (label t is the target at position t)")
            if any(v != -100 and v < 0 for v in labels):
                raise ValueError(f"{where}: a label is a token id >= 0 or -100 (not trained)")
            examples.append((ids, labels))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


class JsonlSequences:
    """An endless, deterministic, resumable stream of `TokenBatch`es over a JSONL dataset
    (`read_jsonl_examples`): one example per row, right-padded to `seq_len`."""

    def __init__(self, path: str | Path, seq_len: int, *, pad_id: int, seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (inputs and shifted targets), got {seq_len!r}")
        self.examples = read_jsonl_examples(path)
        for i, (ids, _) in enumerate(self.examples):
            if len(ids) > seq_len:
                raise ValueError(f"{path}: example {i + 1} has {len(ids)} tokens, more than seq_len={seq_len}")
        self.path, self.seq_len, self.pad_id, self.seed, self.shuffle = str(path), seq_len, pad_id, seed, shuffle
        digest = hashlib.sha256(json.dumps(self.examples).encode()).hexdigest()[:16]
        self.fingerprint = digest
        self._epoch, self._position = 0, 0
        self._cached: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"dsv32-jsonl/{self.seed}/{epoch}").shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def next_batch(self, batch_size: int) -> TokenBatch:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        ids = torch.full((batch_size, self.seq_len), self.pad_id, dtype=torch.int64)
        labels = torch.full((batch_size, self.seq_len), -100, dtype=torch.int64)
        for row in range(batch_size):
            x, y = self.examples[self._order(self._epoch)[self._position]]
            ids[row, :len(x)] = torch.tensor(x)
            labels[row, :len(y)] = torch.tensor(y)
            self._position += 1
            if self._position == len(self.examples):
                self._epoch, self._position = self._epoch + 1, 0
        return TokenBatch(ids, labels)

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(f"state was saved with {key}={state.get(key)!r} but this dataset has "
                                 f"{key}={value!r}; resume with the same file and settings")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
