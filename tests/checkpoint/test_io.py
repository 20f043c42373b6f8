"""Checkpoint I/O: round trips (single file, sharded, MTP), FP8 block dequantisation, the convert
verb, interrupted saves, and one clear error per kind of bad checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv32
from dsv32.checkpoint import CheckpointError, hf
from dsv32.checkpoint.fp8 import dequantize_blockwise, is_quantizable, quantize_blockwise
from dsv32.cli import main as cli
from tests.conftest import tiny_config, tiny_model


def saved(tmp_path, name="ckpt", seed=0, **overrides):
    model = tiny_model(seed=seed, **overrides).eval()
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


def test_round_trip_single_file(tmp_path):
    model, path = saved(tmp_path)
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    keys = set(load_file(path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys          # per-expert HF keys
    assert "model.layers.1.self_attn.indexer.weights_proj.weight" in keys
    same_model(model, dsv32.load_pretrained(path))


def test_sharded_index_loads(tmp_path):
    model, _ = saved(tmp_path)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((path / s).exists() for s in shards)
    assert not (path / "model.safetensors").exists()
    same_model(model, dsv32.load_pretrained(path))
    # Saving single-file over it removes the stale shards and index.
    model.save_pretrained(path)
    assert not (path / "model.safetensors.index.json").exists()
    assert not any(path.glob("model-*.safetensors"))
    same_model(model, dsv32.load_pretrained(path))


def test_mtp_round_trip_and_skip(tmp_path):
    model, path = saved(tmp_path, num_nextn_predict_layers=1)
    L = model.config.num_hidden_layers
    keys = set(load_file(path / "model.safetensors"))
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "self_attn.indexer.wk.weight"):
        assert f"model.layers.{L}.{k}" in keys
    loaded = dsv32.load_pretrained(path)
    same_model(model, loaded)
    ids = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        a, b = model(ids, compute_mtp=True), loaded(ids, compute_mtp=True)
    assert a.mtp_logits[0].shape == (1, 9, 97)
    torch.testing.assert_close(a.mtp_logits[0], b.mtp_logits[0], atol=0, rtol=0)
    no_mtp = dsv32.load_pretrained(path, load_mtp=False)
    assert len(no_mtp.mtp) == 0


def test_fp8_checkpoint_written_by_hand_loads_dequantised(tmp_path):
    """Quantise a tiny model's linear weights in 128x128 blocks (dims > 128 so blocks are partial),
    write the release layout by hand, load, and compare with w_fp8 * scale_inv."""
    model = tiny_model(seed=1, hidden_size=136, intermediate_size=260, q_lora_rank=132, num_hidden_layers=2)
    cfg = model.config
    path = tmp_path / "fp8"
    path.mkdir()
    tensors, expected = {}, {}
    for key, t in dsv32.checkpoint.hf_state_items(model.state_dict(), cfg):
        t = t.contiguous().clone()
        if is_quantizable(key):
            q, s = quantize_blockwise(t)
            assert s.shape == ((t.shape[0] + 127) // 128, (t.shape[1] + 127) // 128)
            tensors[key], tensors[key + "_scale_inv"] = q, s
            blocks = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            expected[key] = q.float() * blocks
        else:
            tensors[key] = t
            expected[key] = t
    save_file(tensors, str(path / "model.safetensors"))
    hf_cfg = cfg.to_hf_config()
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(hf_cfg))
    loaded = dsv32.load_pretrained(path)
    ours = dict(dsv32.checkpoint.hf_state_items(loaded.state_dict(), loaded.config))
    n_quantised = 0
    for key, want in expected.items():
        torch.testing.assert_close(ours[key], want, atol=0, rtol=0, msg=key)
        n_quantised += key + "_scale_inv" in tensors
    assert n_quantised > 10
    # The dequantised weights are close to the originals (e4m3: ~6% worst-case relative step).
    orig = dict(dsv32.checkpoint.hf_state_items(model.state_dict(), cfg))
    w = "model.layers.1.self_attn.q_b_proj.weight"
    assert (ours[w] - orig[w]).abs().max() <= 0.07 * orig[w].abs().max()


def test_fp8_save_and_convert_to_bf16(tmp_path):
    model, path = saved(tmp_path, num_nextn_predict_layers=1)
    fp8_path = tmp_path / "fp8"
    model.save_pretrained(fp8_path, fp8_weights=True)
    with safe_open(fp8_path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_b_proj.weight").get_dtype() == "F8_E4M3"
        assert "model.layers.0.self_attn.q_b_proj.weight_scale_inv" in f.keys()
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
    assert json.loads((fp8_path / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    out = tmp_path / "bf16"
    assert cli(["convert", str(fp8_path), str(out), "--dtype", "bf16", "--drop-mtp"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg and cfg["num_nextn_predict_layers"] == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_b_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert not any(k.startswith(f"model.layers.{model.config.num_hidden_layers}.") for k in f.keys())
    a = dsv32.load_pretrained(fp8_path, load_mtp=False)
    b = dsv32.load_pretrained(out)
    w = "model.layers.0.self_attn.q_b_proj.weight"
    torch.testing.assert_close(b.state_dict()[w], a.state_dict()[w].bfloat16().float())


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, path = saved(tmp_path)
    (path / "tokenizer.json").write_text("{}")
    other = tiny_model(model.config, seed=9)
    calls = {"n": 0}
    real = hf.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(hf, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(path, max_shard_size="40KB")
    same_model(model, dsv32.load_pretrained(path))
    assert (path / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # temp folder cleaned up


# ----------------------------------------------------------------------------- bad checkpoints
def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_key(tmp_path):
    _, path = saved(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"):
        dsv32.load_pretrained(path)


def test_unexpected_key(tmp_path):
    _, path = saved(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.inv_freq", torch.zeros(4)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.rotary.inv_freq' "
                                              r"in model.safetensors"):
        dsv32.load_pretrained(path)


def test_wrong_shape(tmp_path):
    _, path = saved(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' in model.safetensors has shape \(7,\)"):
        dsv32.load_pretrained(path)


def test_config_contradicts_weights(tmp_path):
    _, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["kv_lora_rank"] = 24
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config contradicts the weights"):
        dsv32.load_pretrained(path)


def test_truncated_file(tmp_path):
    _, path = saved(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        dsv32.load_pretrained(path)


def test_unsupported_dtype(tmp_path):
    _, path = saved(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(torch.int32)))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' in model.safetensors has unsupported dtype I32"):
        dsv32.load_pretrained(path)


def test_fp8_without_scale(tmp_path):
    _, path = saved(tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(key, t[key].to(torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{key}'.*no '{key}_scale_inv'"):
        dsv32.load_pretrained(path)


def test_pickle_only_folder_is_refused(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    tiny_config().save(path / "config.json")
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="safetensors only"):
        dsv32.load_pretrained(path)


def test_index_pointing_at_missing_shard(tmp_path):
    model, _ = saved(tmp_path)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {victim.name}, which does not exist"):
        dsv32.load_pretrained(path)


def test_convert_reports_errors_in_one_line(tmp_path, capsys):
    assert cli(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv32: error:") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_dequantize_checks_scale_shape():
    q, s = quantize_blockwise(torch.randn(130, 10))
    with pytest.raises(ValueError, match="expected"):
        dequantize_blockwise(q, s[:1])
