"""Read and write Hugging Face Llama / Qwen2 / Qwen3 / Mistral checkpoints (config.json + safetensors,
one file or shards with an index) as `GQAForCausalLM`, without transformers.

The key map is the identity: our module names are the HF ones. Two rules only:
* tied embeddings: `lm_head.weight` is the embedding; it is not expected on disk (a copy there is
  checked against the embedding and skipped) and never written;
* a retrofitted model adds `model.layers.{i}.self_attn.indexer.*` tensors and a `dsa_retrofit`
  field in config.json; everything else is written back under its original name and the rest of
  config.json as it was read, so transformers still loads the result as the dense model (it
  ignores the indexer tensors).

Every problem (unsupported architecture, a missing, unexpected or mis-shaped tensor, a config
that contradicts the weights) raises one `CheckpointError` naming the key, the file and what
config.json implies. Left out: FP8 weights and pickled (`.bin`) weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..model.gqa import GQAForCausalLM
from ..model.gqa_config import DenseConfig, IndexerSpec
from .hf import _SUPPORTED, CheckpointError, _get, _iter_tensors, _Source, parse_dtype, write_checkpoint

_TIED = "lm_head.weight"


def is_dense_checkpoint(path: str | Path) -> bool:
    """True when `path/config.json` names one of the dense GQA families (cheap: reads the json)."""
    import json
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") in (
            "llama", "qwen2", "qwen3", "mistral")
    except (OSError, ValueError):
        return False


def read_dense_config(root: Path) -> DenseConfig:
    if not (root / "config.json").exists():
        raise CheckpointError(f"no config.json in {root}")
    try:
        return DenseConfig.from_hf_config(root / "config.json")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / 'config.json'}: {e!s}") from None


def expected_shapes(model: GQAForCausalLM) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop(_TIED, None)
    return shapes


def _read(root: Path, cfg: DenseConfig, expected: dict[str, tuple[int, ...]],
          strict: bool) -> Iterator[tuple[str, torch.Tensor]]:
    src = _Source.open(root)
    seen: set[str] = set()
    for key, dt, path, handle in _iter_tensors(src):
        if key == _TIED and cfg.tie_word_embeddings:
            continue
        if key not in expected:
            if ".indexer." in key and cfg.indexer is None:
                raise CheckpointError(f"{path.name} holds indexer tensor {key!r} but config.json has no "
                                      "'dsa_retrofit' field; the config does not match the tensors")
            if strict:
                raise CheckpointError(f"unexpected tensor {key!r} in {path.name}: not part of a {cfg.model_type} "
                                      "model with this config.json")
            continue
        if dt not in _SUPPORTED or dt == "F8_E4M3":
            raise CheckpointError(f"tensor {key!r} in {path.name} has unsupported dtype {dt}; supported: F32, BF16, F16")
        tensor = _get(handle, key, path)
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"tensor {key!r} in {path.name} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {expected[key]}; the config contradicts the weights")
        seen.add(key)
        yield key, tensor
    missing = [k for k in expected if k not in seen]
    if missing and strict:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {root} is missing tensor {missing[0]!r}{more} that config.json requires")


def load_dense(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               indexer: IndexerSpec | None = None, strict: bool = True, seed: int = 0) -> GQAForCausalLM:
    """Load a Llama / Qwen2 / Qwen3 / Mistral checkpoint as `GQAForCausalLM`.

    dtype: default float32 on CPU, the config's dtype elsewhere. indexer: attach a fresh DSA
    indexer (initialised from each layer's loaded attention, see model/gqa_indexer.py) to a
    checkpoint that has none; a checkpoint saved with one reloads it from its config. seed: the
    random part of a fresh indexer (and of weights `strict=False` leaves unread), so every
    process of a torchrun job, and every rerun, starts from the same model."""
    root = Path(path)
    cfg = read_dense_config(root)
    fresh = False
    if indexer is not None:
        if cfg.indexer is not None:
            raise CheckpointError(f"{root} already has an indexer ({cfg.indexer}); load it without `indexer`")
        try:
            cfg = cfg.with_indexer(indexer)
        except ValueError as e:
            raise CheckpointError(f"indexer incompatible with {root}: {e}") from None
        fresh = True
    device = torch.device(device)
    target = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else parse_dtype(cfg.dtype))
    with torch.device("meta"):
        model = GQAForCausalLM(cfg, init=False)
    model = model.to(target)
    expected = expected_shapes(model)
    if fresh:
        expected = {k: v for k, v in expected.items() if ".indexer." not in k}
    model.to_empty(device=device)
    model.tie_weights()
    if fresh or not strict:
        model.init_weights(seed=seed)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in _read(root, cfg, expected, strict):
            params[key].copy_(tensor.to(params[key].dtype))
    if fresh:
        _start_indexers(model, seed)
    return model


@torch.no_grad()
def _start_indexers(model: GQAForCausalLM, seed: int) -> None:
    """Each indexer's start from its layer's (loaded) attention, the random part drawn from `seed`."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.reset_parameters(gen, attn=layer.self_attn)


def load_for_dsa(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 topk: int | None = None, seed: int = 0) -> GQAForCausalLM:
    """What the DSA verbs (sparsify, eval, generate) load from a dense-family checkpoint: a
    retrofitted one as saved; a plain dense one with a fresh indexer sized to it
    (`IndexerSpec.for_model`, started from each layer's attention, seeded). `topk` replaces k."""
    root = Path(path)
    cfg = read_dense_config(root)
    spec = None
    if cfg.indexer is None:
        spec = IndexerSpec.for_model(cfg, **({} if topk is None else {"topk": topk}))
    model = load_dense(root, dtype=dtype, device=device, indexer=spec, seed=seed)
    if topk is not None and topk != model.config.indexer.topk:
        model.set_indexer_topk(topk)
    return model


def attach_indexer(model: GQAForCausalLM, spec: IndexerSpec, *, seed: int = 0) -> GQAForCausalLM:
    """A copy of dense `model` with a fresh indexer on every non-dense layer (same weights otherwise;
    the indexers' random part drawn from `seed`)."""
    if model.config.indexer is not None:
        raise ValueError("the model already has an indexer")
    cfg = model.config.with_indexer(spec)
    p = next(model.parameters())
    with torch.device("meta"):
        new = GQAForCausalLM(cfg, init=False)
    new = new.to(p.dtype).to_empty(device=p.device)
    new.tie_weights()
    new.init_weights(seed=seed)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".indexer." in k for k in missing), (missing, unexpected)
    _start_indexers(new, seed)
    return new


def save_dense(model: GQAForCausalLM, path: str | Path, *, dtype: str | torch.dtype | None = None,
               max_shard_size: int | str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the HF layout: the original keys and config.json, plus indexer tensors and the
    `dsa_retrofit` field when the model has them. The indexer's head weights stay float32.
    state_dict: the weights to write instead of `model.state_dict()` (as `hf.save_pretrained`)."""
    cast = parse_dtype(dtype)
    state = dict(model.state_dict() if state_dict is None else state_dict)
    if model.config.tie_word_embeddings:
        state.pop(_TIED, None)
    if cast is not None:
        state = {k: v if (not v.is_floating_point() or k.endswith("indexer.weights_proj.weight")) else v.to(cast)
                 for k, v in state.items()}
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    cfg = model.config.replace(dtype=name[cast or model.lm_head.weight.dtype])
    return write_checkpoint(iter(state.items()), cfg, path, max_shard_size=max_shard_size)
