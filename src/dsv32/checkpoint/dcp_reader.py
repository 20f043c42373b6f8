"""Read torch.distributed.checkpoint (DCP) folders without running code from them.

DCP's own `FileSystemReader.read_metadata` calls `pickle.load` on `<folder>/.metadata`, and a
pickle can call any importable function: a crafted `.metadata` in a copied run folder would run
its payload on `--resume`. `SafeFileSystemReader` reads the same file with an unpickler that
admits only the classes DCP's metadata is made of (the dataclasses of
`torch.distributed.checkpoint.metadata`, the file reader's `_StorageInfo`, `torch.Size`, torch
dtypes and layouts, paths) and refuses anything else with a `CheckpointError` naming the file
and the refused name. The tensor shards themselves DCP already reads with
`torch.load(weights_only=True)`.

Left out: DCP's optional extension registry (compression transforms); our writers never use it.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import CheckpointError

_METADATA_CLASSES = {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                     "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"}
_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": _METADATA_CLASSES,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},           # maps a layout's name to torch.strided etc.
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)           # a dtype is a value, not something callable
        raise CheckpointError(f"{self.path} is not plain DCP metadata: it names {module}.{name}, which could "
                              f"run code; refusing to load it (delete the checkpoint or re-save it)")


def read_dcp_metadata(path: str) -> Metadata:
    """The `Metadata` pickled at `path`, unpickled with only DCP's metadata classes admitted."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path} is not readable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata is read by `read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = str(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_dcp_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
