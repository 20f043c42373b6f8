"""Tokenizers: a built-in byte-level tokenizer and an adapter for Hugging Face `tokenizer.json`.

Both implement one small protocol, `Tokenizer` (encode, decode, vocab_size, bos_id, eos_id,
pad_id, plus batch helpers), which is all that training, evaluation, generation and GRPO use.

`ByteTokenizer` matches the `tiny`/`small` presets (vocab_size = 256 + 3): ids 0..255 are the
UTF-8 bytes of the text, then BOS = 256, EOS = 257, PAD = 258. It needs no files, never fails
to encode, and one token is one byte, so lengths "in tokens" of the synthetic tasks are byte
counts. Text never encodes to a special id, even text that looks like "<|eos|>": specials are
added only through `add_bos` / `add_eos`, so data cannot inject control tokens.

`HFTokenizer` wraps any `tokenizer.json` through the `tokenizers` library (an optional
dependency, imported only when one is loaded). It encodes without the file's post-processor
(`add_special_tokens=False`) and adds BOS/EOS itself, so both tokenizers behave the same.

Deliberately left out: chat templates, training new tokenizers, `transformers`'
`AutoTokenizer` (and its slow, Python-only tokenizers), and offsets/attention masks — padding
and masks belong to the code that builds batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_for_model", "tokenizer_files",
           "tokenizer_name"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of dsv32 needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]: ...
    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]: ...


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

    BOS, EOS, PAD = 256, 257, 258
    # How decode(skip_special=False) renders the specials; encode() reads these as plain bytes.
    SPECIAL_TEXT = {BOS: "<|bos|>", EOS: "<|eos|>", PAD: "<|pad|>"}

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(_check_text(text).encode("utf-8"))
        if add_bos:
            ids.insert(0, self.BOS)
        if add_eos:
            ids.append(self.EOS)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Bytes are decoded with errors="replace": an incomplete or invalid UTF-8 sequence (a
        generation cut mid-character) becomes U+FFFD instead of raising. Runs of bytes between
        specials are decoded separately, as they would be if the specials were not there."""
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            elif i in self.SPECIAL_TEXT:
                if not skip_special:
                    parts.append(run.decode("utf-8", errors="replace"))
                    run.clear()
                    parts.append(self.SPECIAL_TEXT[i])
            else:
                raise ValueError(f"token id {i} is out of range for ByteTokenizer; allowed 0..258")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        return [self.decode(ids, skip_special) for ids in batch]

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


