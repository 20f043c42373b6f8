"""Read and write the Hugging Face DeepSeek-V3.2 layout: `config.json` plus `model.safetensors`
or shards listed in `model.safetensors.index.json`, per-expert keys, optional FP8 e4m3
weights with 128x128 `weight_scale_inv` blocks (dequantised on load).

Safetensors only: a folder holding only pickled weights (`*.bin`, `*.pt`) is refused, since
loading pickles can run code. Every problem with a checkpoint — a missing, unexpected or
mis-shaped tensor, a truncated file, an unsupported dtype, a config that contradicts the
weights — raises one `CheckpointError` naming the key and the file.

Writing is safe against interruption: files are written to a temporary folder beside the
target and moved in only when all are complete; other files already in the target folder
(a tokenizer, training state) are left alone, and stale weight files of an earlier save are
removed only after the new ones are in place. Each save writes `checksums.sha256` beside the
files and gives them the umask's mode (`integrity.py`); `verify=True` checks the checksums
before loading, and a tensor holding NaN or inf is refused on every load.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import DSV32ForCausalLM
from . import fp8
from .errors import CheckpointError
from .integrity import MANIFEST_NAME, follow_umask, verify_checksums, write_manifest
from .keymap import Target, expected_hf_shapes, hf_state_items, hf_to_dsv32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SUPPORTED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn}
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {name!r}")
    return _DTYPE_NAMES[name]


def parse_size(size: int | str | None) -> int | None:
    """'5GB', '500MB', '10KB' or a byte count."""
    if size is None:
        return size
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"shard size must be at least 1 byte, got {size}")
        return size
    if not isinstance(size, str):
        raise ValueError(f"shard size must look like '5GB' or '500MB', got {size!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size must look like '5GB' or '500MB', got {size!r}")
    unit = (m.group(2) or "B").upper().replace("I", "")
    size = int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])
    if size < 1:
        raise ValueError(f"shard size must be at least 1 byte, got {m.group(0).strip()!r}")
    return size


# ------------------------------------------------------------------------------- reading
@dataclass
class _Source:
    """Where each HF key lives: key -> file."""
    root: Path
    files: dict[str, Path]

    @classmethod
    def open(cls, root: Path) -> "_Source":
        if not root.is_dir():
            raise CheckpointError(f"{root} is not a checkpoint folder")
        index = root / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            files = {k: root / v for k, v in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.exists():
                    raise CheckpointError(f"{index} lists shard {f.name}, which does not exist")
            return cls(root, files)
        shards = sorted(root.glob("*.safetensors"))
        if not shards:
            pickled = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickled:
                raise CheckpointError(f"{root} holds only pickled weights ({', '.join(pickled)}); dsv32 loads "
                                      "safetensors only (pickles can run code). Convert them with transformers "
                                      "first: model.save_pretrained(path, safe_serialization=True)")
            raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {root}")
        files = {}
        for shard in shards:
            for key in _keys(shard):
                if key in files:
                    raise CheckpointError(f"tensor {key!r} appears in both {files[key].name} and {shard.name}")
                files[key] = shard
        return cls(root, files)

    def by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for key, f in self.files.items():
            out.setdefault(f, []).append(key)
        return out


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None


def _iter_tensors(src: _Source) -> Iterator[tuple[str, str, Path, Any]]:
    """(key, dtype string, file, handle) for every listed tensor, file by file."""
    for path, keys in src.by_file().items():
        try:
            handle = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None
        with handle as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{INDEX_NAME} maps {key!r} to {path.name}, which does not contain it")
                yield key, f.get_slice(key).get_dtype(), path, f


def _get(handle, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read tensor {key!r} from {path}: truncated or corrupt file ({e})") from None


def _block_size(cfg: ModelConfig) -> tuple[int, int]:
    q = cfg.extra.get("quantization_config") or {}
    b = q.get("weight_block_size") or [128, 128]
    return int(b[0]), int(b[1])


def read_hf_tensors(root: Path, cfg: ModelConfig, expected: dict[str, tuple[int, ...]],
                    strict: bool = True) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Validated HF (key, tensor, file) pairs in their stored dtype, FP8 weights dequantised to
    float32.
    Raises CheckpointError on the first problem; checks completeness at the end."""
    src = _Source.open(root)
    block = _block_size(cfg)
    seen: set[str] = set()
    scale_keys = {k for k in src.files if k.endswith("_scale_inv")}
    for key, dt, path, handle in _iter_tensors(src):
        if key in scale_keys:
            weight_key = key[: -len("_scale_inv")]
            if weight_key not in src.files:
                raise CheckpointError(f"{path.name} has scale {key!r} but no weight {weight_key!r}")
            continue
        if key not in expected:
            if key.startswith("model.layers.") and int(key.split(".")[2]) >= cfg.num_hidden_layers \
                    and cfg.num_nextn_predict_layers == 0:
                continue  # MTP weights in the file, MTP not requested: skipped like transformers does
            if strict:
                raise CheckpointError(f"unexpected tensor {key!r} in {path.name}: not part of a DeepSeek-V3.2 "
                                      f"model with this config.json")
            continue
        if dt not in _SUPPORTED:
            raise CheckpointError(f"tensor {key!r} in {path.name} has unsupported dtype {dt}; "
                                  f"supported: {sorted(_SUPPORTED)}")
        tensor = _get(handle, key, path)
        if dt == "F8_E4M3":
            scale_key = key + "_scale_inv"
            if scale_key not in src.files:
                raise CheckpointError(f"FP8 tensor {key!r} in {path.name} has no {scale_key!r}")
            scale_path = src.files[scale_key]
            if scale_path == path:
                scale = _get(handle, scale_key, path)
            else:
                with safe_open(scale_path, framework="pt") as g:
                    scale = _get(g, scale_key, scale_path)
            if tensor.dim() != 2:
                raise CheckpointError(f"FP8 tensor {key!r} in {path.name} must be 2-D, got {tuple(tensor.shape)}")
            try:
                tensor = fp8.dequantize_blockwise(tensor, scale, block, dtype=torch.float32)
            except ValueError as e:
                raise CheckpointError(f"{scale_key!r} in {scale_path.name}: {e}") from None
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"tensor {key!r} in {path.name} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {expected[key]}; the config contradicts the weights")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"tensor {key!r} in {path} holds NaN or inf: the checkpoint is damaged or was "
                                  f"saved from a diverged run")
        seen.add(key)
        yield key, tensor, path
    missing = [k for k in expected if k not in seen]
    if missing and strict:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {root} is missing tensor {missing[0]!r}{more} that config.json requires")


