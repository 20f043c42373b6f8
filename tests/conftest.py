"""Shared fixtures: the named test models (`tiny_model`), tiny configs, seeded random weights
that make every part matter, and `keep_threads` for tests that call a benchmark's main (which
sets torch's thread count)."""

from __future__ import annotations

import pytest
import torch

from dsv32 import DSV32ForCausalLM, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer MoE config small enough for CPU tests in milliseconds."""
    base = dict(
        vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=20,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, index_n_heads=8, index_head_dim=16,
        index_topk=6, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, max_position_embeddings=256, dtype="float32",
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


# The three parity configurations of the core issue: grouped routing, YaRN, selection that bites.
PARITY_CONFIGS = {
    "grouped_moe": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, index_topk=12),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7},
                 index_topk=10),
    "small_topk": dict(index_topk=4, first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.5),
}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Overwrite every parameter and float buffer with seeded noise: matrices N(0, std), norm
    weights around 1, biases and the router bias small, so no part is trivially identity."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        # transformers' reference model keeps RoPE's inv_freq as a float buffer: never noise it.
        if not t.is_floating_point() or name.endswith("inv_freq"):
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            t.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            t.copy_(0.05 * noise)
        else:
            t.copy_(std * noise)
    return module


# The named test models. Every test builds its model with `tiny_model(name, seed=..., **overrides)`:
#   tiny    tiny_config(): 97 ids, 3 layers (1 dense + 2 MoE, one group), top-6 selection
#   byte    tiny over the byte tokenizer's 259 ids, the trainer's own init (training tests learn from it)
#   decode  tiny with top-4 selection and 128 positions, larger weights (generation tests)
#   policy  the library's `tiny` preset, dense at test lengths (top-128), 256 positions (RL tests)
TEST_MODELS: dict[str, dict] = {
    "tiny": dict(config=lambda **kw: tiny_config(**kw), weights="random", std=0.15),
    "byte": dict(config=lambda **kw: tiny_config(**{**dict(vocab_size=259, bos_token_id=256, eos_token_id=257,
                                                             pad_token_id=258, max_position_embeddings=512), **kw}),
                 weights="init"),
    "decode": dict(config=lambda **kw: tiny_config(**{**dict(index_topk=4, max_position_embeddings=128), **kw}),
                   weights="random", std=0.25),
    "policy": dict(config=lambda **kw: ModelConfig.preset("tiny", **{**dict(index_topk=128,
                                                                             max_position_embeddings=256), **kw}),
                   weights="random", std=0.1),
}


def tiny_model(preset: str | ModelConfig = "tiny", *, seed: int = 0, std: float | None = None,
               **overrides) -> DSV32ForCausalLM:
    """A named test model (or one of `preset`'s config) with seeded weights: `randomize_` noise,
    or the model's own `init_weights` for the "byte" preset."""
    if isinstance(preset, ModelConfig):
        spec, cfg = TEST_MODELS["tiny"], preset.replace(**overrides) if overrides else preset
    else:
        spec = TEST_MODELS[preset]
        cfg = spec["config"](**overrides)
    if spec["weights"] == "init":
        model = DSV32ForCausalLM(cfg, init=False)
        model.init_weights(seed=seed)
        return model
    return randomize_(DSV32ForCausalLM(cfg), seed=seed, std=spec["std"] if std is None else std)


@pytest.fixture
def tiny() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after the test: a benchmark's `--threads` must not leak into
    later tests (a child process and the parent would then sum floats differently)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
