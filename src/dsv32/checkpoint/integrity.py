"""Checksums and file modes of what dsv32 writes.

Safetensors has no checksums: a flipped bit in tensor data loads without a word. Every
checkpoint folder dsv32 writes therefore carries `checksums.sha256`, one `<sha256>  <file>`
line per file (the format `sha256sum -c checksums.sha256` reads), and
`verify_checksums(folder)` names the first file whose bytes differ. Verifying reads every
byte once, so it is asked for (`load_pretrained(..., verify=True)`, `--verify`), not implied.

Files are created by libraries that pick their own modes (safetensors writes 0600);
`follow_umask` gives them the mode a plain `open(..., "w")` would (0666 less the umask).

Left out: signatures (who wrote a checkpoint is not checked, only that it is unchanged).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from .errors import CheckpointError

MANIFEST_NAME = "checksums.sha256"
_CHUNK = 1 << 24


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, str]:
    """file name -> sha256 hex digest, from `folder / MANIFEST_NAME` ({} when there is none)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise CheckpointError(f"{path} line {n} is not '<sha256>  <file>': {line[:80]!r}")
        out[name] = digest
    return out


def write_manifest(folder: Path, names: Iterable[str]) -> None:
    """Add (or refresh) the checksums of `names` (files in `folder`) in its manifest."""
    entries = read_manifest(folder)
    entries.update({name: sha256_file(folder / name) for name in names})
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))
    (folder / MANIFEST_NAME).write_text(text)


def verify_checksums(folder: str | Path) -> list[str]:
    """Check every file the manifest lists; returns their names. A CheckpointError names the
    first file that is missing or whose sha256 differs, or says that there is no manifest."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if not entries:
        raise CheckpointError(f"{folder} has no {MANIFEST_NAME} to verify against (it was written without "
                              f"checksums; load it without verify, or save it again)")
    for name, digest in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {MANIFEST_NAME} but missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} is corrupt: its sha256 differs from the one in {MANIFEST_NAME}")
    return sorted(entries)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(paths: Iterable[Path]) -> None:
    """chmod each file to 0666 & ~umask, the mode `open()` would have given it."""
    mode = 0o666 & ~_umask()
    for path in paths:
        os.chmod(path, mode)
