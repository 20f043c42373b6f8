"""Model configuration: one dataclass whose fields are the Hugging Face `config.json` names.

`ModelConfig` holds every field of the DeepSeek-V3.2(-Exp) `config.json` that affects the
model, reads both the release's `rope_scaling` + `rope_theta` keys and transformers' newer
`rope_parameters`, validates itself on construction (a `ValueError` names the field and the
allowed values) and round-trips through `from_hf_config` / `to_hf_config`.

Fields that are not in the HF format but that dsv32 adds (the optional sliding-window/sink
extension of DSA and simulated FP8 indexer numerics) are written to `config.json` only when
they differ from their defaults, so a plain V3.2 config stays a plain V3.2 config.

Deliberately left out: tensor/expert-parallel layout fields (`ep_size`) and quantisation
details other than the FP8 block size; they are kept verbatim in `extra` so that a config
read from disk is written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .validation import check_choice, check_int, check_number, require

_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate")

# Keys transformers writes that are derived from other fields; never stored in `extra`.
_DERIVED_HF_KEYS = {"head_dim", "qk_head_dim", "layer_types", "architectures", "transformers_version",
                    "model_type", "auto_map", "_name_or_path", "output_router_logits", "mlp_bias",
                    "num_local_experts", "pretraining_tp", "aux_loss_alpha", "seq_aux"}

# Fields a config.json must give: a custom model has no meaningful default for its sizes, layer
# and head counts, vocabulary, expert counts or ranks (the dataclass defaults are the 671B shape,
# which only the "v3.2" preset should ever mean). `num_experts` stands for n_routed_experts.
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                      "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
                      "index_topk", "n_routed_experts", "num_experts_per_tok")

# Hugging Face keys that do not change the model: kept verbatim in `extra`, without a warning.
# Any other unknown key is kept too, but warned about by name (with the closest known field).
QUIET_HF_KEYS = {"ep_size", "quantization_config", "num_experts", "rope_interleave", "id2label", "label2id",
                 "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions", "output_hidden_states",
                 "problem_type", "return_dict", "torchscript", "use_bfloat16", "tokenizer_class",
                 "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "prefix",
                 "tf_legacy_loss", "tie_encoder_decoder", "add_cross_attention", "is_decoder",
                 "cross_attention_hidden_size", "max_length", "min_length", "do_sample", "early_stopping",
                 "num_beams", "num_beam_groups", "temperature", "top_k", "top_p", "typical_p",
                 "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "num_return_sequences",
                 "bad_words_ids", "diversity_penalty", "encoder_no_repeat_ngram_size", "forced_bos_token_id",
                 "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
                 "suppress_tokens", "begin_suppress_tokens", "return_dict_in_generate", "output_scores",
                 "pruned_heads", "torch_dtype", "rope_parameters", "rope_scaling"}


class ConfigWarning(UserWarning):
    """A config.json key that dsv32 does not know (kept, but it changes nothing)."""


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    # --- MLA ---------------------------------------------------------------------------
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- DSA (lightning indexer) -------------------------------------------------------
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # --- MoE ---------------------------------------------------------------------------
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    mlp_layer_types: list[str] | None = None
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # --- MTP ---------------------------------------------------------------------------
    num_nextn_predict_layers: int = 0
    # --- positions / norms / misc ------------------------------------------------------
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    # --- dsv32 extensions (not in the HF format; see module docstring) -----------------
    index_window: int = 0       # force the last `index_window` tokens into every selected set
    index_sink: int = 0         # force the first `index_sink` tokens into every selected set
    index_fp8: bool = False     # Hadamard + FP8-e4m3 simulated indexer numerics (deployment)
    # Unknown config.json keys, kept so that a config read from disk is written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
            rs = self.rope_scaling
            if rs["rope_type"] == "yarn" and rs.get("factor") is None and rs.get("original_max_position_embeddings"):
                # The release convention: no factor means max_position_embeddings / original.
                rs["factor"] = self.max_position_embeddings / rs["original_max_position_embeddings"]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [
                "sparse" if (i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0) else "dense"
                for i in range(self.num_hidden_layers)
            ]
        else:
            self.mlp_layer_types = list(self.mlp_layer_types)
        self.validate()

    # ---------------------------------------------------------------------------------
    # Derived quantities
    # ---------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_factor(self) -> float:
        """The YaRN context-extension factor (1.0 when RoPE is unscaled)."""
        if not self.rope_scaling or self.rope_scaling.get("rope_type") != "yarn":
            return 1.0
        factor = self.rope_scaling.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / self.rope_scaling["original_max_position_embeddings"]
        return float(factor)

    @property
    def softmax_scale(self) -> float:
        """Attention scale `(d_n+d_r)^-0.5 * m^2` with YaRN's `m` (docs/math.md §2)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling and self.rope_scaling.get("rope_type") == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0.0
            factor = self.yarn_factor
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses DeepSeekMoE. MTP layers (index >= num_hidden_layers)
        follow the last main layer's kind, as in the release (layer 61 is MoE)."""
        if layer_idx >= self.num_hidden_layers:
            return self.mlp_layer_types[-1] == "sparse" if self.mlp_layer_types else False
        return self.mlp_layer_types[layer_idx] == "sparse"

    @property
    def num_moe_layers(self) -> int:
        return sum(t == "sparse" for t in self.mlp_layer_types)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        fields = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if any(k in changes for k in ("num_hidden_layers", "first_k_dense_replace", "moe_layer_freq")) \
                and "mlp_layer_types" not in changes:
            fields["mlp_layer_types"] = None
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        fields.update(changes)
        return ModelConfig(**fields)

    # ---------------------------------------------------------------------------------
    # Validation
    # ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def name(field: str) -> str:
            return f"config field {field!r}"

        for field in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                      "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
                      "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
                      "n_group", "topk_group", "moe_layer_freq", "max_position_embeddings"):
            check_int(name(field), getattr(self, field), 1)
        for field in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
                      "index_window", "index_sink"):
            check_int(name(field), getattr(self, field), 0)
        for field in ("rms_norm_eps", "routed_scaling_factor", "rope_theta", "initializer_range"):
            check_number(name(field), getattr(self, field), 0, low_open=True)
        check_number(name("attention_dropout"), self.attention_dropout, 0.0, 1.0, high_open=True)
        require(self.num_key_value_heads == self.num_attention_heads, name("num_key_value_heads"),
                f"equal to num_attention_heads ({self.num_attention_heads}) for MLA", self.num_key_value_heads)
        require(self.qk_rope_head_dim % 2 == 0, name("qk_rope_head_dim"), "even", self.qk_rope_head_dim)
        require(self.index_head_dim >= self.qk_rope_head_dim, name("index_head_dim"),
                f">= qk_rope_head_dim ({self.qk_rope_head_dim})", self.index_head_dim)
        require(not (self.index_fp8 and self.index_head_dim & (self.index_head_dim - 1)), name("index_head_dim"),
                "a power of two when index_fp8 is on (Hadamard rotation)", self.index_head_dim)
        check_choice(name("hidden_act"), self.hidden_act, ("silu",))
        check_choice(name("scoring_func"), self.scoring_func, ("sigmoid",))       # DeepSeek-V3 routing
        check_choice(name("topk_method"), self.topk_method, ("noaux_tc",))
        require(self.n_routed_experts % self.n_group == 0, name("n_group"),
                f"a divisor of n_routed_experts ({self.n_routed_experts})", self.n_group)
        per_group = self.n_routed_experts // self.n_group
        require(self.n_group == 1 or per_group >= 2, name("n_group"),
                f"at most n_routed_experts / 2 ({self.n_routed_experts // 2}): group scores are the sum of "
                "each group's top-2 experts", self.n_group)
        check_int(name("topk_group"), self.topk_group, 1, self.n_group)
        require(self.num_experts_per_tok <= per_group * self.topk_group, name("num_experts_per_tok"),
                f"<= the experts in the kept groups (topk_group * n_routed_experts / n_group = "
                f"{per_group * self.topk_group})", self.num_experts_per_tok)
        require(len(self.mlp_layer_types) == self.num_hidden_layers, name("mlp_layer_types"),
                f"a list of num_hidden_layers={self.num_hidden_layers} entries", self.mlp_layer_types)
        for kind in self.mlp_layer_types:
            check_choice(name("mlp_layer_types") + " entries", kind, ("dense", "sparse"))
        check_choice(name("dtype"), self.dtype, sorted(_DTYPES))
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            check_choice(name("rope_scaling.rope_type"), rope_type, ("default", "yarn"))
            if rope_type == "yarn":
                require(self.rope_scaling.get("factor") is not None
                        or bool(self.rope_scaling.get("original_max_position_embeddings")), name("rope_scaling"),
                        "a yarn table with 'factor' or 'original_max_position_embeddings'", self.rope_scaling)
                check_number(name("rope_scaling.factor"), self.yarn_factor, 0, low_open=True)

    # ---------------------------------------------------------------------------------
    # Hugging Face config.json
    # ---------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | Path) -> "ModelConfig":
        """Build from a `config.json` dict (or a path to one, or to its folder). Every field of
        `REQUIRED_HF_FIELDS` must be present (a ValueError lists the missing ones); unknown keys
        are kept in `extra`, with a `ConfigWarning` naming each one not in `QUIET_HF_KEYS`."""
        source = "config"
        if isinstance(hf, (str, Path)):
            path = Path(hf)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            try:
                hf = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"no config.json at {path}") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            except IsADirectoryError:
                raise ValueError(f"{path} is a folder, not a config.json file") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{source} must be a JSON object of config fields, got a {type(hf).__name__}")
        hf = copy.deepcopy(hf)
        model_type = hf.get("model_type", "deepseek_v32")
        if model_type not in ("deepseek_v32", "deepseek_v3"):
            where = f"{source}: " if source != "config" else ""
            raise ValueError(f"{where}config field 'model_type' must be 'deepseek_v32' (or 'deepseek_v3'), "
                             f"got {model_type!r}")
        missing = [k for k in REQUIRED_HF_FIELDS
                   if hf.get(k) is None and not (k == "n_routed_experts" and hf.get("num_experts") is not None)]
        if missing:
            raise ValueError(f"{source} is missing required field(s) {', '.join(missing)}: a custom model has no "
                             f"default for them (the 671B shape is the 'v3.2' preset)")
        rope = hf.pop("rope_parameters", None)
        legacy = hf.pop("rope_scaling", None)
        rope = rope or legacy
        kwargs: dict[str, Any] = {}
        if rope:
            rope = dict(rope)
            if rope.get("rope_theta") is not None:
                kwargs["rope_theta"] = rope.pop("rope_theta")
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            kwargs["rope_scaling"] = None if rope_type == "default" else rope
        if "torch_dtype" in hf and "dtype" not in hf:
            hf["dtype"] = hf.pop("torch_dtype")
        else:
            hf.pop("torch_dtype", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {}
        for key, value in hf.items():
            if key in names:
                kwargs.setdefault(key, value)
            elif key not in _DERIVED_HF_KEYS:
                extra[key] = value
                if key not in QUIET_HF_KEYS:
                    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    warnings.warn(f"{source}: unknown key {key!r} is kept but changes nothing{hint}",
                                  ConfigWarning, stacklevel=2)
        if "num_experts" in extra and "n_routed_experts" not in kwargs:
            kwargs["n_routed_experts"] = extra.pop("num_experts")
        if kwargs.get("dtype") is None:
            kwargs.pop("dtype", None)
        kwargs["extra"] = extra
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:     # TypeError: a value of a kind the checks did not expect
            raise ValueError(f"{source}: {e}" if source != "config" else str(e)) from None

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict, readable by transformers' `DeepseekV32Config` (v5) and by
        the release's loaders (it carries both `rope_parameters` and `rope_scaling`)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
        defaults = ModelConfig.__dataclass_fields__
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "rope_theta"):
                continue
            value = copy.deepcopy(getattr(self, f.name))
            if f.name in ("index_window", "index_sink", "index_fp8") and value == defaults[f.name].default:
                continue
            out[f.name] = value
        out["rope_theta"] = self.rope_theta
        if self.rope_scaling and self.rope_scaling.get("rope_type") != "default":
            params = {"rope_type": self.rope_scaling["rope_type"], "rope_theta": self.rope_theta}
            params.update({k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
            out["rope_parameters"] = params
            legacy = {k: v for k, v in self.rope_scaling.items() if k != "rope_type"}
            legacy["type"] = self.rope_scaling["rope_type"]
            out["rope_scaling"] = legacy
        else:
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_config(), indent=2, sort_keys=True) + "\n")

    # ---------------------------------------------------------------------------------
    # Presets
    # ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)


