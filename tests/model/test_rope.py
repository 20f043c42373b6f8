"""RoPE/YaRN frequencies against transformers' modeling_rope_utils; layouts."""

from __future__ import annotations

import pytest
import torch

from dsv32 import ModelConfig
from dsv32.model.rope import apply_rope_half, apply_rope_interleaved, rope_parameters

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 2048, "mscale": 0.9,
     "mscale_all_dim": 0.6, "truncate": False},
    {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 1024, "attention_factor": 1.3},
    {"rope_type": "yarn", "original_max_position_embeddings": 20480},   # factor from max_position_embeddings
])
def test_yarn_matches_transformers(rope):
    cfg = ModelConfig.preset("v3.2", rope_scaling=rope)
    inv, factor = rope_parameters(cfg)
    hf_cfg = transformers.DeepseekV32Config.from_dict(cfg.to_hf_config())
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    torch.testing.assert_close(inv, hf_inv.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(hf_factor)


def test_layouts_rotate_the_same_pairs_differently():
    x = torch.arange(8.0).view(1, 1, 8)
    cos, sin = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)     # a quarter turn
    # interleaved: (x0, x1) -> (-x1, x0)
    assert apply_rope_interleaved(x, cos, sin).flatten().tolist() == [-1, 0, -3, 2, -5, 4, -7, 6]
    # half-split: (x_i, x_{i+4}) -> (-x_{i+4}, x_i)
    assert apply_rope_half(x, cos, sin).flatten().tolist() == [-4, -5, -6, -7, 0, 1, 2, 3]


def test_rotation_is_relative():
    """q(t).k(s) after RoPE depends on t - s only."""
    cfg = ModelConfig.preset("tiny")
    inv, f = rope_parameters(cfg)
    q, k = torch.randn(8), torch.randn(8)

    def rot(v, p):
        ang = torch.tensor([[p]], dtype=torch.float32)[..., None] * inv
        return apply_rope_interleaved(v.view(1, 1, 8), ang.cos() * f, ang.sin() * f).flatten()
    assert float(rot(q, 10) @ rot(k, 3)) == pytest.approx(float(rot(q, 107) @ rot(k, 100)), rel=1e-4)
