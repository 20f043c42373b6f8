"""`dsv32.fp8`: the one FP8 e4m3 block quantiser, and its three users (indexer numerics, FP8
latent cache, block-FP8 checkpoints) computing exactly what it computes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dsv32 import fp8
from dsv32.checkpoint import hf_state_items
from dsv32.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from dsv32.inference.cache import LatentCache, StaticLatentCache
from dsv32.model.indexer import Indexer, hadamard_matrix
from tests.conftest import randomize_, tiny_config, tiny_model


def test_fp8_roundtrip_error_and_power_of_two_scales():
    x = torch.randn(64, 256) * 3
    y = fp8.roundtrip(x)
    rel = ((y - x).abs() / x.abs().clamp(min=1e-3)).median()
    assert rel < 0.05                      # e4m3 has a 3-bit mantissa: ~2^-4 relative error
    assert not torch.equal(x, y)
    # Values exactly representable at the chosen power-of-two scale survive unchanged.
    z = torch.tensor([[1.0, 2.0, -0.5, 448.0 / 4]])
    torch.testing.assert_close(fp8.roundtrip(z), z)


@pytest.mark.parametrize("shape,block", [((3, 300), (128,)), ((2, 5, 16), (128,)), ((130, 260), (128, 128)),
                                         ((7, 9), (4, 2))])
def test_scales_are_powers_of_two_covering_each_block(shape, block):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5
    q, scale = fp8.quantize(x, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == fp8.scale_shape(shape, block)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    assert q.float().abs().max() <= fp8.E4M3_MAX
    back = fp8.dequantize(q, scale, block)
    # Each block's largest value lands in the top binade of e4m3: error <= 2^-4 of the block amax.
    assert ((back - x).abs().max() <= 2 ** -4 * x.abs().max())
    with pytest.raises(ValueError, match="expected"):
        fp8.dequantize(q, scale[:1], block)


def test_exact_scales_without_power_of_two_rounding():
    x = torch.tensor([[0.0, 1.0, -3.5, 7.0]])
    q, scale = fp8.quantize(x, (4,), pow2_scales=False)
    assert scale.item() == 7.0 / fp8.E4M3_MAX
    assert q.float()[0, 3].item() == fp8.E4M3_MAX


def test_indexer_numerics_are_the_shared_roundtrip():
    cfg = tiny_config()
    plain = randomize_(Indexer(cfg), seed=2)
    deployed = Indexer(cfg.replace(index_fp8=True))
    deployed.load_state_dict(plain.state_dict())
    x, c_q = torch.randn(2, 5, cfg.hidden_size), torch.randn(2, 5, cfg.q_lora_rank)
    cos, sin = torch.ones(2, 5, cfg.qk_rope_head_dim // 2), torch.zeros(2, 5, cfg.qk_rope_head_dim // 2)
    h = hadamard_matrix(cfg.index_head_dim)
    assert torch.equal(deployed.keys(x, cos, sin), fp8.roundtrip(plain.keys(x, cos, sin) @ h))
    (q, w), (q_plain, w_plain) = deployed.queries(x, c_q, cos, sin), plain.queries(x, c_q, cos, sin)
    assert torch.equal(q, fp8.roundtrip(q_plain @ h)) and torch.equal(w, w_plain)


@pytest.mark.parametrize("static", [False, True])
def test_fp8_cache_stores_and_reads_the_shared_format(static):
    cfg = tiny_config()
    cache = StaticLatentCache(cfg, 2, 8, fp8=True) if static else LatentCache(cfg, fp8=True)
    r = cfg.kv_lora_rank
    latent = torch.randn(2, 6, r + cfg.qk_rope_head_dim)
    k_index = torch.randn(2, 6, cfg.index_head_dim)
    cache.begin(2, 6, None)
    got_latent, got_index = cache.update(0, latent, k_index, 0)
    stored = {k: v[:2, :6] for k, v in cache._store[0].items()}
    for name, x in (("c_kv", latent[..., :r]), ("k_index", k_index)):
        q, scale = fp8.quantize(x)
        assert torch.equal(stored[name].float(), q.float()) and torch.equal(stored[name + "_scale"], scale)
    assert torch.equal(got_latent[..., :r], fp8.roundtrip(latent[..., :r]))
    assert torch.equal(got_index, fp8.roundtrip(k_index))


def test_fp8_checkpoint_is_the_shared_format_in_128x128_blocks(tmp_path):
    model = tiny_model(seed=3, hidden_size=136, q_lora_rank=132, num_hidden_layers=2)
    cfg = model.config
    w = torch.randn(200, 136)
    q, scale = quantize_blockwise(w)
    q_ref, scale_ref = fp8.quantize(w, (128, 128))
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(scale, scale_ref)
    assert torch.equal(dequantize_blockwise(q, scale), fp8.roundtrip(w, (128, 128)))
    model.save_pretrained(tmp_path, fp8_weights=True)
    written = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.self_attn.q_b_proj.weight"
    original = dict(hf_state_items(model.state_dict(), cfg))[key]
    q_ref, scale_ref = fp8.quantize(original, (128, 128))
    assert torch.equal(written[key].float(), q_ref.float()) and torch.equal(written[key + "_scale_inv"], scale_ref)
