"""ModelConfig: HF round trip, both RoPE key styles, presets, validation messages, meta build."""

from __future__ import annotations

import json

import pytest
import torch

from dsv32 import DSV32ForCausalLM, ModelConfig
from tests.conftest import tiny_config

RELEASE_CONFIG = {  # the shape of DeepSeek-V3.2-Exp's config.json
    "architectures": ["DeepseekV32ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v32", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.44.2", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


def test_release_config_reads_as_the_v32_preset():
    cfg = ModelConfig.from_hf_config(RELEASE_CONFIG)
    preset = ModelConfig.preset("v3.2")
    for field in ("hidden_size", "num_hidden_layers", "index_topk", "n_group", "topk_group", "kv_lora_rank",
                  "num_nextn_predict_layers", "dtype", "first_k_dense_replace"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.yarn_factor == 40
    assert cfg.extra["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg.mlp_layer_types[:3] == ["dense"] * 3 and cfg.mlp_layer_types[3] == "sparse"
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)


def test_round_trip_and_rope_parameters_style():
    cfg = ModelConfig.from_hf_config(RELEASE_CONFIG)
    hf = cfg.to_hf_config()
    assert hf["rope_parameters"]["rope_type"] == "yarn" and hf["rope_scaling"]["type"] == "yarn"
    again = ModelConfig.from_hf_config(json.loads(json.dumps(hf)))
    assert again == cfg
    # transformers v5 style: rope_parameters with rope_theta inside, no rope_scaling
    v5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    assert ModelConfig.from_hf_config(v5) == cfg


def test_transformers_reads_our_config():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    hf = transformers.DeepseekV32Config.from_dict(cfg.to_hf_config())
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.index_topk == cfg.index_topk and hf.mlp_layer_types == cfg.mlp_layer_types


def test_extensions_written_only_when_used():
    assert "index_window" not in tiny_config().to_hf_config()
    assert tiny_config(index_window=4).to_hf_config()["index_window"] == 4


def test_v32_builds_on_meta_without_allocating():
    with torch.device("meta"):
        model = DSV32ForCausalLM(ModelConfig.preset("v3.2"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 670e9 < model.num_parameters() < 675e9        # 671B main model
    assert len(model.mtp) == 1


def test_tiny_preset_runs():
    cfg = ModelConfig.preset("tiny")
    model = DSV32ForCausalLM(cfg)
    logits = model(torch.randint(0, 256, (1, 40))).logits
    assert logits.shape == (1, 40, cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("field,value,message", [
    ("n_group", 3, "n_group"),
    ("topk_group", 5, "topk_group"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("hidden_act", "gelu", "'silu'"),
    ("qk_rope_head_dim", 7, "even"),
    ("index_head_dim", 4, "index_head_dim"),
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("hidden_size", 0, "hidden_size"),
    ("index_topk", -1, "index_topk"),
    ("scoring_func", "softmax", "scoring_func"),
    ("mlp_layer_types", ["dense", "moe", "dense"], "mlp_layer_types"),
    ("dtype", "int8", "dtype"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_type"),
])
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_index_fp8_needs_power_of_two_head_dim():
    with pytest.raises(ValueError, match="power of two"):
        tiny_config(index_fp8=True, index_head_dim=24)


def test_unknown_preset_and_model_type():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("v4")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_config({**RELEASE_CONFIG, "model_type": "llama"})


# ------------------------------------------------------------------ strictness (issue 13)
def test_a_config_missing_size_fields_is_an_error_listing_them_never_the_671b_defaults(tmp_path):
    # Issue 13: {"model_type": ...} alone built the 671B model; no hidden_size made `info` say 7168.
    with pytest.raises(ValueError, match=r"missing required field\(s\) vocab_size, hidden_size, .*num_experts_per_tok"):
        ModelConfig.from_hf_config({"model_type": "deepseek_v32"})
    partial = {k: v for k, v in tiny_config().to_hf_config().items() if k != "hidden_size"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(partial))
    with pytest.raises(ValueError, match=rf"{path} is missing required field\(s\) hidden_size:"):
        ModelConfig.from_hf_config(path)
    # `num_experts` (another HF spelling) stands in for n_routed_experts.
    hf = tiny_config().to_hf_config()
    hf["num_experts"] = hf.pop("n_routed_experts")
    assert ModelConfig.from_hf_config(hf).n_routed_experts == tiny_config().n_routed_experts


def test_unknown_keys_are_warned_with_the_closest_field_but_quiet_hf_keys_are_not():
    hf = {**tiny_config().to_hf_config(), "hiden_size": 9, "ep_size": 1, "id2label": {"0": "a"}}
    with pytest.warns(UserWarning, match=r"unknown key 'hiden_size' .*did you mean 'hidden_size'") as record:
        cfg = ModelConfig.from_hf_config(hf)
    assert len(record) == 1 and cfg.hidden_size == tiny_config().hidden_size
    assert cfg.extra["hiden_size"] == 9          # still written back unchanged
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_hf_config(RELEASE_CONFIG)   # the release's own keys: not a word


@pytest.mark.parametrize("text, message", [("[1, 2]", "must be a JSON object .* got a list"),
                                           ("3", "got a int"), ("{bad", "not valid JSON")])
def test_a_config_that_is_not_a_json_object_is_one_error(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(path)
