"""The lightning indexer retrofitted onto a dense GQA model (docs/math.md §4b): attaching it leaves
dense logits alone, its RoPE is the model's own (scores depend on relative position only, and
the start copies kv group 0's rotated key dims exactly), it saves and reloads as HF layout +
indexer tensors + `dsa_retrofit`, transformers still loads that file as the dense model, and
incompatible indexer settings are one clear error."""

from __future__ import annotations

import json

import pytest
import torch

from dsv32 import AttentionOptions, Records
from dsv32.checkpoint import CheckpointError
from dsv32.checkpoint.hf_dense import attach_indexer, load_dense
from dsv32.kernels import index_scores
from dsv32.model.gqa import GQAForCausalLM
from dsv32.model.gqa_config import DenseConfig, IndexerSpec
from dsv32.model.rope import apply_rope_half
from tests.conftest import randomize_

SPEC = IndexerSpec(n_heads=4, head_dim=12, rope_dim=8, q_rank=16, topk=5, dense_layers=(0,))


def dense_config(**kw) -> DenseConfig:
    base = dict(model_type="llama", vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    base.update(kw)
    return DenseConfig(**base)


def dense_model(seed=0, **kw) -> GQAForCausalLM:
    return randomize_(GQAForCausalLM(dense_config(**kw)), seed=seed).eval()


def test_attach_keeps_dense_logits_and_places_indexers():
    dense = dense_model()
    sparse = attach_indexer(dense, SPEC).eval()
    assert [layer.self_attn.indexer is None for layer in sparse.model.layers] == [True, False, False]
    ids = torch.randint(0, 53, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(ids).logits
        torch.testing.assert_close(sparse(ids, attention=AttentionOptions(sparse=False)).logits, ref)
        out = sparse(ids, records=Records(record_indices=True))          # T = 14 > k = 5: selection runs
    assert set(out.indices) == {1, 2} and out.indices[1].shape == (2, 14, 5)


def test_start_copies_group0_rotated_key_dims():
    model = attach_indexer(dense_model(seed=1), SPEC)
    attn = model.model.layers[1].self_attn
    ix = attn.indexer
    x = torch.randn(1, 7, 32)
    pos = torch.arange(3, 10)[None]
    cos, sin = model.rotary(pos)
    with torch.no_grad():
        _, k_model, _ = attn.project(x, cos, sin)                         # (1, 7, G, d), RoPE'd
        mine = ix._rope(ix.wk(x).float(), cos, sin)                       # before k_norm
    dims = ix._model_dims()[: SPEC.rope_dim]
    torch.testing.assert_close(mine[..., : SPEC.rope_dim], k_model[:, :, 0, dims], atol=1e-6, rtol=1e-6)


def test_scores_depend_on_relative_position_only():
    model = attach_indexer(dense_model(seed=2), SPEC)
    ix = model.model.layers[2].self_attn.indexer
    x = torch.randn(1, 9, 32)
    scores = []
    for shift in (0, 37):
        cos, sin = model.rotary(torch.arange(9)[None] + shift)
        with torch.no_grad():
            q, w = ix.queries(x, x, cos, sin)
            scores.append(index_scores(q, w, ix.keys(x, cos, sin)))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-4)


def test_save_reload_and_transformers_reads_it_as_dense(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = randomize_(attach_indexer(dense_model(seed=3), SPEC), seed=4).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dsa_retrofit"]["topk"] == 5 and cfg["dsa_retrofit"]["dense_layers"] == [0]
    back = load_dense(tmp_path).eval()
    ids = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(ids, records=Records(record_indices=True))
        b = back(ids, records=Records(record_indices=True))
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        dense = hf(ids).logits
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert all(torch.equal(a.indices[i], b.indices[i]) for i in a.indices)
    mine = model(ids, attention=AttentionOptions(sparse=False)).logits
    torch.testing.assert_close(mine, dense, atol=1e-4, rtol=0)


def test_load_dense_with_a_fresh_indexer(tmp_path):
    dense = dense_model(seed=5)
    dense.save_pretrained(tmp_path)
    loaded = load_dense(tmp_path, indexer=SPEC)
    ref = attach_indexer(dense, SPEC)
    for (n, p), (m, r) in zip(loaded.state_dict().items(), ref.state_dict().items()):
        assert n == m
        if not n.endswith("weights_proj.weight"):           # the one randomly started indexer part
            assert torch.equal(p, r), n
    with pytest.raises(CheckpointError, match="already has an indexer"):
        loaded.save_pretrained(tmp_path / "x")
        load_dense(tmp_path / "x", indexer=SPEC)


def test_incompatible_indexer_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rope_dim=6 must divide the model's head_dim=16"):
        dense_config(indexer=IndexerSpec(head_dim=12, rope_dim=6))
    with pytest.raises(ValueError, match=r"dense_layers \[7\] are not layers"):
        dense_config(indexer=IndexerSpec(dense_layers=(7,)))
    with pytest.raises(ValueError, match="sliding-window attention"):
        dense_config(model_type="mistral", sliding_window=8, rope_scaling=None,
                     layer_types=("sliding_attention",) * 3, indexer=IndexerSpec(rope_dim=8))
    with pytest.raises(ValueError, match="unknown dsa_retrofit field"):
        IndexerSpec.from_dict({"heads": 4})
    dense_model().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="indexer incompatible"):
        load_dense(tmp_path, indexer=IndexerSpec(head_dim=16, rope_dim=12))


def test_start_fits_any_indexer_width():
    """Indexer head dims wider than the model's (every model dim rotated) still start from its geometry."""
    for spec in (IndexerSpec(n_heads=3, head_dim=24, rope_dim=16, q_rank=8, topk=4),
                 IndexerSpec(n_heads=8, head_dim=4, rope_dim=4, q_rank=64, topk=4)):
        model = attach_indexer(dense_model(seed=3), spec)
        ix = model.model.layers[0].self_attn.indexer
        assert ix.wk.weight.shape == (spec.head_dim, 32) and torch.isfinite(ix.wq_b.weight).all()
