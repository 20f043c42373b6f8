"""Configuration of a dense grouped-query-attention decoder (Llama / Qwen2 / Qwen3 / Mistral) and
of the DSA retrofit attached to it (docs/math.md, "DSA on a dense GQA model").

`DenseConfig` reads a Hugging Face `config.json` of those four families (transformers 4.x keys
`rope_theta` + `rope_scaling` or 5.x `rope_parameters`) and writes it back: the original dict is
kept in `extra`, so saving returns the file the user had, plus one `dsa_retrofit` field once an
indexer is attached (`IndexerSpec`). Everything is validated on construction; a `ValueError`
names the field and what is allowed.

Supported RoPE types: default, linear, llama3. Refused with a clear error: dynamic NTK (its
frequencies depend on the running length), yarn, longrope and anything else. Left out on purpose:
`hidden_act` other than silu, `pretraining_tp` > 1, attention/logit soft-capping (none of the
four families uses them).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
CONFIG_FIELD = "dsa_retrofit"


@dataclass(frozen=True)
class IndexerSpec:
    """The lightning indexer attached to every attention layer not listed in `dense_layers`.

    n_heads H_I, head_dim d_I, rope_dim d_r (RoPE'd leading dims of qI and kI; must divide the
    model's head_dim so the indexer reuses the model's own frequencies), q_rank r_I (the
    low-rank query projection), topk k, dense_layers: layers that keep dense attention and get
    no indexer; window / sink: forced recent / first slots (docs/math.md §5), 0 = off."""

    n_heads: int = 16
    head_dim: int = 64
    rope_dim: int = 32
    q_rank: int = 256
    topk: int = 2048
    dense_layers: tuple[int, ...] = ()
    window: int = 0
    sink: int = 0

    def __post_init__(self) -> None:
        for name in ("n_heads", "head_dim", "rope_dim", "q_rank", "topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"indexer {name} must be a positive int, got {v!r}")
        for name in ("window", "sink"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"indexer {name} must be an int >= 0, got {v!r}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"indexer rope_dim must be even and <= head_dim={self.head_dim}, got {self.rope_dim}")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(int(i) for i in self.dense_layers))))

    @classmethod
    def for_model(cls, cfg: "DenseConfig", topk: int = 2048) -> "IndexerSpec":
        """Default settings sized to `cfg` (V3.2's proportions, smaller for small models): up to
        16 heads of up to 64 dims, the largest rope_dim <= head_dim/2 that reuses the model's
        frequencies, q_rank up to 256 (at most hidden_size/2); sliding-window layers stay dense."""
        head_dim = min(64, max(8, cfg.head_dim))
        rope = next(r for r in range(head_dim // 2 - head_dim // 2 % 2, 0, -2) if (cfg.head_dim // 2) % (r // 2) == 0)
        dense = tuple(i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention")
        return cls(n_heads=min(16, cfg.num_attention_heads), head_dim=head_dim, rope_dim=rope,
                   q_rank=max(8, min(256, cfg.hidden_size // 2)), topk=topk, dense_layers=dense)

    def check_against(self, cfg: "DenseConfig") -> None:
        """Raise ValueError when this indexer cannot sit on `cfg`'s model."""
        bad = [i for i in self.dense_layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"indexer dense_layers {bad} are not layers of a {cfg.num_hidden_layers}-layer model")
        half_model, half_index = cfg.head_dim // 2, self.rope_dim // 2
        if half_model % half_index:
            raise ValueError(f"indexer rope_dim={self.rope_dim} must divide the model's head_dim={cfg.head_dim} "
                             "(every (head_dim / rope_dim)-th RoPE frequency of the model is reused)")
        sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention" and i not in self.dense_layers]
        if sliding:
            raise ValueError(f"layers {sliding} use sliding-window attention (sliding_window={cfg.sliding_window}); "
                             "an indexer cannot be attached there: list them in dense_layers")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexerSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{CONFIG_FIELD} must be a JSON object, got {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {CONFIG_FIELD} field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class DenseConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None          # None = default RoPE; else rope_type + params
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False            # llama/qwen3 attention_bias; always on for qwen2, off for mistral
    o_bias: bool = False              # derived from model_type and qkv_bias
    mlp_bias: bool = False            # llama only
    qk_norm: bool = False             # derived: qwen3
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    initializer_range: float = 0.02
    dtype: str = "float32"
    indexer: IndexerSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)   # the config.json as read

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported by the dense GQA retrofit; "
                             f"supported: {sorted(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        # What the family fixes (as transformers' classes do): Qwen3's q/k norm, Qwen2's q/k/v bias
        # without an o bias, Mistral's no bias; llama/qwen3 `attention_bias` covers q, k, v and o.
        mt = self.model_type
        object.__setattr__(self, "qk_norm", mt == "qwen3")
        if mt == "qwen2":
            object.__setattr__(self, "qkv_bias", True)
        if mt in ("qwen2", "mistral", "qwen3", "llama"):
            object.__setattr__(self, "qkv_bias", False if mt == "mistral" else self.qkv_bias)
            object.__setattr__(self, "o_bias", self.qkv_bias and mt in ("llama", "qwen3"))
        if mt != "llama":
            object.__setattr__(self, "mlp_bias", False)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"layer_types {bad} unsupported; allowed: full_attention, sliding_attention")
        if "sliding_attention" in self.layer_types and not (isinstance(self.sliding_window, int)
                                                            and self.sliding_window >= 1):
            raise ValueError(f"sliding_attention layers need a positive sliding_window, got {self.sliding_window!r}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type")
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope type {kind!r} is not supported; supported: {list(ROPE_TYPES)}")
            need = ("factor",) if kind == "linear" else _LLAMA3_KEYS if kind == "llama3" else ()
            missing = [k for k in need if rs.get(k) is None]
            if missing:
                raise ValueError(f"rope type {kind!r} needs {missing} in rope_scaling / rope_parameters")
        if self.indexer is not None:
            self.indexer.check_against(self)

    # ------------------------------------------------------------------ helpers
    @property
    def num_groups(self) -> int:
        return self.num_key_value_heads

    @property
    def pad_token_id(self) -> int | None:
        return self.extra.get("pad_token_id")

    @property
    def bos_token_id(self) -> int | None:
        return self.extra.get("bos_token_id")

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.extra.get("eos_token_id")

    @property
    def index_topk(self) -> int | None:
        """The indexer's k (the name the DSA verbs read), None without an indexer."""
        return None if self.indexer is None else self.indexer.topk

    def has_indexer(self, layer: int) -> bool:
        return self.indexer is not None and layer not in self.indexer.dense_layers

    def replace(self, **changes: Any) -> "DenseConfig":
        return replace(self, **changes)

    def with_indexer(self, spec: IndexerSpec | None) -> "DenseConfig":
        return replace(self, indexer=spec)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | Path) -> "DenseConfig":
        if not isinstance(hf, dict):
            hf = json.loads(Path(hf).read_text())
        d = copy.deepcopy(hf)
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            archs = d.get("architectures")
            raise ValueError(f"unsupported architecture: model_type {mt!r} (architectures {archs}); the dense "
                             f"retrofit supports model_type in {sorted(ARCHITECTURES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        if int(d.get("pretraining_tp", 1) or 1) != 1:
            raise ValueError(f"pretraining_tp={d['pretraining_tp']} is not supported (only 1)")
        rp = d.get("rope_parameters") or {}
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") if d.get("rope_scaling") else (rp if rp else None)
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = kind
            scaling.pop("type", None)
            if kind == "default":
                scaling = None
        heads = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        elif mt == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        window = d.get("sliding_window")
        layer_types = d.get("layer_types")
        if mt == "mistral":
            layer_types = ["sliding_attention" if window else "full_attention"] * d["num_hidden_layers"]
        elif mt in ("qwen2", "qwen3"):
            if not d.get("use_sliding_window", False):
                window, layer_types = None, ["full_attention"] * d["num_hidden_layers"]
            elif not layer_types:
                mwl = d.get("max_window_layers", d["num_hidden_layers"])
                layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                               for i in range(d["num_hidden_layers"])]
        else:
            window, layer_types = None, None
        spec = d.get(CONFIG_FIELD)
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=o_bias,
            mlp_bias=mt == "llama" and bool(d.get("mlp_bias", False)), qk_norm=mt == "qwen3",
            sliding_window=window, layer_types=tuple(layer_types or ()),
            initializer_range=float(d.get("initializer_range", 0.02)),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            indexer=IndexerSpec.from_dict(spec) if spec is not None else None, extra=hf)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json read (or a fresh one of this family), with the indexer field set or removed."""
        d = copy.deepcopy(self.extra) if self.extra else self._fresh_hf()
        d["dtype"] = self.dtype
        d.pop("torch_dtype", None)
        if self.indexer is None:
            d.pop(CONFIG_FIELD, None)
        else:
            d[CONFIG_FIELD] = self.indexer.to_dict()
        return d

    def _fresh_hf(self) -> dict[str, Any]:
        rp = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rp.update(self.rope_scaling or {})
        d = dict(model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]],
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act="silu",
                 rms_norm_eps=self.rms_norm_eps, rope_parameters=rp,
                 max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, initializer_range=self.initializer_range)
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.model_type != "mistral":
                d["use_sliding_window"] = True
                d["layer_types"] = list(self.layer_types)
        return d
