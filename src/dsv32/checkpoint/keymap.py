"""Declarative map between dsv32 parameter names and the Hugging Face DeepSeek-V3.2 layout.

dsv32 names mirror the HF names except in two places:

    HF (on disk)                                          dsv32 (in memory)
    model.layers.{i}.mlp.experts.{e}.{w}_proj.weight   <-> model.layers.{i}.mlp.experts.{w}_proj[e]   (stacked)
    model.layers.{L+j}.<rest>                          <-> mtp.{j}.<rest>       (L = num_hidden_layers)
    model.layers.{L+j}.embed_tokens.weight             <-> (shared with model.embed_tokens; written as a copy)
    model.layers.{L+j}.shared_head.head.weight         <-> (shared with lm_head; written as a copy)

Everything else is the identity. FP8 checkpoints add `<name>_scale_inv` next to quantised
weights (see fp8.py); those are consumed while loading and never reach the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import ModelConfig

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_SHARED_IN_MTP = {"embed_tokens.weight": "model.embed_tokens.weight",
                  "shared_head.head.weight": "lm_head.weight"}


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: parameter `name`, at `expert` along dim 0 if stacked.
    `shared_with` is set for the MTP copies of the embedding/head (checked, not stored)."""
    name: str
    expert: int | None = None
    shared_with: str | None = None


def hf_to_dsv32(hf_key: str, cfg: ModelConfig) -> Target:
    L = cfg.num_hidden_layers
    key = hf_key
    m = _LAYER.match(hf_key)
    if m and int(m.group(1)) >= L:
        j, rest = int(m.group(1)) - L, m.group(2)
        if rest in _SHARED_IN_MTP:
            return Target(name=f"mtp.{j}.{rest}", shared_with=_SHARED_IN_MTP[rest])
        key = f"mtp.{j}.{rest}"
    e = _EXPERT.match(key)
    if e:
        return Target(name=f"{e.group(1)}.{e.group(3)}", expert=int(e.group(2)))
    return Target(name=key)


def dsv32_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (key, tensor) pairs for one dsv32 state-dict entry."""
    m = _MTP.match(name)
    if m:
        name = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    s = _STACKED.match(name)
    if s:
        for e in range(tensor.shape[0]):
            yield f"{s.group(1)}.{e}.{s.group(2)}.weight", tensor[e]
        return
    yield name, tensor


def hf_state_items(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """All HF (key, tensor) pairs for a dsv32 state dict, MTP copies of the shared embedding and
    head included (the release stores them), the tied LM head excluded."""
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        yield from dsv32_to_hf(name, tensor, cfg)
    for j in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + j
        yield f"model.layers.{layer}.embed_tokens.weight", state["model.embed_tokens.weight"]
        yield f"model.layers.{layer}.shared_head.head.weight", state["lm_head.weight"]


def expected_hf_shapes(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape for every tensor a checkpoint of this config must hold."""
    state = {k: v for k, v in model.state_dict().items()}
    return {k: tuple(v.shape) for k, v in hf_state_items(state, cfg)}