# Special-token spellings tried, in order, when neither the caller nor tokenizer_config.json
# names them (DeepSeek, Llama/Mistral, GPT-2/Qwen, T5-style).
_BOS_CANDIDATES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
_EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")
_PAD_CANDIDATES = ("<｜▁pad▁｜>", "<|pad|>", "<pad>", "[PAD]")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the `Tokenizer` protocol.

    Special tokens come from the arguments, else from a `tokenizer_config.json` next to the
    file (`bos_token`, `eos_token`, `pad_token`), else from well-known spellings found in the
    vocabulary. An EOS token is required (it separates packed documents and ends generation);
    BOS is optional; PAD falls back to EOS, the usual choice for causal LMs.
    """

    def __init__(self, path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _RustTokenizer
        except ImportError as e:
            raise ImportError("loading a tokenizer.json needs the `tokenizers` package: "
                              "pip install 'dsv32[tokenizers]'") from e
        self.path = Path(path)
        try:
            self._tok = _RustTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust library raises a bare Exception for unparsable files
            raise ValueError(f"could not load {self.path} as a Hugging Face tokenizer.json: {e}") from e
        config = _read_tokenizer_config(self.path.parent / "tokenizer_config.json")
        self._bos = self._resolve("bos_token", bos_token, config, _BOS_CANDIDATES)
        eos = self._resolve("eos_token", eos_token, config, _EOS_CANDIDATES)
        if eos is None:
            raise ValueError(f"{self.path} has no recognisable EOS token; pass eos_token= "
                             f"(one of the tokenizer's tokens, e.g. {list(_EOS_CANDIDATES[:3])})")
        self._eos = eos
        pad = self._resolve("pad_token", pad_token, config, _PAD_CANDIDATES)
        self._pad = eos if pad is None else pad
        # One past the largest id (ids of added tokens need not follow the base vocabulary).
        self._size = 1 + max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def _resolve(self, name: str, explicit: str | None, config: dict[str, Any],
                 candidates: Sequence[str]) -> int | None:
        if explicit is not None:
            token_id = self._tok.token_to_id(explicit)
            if token_id is None:
                raise ValueError(f"{name}={explicit!r} is not in the vocabulary of {self.path}")
            return token_id
        configured = config.get(name)
        if isinstance(configured, dict):  # AddedToken serialised as {"content": ..., ...}
            configured = configured.get("content")
        if isinstance(configured, str) and self._tok.token_to_id(configured) is not None:
            return self._tok.token_to_id(configured)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self._bos is None:
                raise ValueError(f"add_bos=True but {self.path} has no BOS token; pass bos_token= "
                                 "to load_tokenizer or use add_bos=False")
            ids.insert(0, self._bos)
        if add_eos:
            ids.append(self._eos)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(_check_text(text), add_special_tokens=False).ids)
        return self._wrap(ids, add_bos, add_eos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range; allowed 0..{self.vocab_size - 1}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        encodings = self._tok.encode_batch([_check_text(t) for t in texts], add_special_tokens=False)
        return [self._wrap(list(e.ids), add_bos, add_eos) for e in encodings]

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        return [self.decode(ids, skip_special) for ids in batch]

    def __repr__(self) -> str:
        return (f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self._bos}, "
                f"eos_id={self._eos}, pad_id={self._pad})")


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return config if isinstance(config, dict) else {}


def load_tokenizer(path_or_name: str | Path, **special_tokens: str) -> Tokenizer:
    """"byte" -> `ByteTokenizer`; a `tokenizer.json` file, or a folder holding one -> `HFTokenizer`.

    `special_tokens` (bos_token=, eos_token=, pad_token=) are passed to `HFTokenizer`.
    """
    if isinstance(path_or_name, str) and path_or_name == "byte":
        if special_tokens:
            raise ValueError(f"the byte tokenizer has fixed special tokens; got {sorted(special_tokens)}")
        return ByteTokenizer()
    if not isinstance(path_or_name, (str, Path)):
        raise TypeError(f"path_or_name must be 'byte' or a path, got {type(path_or_name).__name__}")
    unknown = set(special_tokens) - {"bos_token", "eos_token", "pad_token"}
    if unknown:
        raise ValueError(f"unknown special-token arguments {sorted(unknown)}; "
                         "allowed: bos_token, eos_token, pad_token")
    path = Path(path_or_name)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer folder {path} has no tokenizer.json")
        path = path / "tokenizer.json"
    elif not path.is_file():
        raise ValueError(f"tokenizer {str(path_or_name)!r} is neither 'byte' nor an existing "
                         "tokenizer.json file or folder containing one")
    elif path.suffix != ".json":
        raise ValueError(f"tokenizer file {path} must be a Hugging Face tokenizer.json")
    return HFTokenizer(path, **special_tokens)


def tokenizer_for_model(model: str | Path, name: str | Path | None = None) -> Tokenizer:
    """The tokenizer a model spec (checkpoint folder or preset name) is used with: `name` when
    given ('byte', a tokenizer.json or a folder holding one), else the model folder's
    tokenizer.json, else the byte tokenizer (the presets' vocabulary)."""
    if name is None:
        folder = Path(model)
        name = str(folder) if (folder / "tokenizer.json").is_file() else "byte"
    return load_tokenizer(name)


def tokenizer_files(tokenizer: Tokenizer) -> list[Path]:
    """The files that make `tokenizer` (none for the byte tokenizer): its tokenizer.json and the
    tokenizer_config.json beside it, if any. Copied into a checkpoint folder, they make the
    checkpoint load with the same tokenizer (`tokenizer_for_model`)."""
    if not isinstance(tokenizer, HFTokenizer):
        return []
    config = tokenizer.path.parent / "tokenizer_config.json"
    return [tokenizer.path] + ([config] if config.is_file() else [])


def tokenizer_name(tokenizer: Tokenizer) -> str:
    """'byte', or the path of the tokenizer.json (what run settings and errors name)."""
    return str(tokenizer.path) if isinstance(tokenizer, HFTokenizer) else "byte"
