"""dsv32's dense GQA decoder against transformers' Llama / Qwen2 / Qwen3 / Mistral on tiny random
configs, both directions through real files (HF save_pretrained -> our loader; our saver -> HF
from_pretrained): logits to 1e-4 in float32, with a left-padded batch. Also: sharded files, tied
embeddings, Llama-3 / linear RoPE, a sliding window that bites, and saving returns the layout read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dsv32.checkpoint import CheckpointError
from dsv32.checkpoint.hf_dense import load_dense
from dsv32.model.gqa import GQAForCausalLM
from dsv32.model.gqa_config import DenseConfig
from tests.conftest import randomize_

transformers = pytest.importorskip("transformers")

T = 20
ATOL = 1e-4
BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "llama3_rope_bias_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen2_window_layer1": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, use_sliding_window=True,
                                                                    sliding_window=4, max_window_layers=1)),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=12)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1, head_dim=8,
                                                           tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, head_dim=8,
                                                                   sliding_window=5)),
    "mistral_full": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
}


def hf_model(name: str, seed: int = 3):
    cfg_cls, model_cls, extra = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return randomize_(getattr(transformers, model_cls)(cfg), seed=seed).eval()


def inputs(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, T), generator=gen)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, :1] = 0
    return ids, mask


def compare(ours, hf, seed: int) -> None:
    ids, mask = inputs(ours.config.vocab_size, seed)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_to_dsv32(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")          # sharded with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_dense(tmp_path).eval()
    assert isinstance(ours, GQAForCausalLM)
    compare(ours, hf, seed=1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dsv32_to_hf(name, tmp_path):
    src = tmp_path / "src"
    hf_model(name, seed=4).save_pretrained(src)
    ours = load_dense(src).eval()
    randomize_(ours, seed=9)                                      # new weights, written by our saver
    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, FAMILIES[name][1]).from_pretrained(tmp_path / "ours",
                                                                    attn_implementation="eager").eval()
    compare(ours, back, seed=2)


def test_save_returns_the_layout_read(tmp_path):
    hf = hf_model("qwen3_tied")
    hf.save_pretrained(tmp_path / "a")
    load_dense(tmp_path / "a").save_pretrained(tmp_path / "b")
    ja, jb = (json.loads((tmp_path / p / "config.json").read_text()) for p in "ab")
    ja.pop("dtype", None), jb.pop("dtype", None)
    assert ja == jb
    keys = [set(safe_open(tmp_path / p / "model.safetensors", "pt").keys()) for p in "ab"]
    assert keys[0] == keys[1] and "lm_head.weight" not in keys[1]


def test_bad_input_is_one_clear_error(tmp_path):
    hf = hf_model("llama_gqa")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match="mlp.*has shape .* config.json implies"):
        load_dense(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match="unsupported architecture: model_type 'gemma'"):
        load_dense(tmp_path)
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        DenseConfig.from_hf_config({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        DenseConfig.from_hf_config({**cfg, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        DenseConfig.from_hf_config({**cfg, "num_key_value_heads": 3})


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_config_built_in_python_round_trips(family, tmp_path):
    """A DenseConfig written by hand gets what its family fixes (q/k norm, biases) and reloads the same."""
    cfg = DenseConfig(model_type=family, vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, qkv_bias=True)
    model = randomize_(GQAForCausalLM(cfg), seed=1).eval()
    model.save_pretrained(tmp_path)
    back = load_dense(tmp_path).eval()
    assert back.config == cfg and hasattr(back.model.layers[0].self_attn, "q_norm") == (family == "qwen3")
    ids = torch.randint(0, 31, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    hf = getattr(transformers, ARCH[family]).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM"}