def load_pretrained(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                    load_mtp: bool = True, strict: bool = True, verify: bool = False) -> DSV32ForCausalLM:
    """Load a HF-layout checkpoint into a `DSV32ForCausalLM`.

    dtype: parameter dtype; default float32 on CPU (bf16 matmul is ~400x slower there) and
    the config's dtype elsewhere. load_mtp=False drops the MTP modules. strict=False ignores
    unexpected tensors and leaves missing ones at their initial values. verify=True first
    checks every file against the folder's `checksums.sha256` (a CheckpointError names a
    corrupt file). A tensor holding NaN or inf is always refused, naming the tensor and file."""
    root = Path(path)
    if not (root / "config.json").exists():
        raise CheckpointError(f"no config.json in {root}")
    if verify:
        verify_checksums(root)
    try:
        cfg = ModelConfig.from_hf_config(root / "config.json")
    except ValueError as e:
        raise CheckpointError(f"{root / 'config.json'}: {e}") from None
    if not load_mtp and cfg.num_nextn_predict_layers:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    device = torch.device(device)
    target = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else parse_dtype(cfg.dtype))
    with torch.device("meta"):
        model = DSV32ForCausalLM(cfg, init=False)
    model = model.to(target)
    expected = expected_hf_shapes(model, cfg)
    model.to_empty(device=device)
    if not strict:
        model.init_weights()
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, tensor, _ in read_hf_tensors(root, cfg, expected, strict=strict):
            t: Target = hf_to_dsv32(key, cfg)
            if t.shared_with is not None:
                continue
            dest = params[t.name]
            (dest[t.expert] if t.expert is not None else dest).copy_(tensor.to(dest.dtype))
    model.config = cfg
    return model