def _normalise_rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    rope = dict(rope)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    rope.pop("rope_theta", None)
    out = {"rope_type": rope_type}
    for key in _ROPE_KEYS:
        if key in rope:
            out[key] = rope.pop(key)
    out.update(rope)  # keep unknown keys verbatim
    return out


_DTYPES = {"float32", "bfloat16", "float16"}

PRESETS: dict[str, dict[str, Any]] = {
    # Runs a forward pass in milliseconds on a laptop CPU; every feature is exercised: MoE with
    # groups (n_group > 1, topk_group < n_group), a dense first layer, YaRN, and top-k smaller
    # than typical test sequences so selection matters.
    "tiny": dict(
        vocab_size=256 + 3, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16,
        index_topk=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=0, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        dtype="float32",
    ),
    # A model big enough to learn something in minutes on 2 CPU cores (DSA conversion, GRPO).
    "small": dict(
        vocab_size=256 + 3, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4, index_head_dim=32,
        index_topk=256, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        max_position_embeddings=16384, rope_theta=10000.0, rope_scaling=None,
        num_nextn_predict_layers=0, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        dtype="float32",
    ),
    # The released DeepSeek-V3.2(-Exp) 671B shape. Build it on the meta device.
    "v3.2": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64,
        index_head_dim=128, index_topk=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
        routed_scaling_factor=2.5, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, dtype="bfloat16",
    ),
}