# ------------------------------------------------------------------------------- writing
def _write_shards(items: Iterator[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int | None,
                  metadata: dict[str, str]) -> list[str]:
    """Write (key, tensor) pairs into shards of at most `max_shard_bytes` (one file if None);
    each shard is written as soon as it fills. Returns the names of the files written."""
    written: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    shard: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            tmp_name = f"shard-{len(written):05d}.safetensors"
            save_file(shard, str(folder / tmp_name), metadata=metadata)
            written.append((tmp_name, list(shard)))
        shard, size = {}, 0
        storages.clear()

    for key, tensor in items:
        if key in seen:
            raise ValueError(f"duplicate tensor name {key!r} while writing a checkpoint")
        seen.add(key)
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and size and size + nbytes > max_shard_bytes:
            flush()
        ptr = tensor.untyped_storage().data_ptr()
        # safetensors refuses views and tensors sharing memory (stacked experts, tied copies).
        if ptr in storages or tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        shard[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        os.replace(folder / written[0][0], folder / SINGLE_NAME)
        return [SINGLE_NAME]
    n = len(written)
    weight_map, names = {}, []
    for i, (tmp_name, keys) in enumerate(written, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(folder / tmp_name, folder / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]


def _quantized(items: Iterator[tuple[str, torch.Tensor]], block: tuple[int, int]) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in items:
        if fp8.is_quantizable(key) and tensor.dim() == 2:
            q, s = fp8.quantize_blockwise(tensor, block)
            yield key, q
            yield key + "_scale_inv", s
        else:
            yield key, tensor


def _install(tmp: Path, dest: Path, names: list[str]) -> None:
    """Move the finished files from `tmp` into `dest`, then drop stale weight files of an
    earlier save that the new set does not include. Other files in `dest` are kept."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(tmp / name, dest / name)
    for old in dest.iterdir():
        if _WEIGHT_FILE.match(old.name) and old.name not in names:
            old.unlink()


def writer_temporaries(path: str | Path) -> list[Path]:
    """The temporary folders that `write_checkpoint(..., path)` calls killed mid-write left
    behind (`.NAME.tmp-XXXXXXXX` beside `path`); a run removes them at its next start."""
    dest = Path(path)
    return sorted(dest.parent.glob(f".{glob.escape(dest.name)}.tmp-*")) if dest.parent.is_dir() else []


def write_checkpoint(items: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, path: str | Path, *,
                     max_shard_size: int | str | None = None, fp8_weights: bool = False) -> Path:
    """Write HF (key, tensor) pairs and `cfg` as a checkpoint folder at `path`, atomically
    with respect to what is already there (see the module docstring)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf_config()
    if fp8_weights:
        hf_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        items = _quantized(items, (128, 128))
    else:
        hf_cfg.pop("quantization_config", None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        names = _write_shards(items, tmp, parse_size(max_shard_size), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        names.append("config.json")
        write_manifest(tmp, names)
        names.append(MANIFEST_NAME)
        follow_umask(tmp / name for name in names)
        _install(tmp, dest, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def save_pretrained(model: DSV32ForCausalLM, path: str | Path, *, dtype: str | torch.dtype | None = None,
                    max_shard_size: int | str | None = None, fp8_weights: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save in the HF layout. dtype: cast floating weights (the router and its bias stay float32);
    max_shard_size: e.g. '5GB' to write shards plus an index; fp8_weights: store linear weights
    as block-wise FP8 e4m3 with `weight_scale_inv`, like the release; state_dict: the weights to
    write instead of `model.state_dict()` (the full state gathered from a sharded model)."""
    cfg = model.config
    cast = parse_dtype(dtype)
    state = model.state_dict() if state_dict is None else state_dict
    if cast is not None:
        state = {k: (v if (not v.is_floating_point() or _keeps_fp32(k)) else v.to(cast)) for k, v in state.items()}
        cfg = cfg.replace(dtype=_dtype_name(cast))
    else:
        cfg = cfg.replace(dtype=_dtype_name(model.lm_head.weight.dtype))
    return write_checkpoint(hf_state_items(state, cfg), cfg, path, max_shard_size=max_shard_size,
                            fp8_weights=fp8_weights)


def _keeps_fp32(key: str) -> bool:
    return key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def convert_checkpoint(src: str | Path, dst: str | Path, *, dtype: str | None = None,
                       max_shard_size: int | str | None = "5GB", drop_mtp: bool = False,
                       fp8_weights: bool = False, verify: bool = False,
                       progress: Callable[[int, int, str, str], None] | None = None) -> Path:
    """Stream a checkpoint tensor by tensor into a new one (never holding the whole model):
    FP8 -> bf16/fp32, a dtype change, re-sharding, dropping MTP, or quantising to FP8.
    Every tensor is validated against the config as on load; verify=True first checks the
    source's checksums. `progress(done, total, key, file)` is called after each tensor read."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("convert writes a new checkpoint; the destination must differ from the source")
    max_shard_size = parse_size(max_shard_size)
    if verify:
        verify_checksums(src)
    try:
        cfg = ModelConfig.from_hf_config(src / "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {src}") from None
    except ValueError as e:
        raise CheckpointError(f"{src / 'config.json'}: {e}") from None
    out_cfg = cfg.replace(num_nextn_predict_layers=0) if drop_mtp else cfg
    target = parse_dtype(dtype) or parse_dtype(cfg.dtype)
    out_cfg = out_cfg.replace(dtype=_dtype_name(target))
    with torch.device("meta"):
        model = DSV32ForCausalLM(cfg, init=False)
    expected = expected_hf_shapes(model, cfg)

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for done, (key, tensor, path) in enumerate(read_hf_tensors(src, cfg, expected, strict=True), start=1):
            if progress is not None:
                progress(done, len(expected), key, path.name)
            if drop_mtp and _is_mtp_key(key, cfg):
                continue
            yield key, tensor.float() if _keeps_fp32(key) else tensor.to(target)

    return write_checkpoint(items(), out_cfg, dst, max_shard_size=max_shard_size, fp8_weights=fp8_weights)


def _is_mtp_key(key: str, cfg: ModelConfig) -> bool:
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers
