"""dsv32 against transformers' DeepseekV32ForCausalLM on tiny random configs, both directions.

The checkpoint moves through the real converters (transformers' save_pretrained -> our loader,
our save_pretrained -> transformers' from_pretrained); logits must agree to 1e-4 in float32,
including a left-padded batch, and the indexer's selected sets must agree (ties aside)."""

from __future__ import annotations

import pytest
import torch

import dsv32
from dsv32 import Records
from dsv32.kernels import index_scores
from tests.conftest import PARITY_CONFIGS, randomize_, tiny_config, tiny_model

transformers = pytest.importorskip("transformers")

T = 24
ATOL = 1e-4


def hf_model(cfg):
    hf_cfg = transformers.DeepseekV32Config.from_dict(cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    return transformers.DeepseekV32ForCausalLM(hf_cfg).eval()


def inputs(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (3, T), generator=gen)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :7] = 0    # left padding
    mask[2, :1] = 0
    return ids, mask


def capture_hf_indices(hf):
    """Forward hooks on every transformers indexer: layer -> (B, T, k) int indices."""
    captured = {}
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.indexer.register_forward_hook(
            lambda mod, args, kwargs_out, i=i: captured.__setitem__(i, kwargs_out.long()))
    return captured


def assert_sets_agree(ours, theirs, allowed, scores):
    """Per query: our valid selection equals transformers' selection restricted to allowed keys,
    except where the indexer scores at the boundary tie (to float tolerance)."""
    B, Tq, _ = ours.shape
    mismatches = 0
    for b in range(B):
        for t in range(Tq):
            if not allowed[b, t].any():
                continue
            mine = {int(s) for s in ours[b, t] if s >= 0}
            hers = {int(s) for s in theirs[b, t] if allowed[b, t, s]}
            if mine != hers:
                diff = mine ^ hers
                kth = min(float(scores[b, t, s]) for s in mine)
                assert all(abs(float(scores[b, t, s]) - kth) < 1e-5 for s in diff), (b, t, mine, hers)
                mismatches += 1
    assert mismatches <= B * Tq // 20


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_hf_to_dsv32(name, tmp_path):
    cfg = tiny_config(**PARITY_CONFIGS[name])
    assert cfg.index_topk < T
    torch.manual_seed(0)
    hf = randomize_(hf_model(cfg), seed=3)
    hf.save_pretrained(tmp_path)
    ours = dsv32.load_pretrained(tmp_path).eval()

    ids, mask = inputs(cfg)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    captured = capture_hf_indices(hf)
    with torch.no_grad():
        ref_plain = hf(ids).logits
        mine_plain = ours(ids).logits
        hf_selected = {i: v.clone() for i, v in captured.items()}
        ref_pad = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask, records=Records(record_indices=True))
    torch.testing.assert_close(mine_plain, ref_plain, atol=ATOL, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref_pad[real], atol=ATOL, rtol=0)

    # Selected sets (unpadded batch): recompute our scores to judge ties.
    with torch.no_grad():
        plain = ours(ids, records=Records(record_indices=True, keep_indexer_inputs=True))
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(3, T, T)
    for i, layer in enumerate(ours.model.layers):
        kept = plain.records.indexer_inputs[i]              # the layer's own normed input and c_q
        q, w = layer.self_attn.indexer.queries(kept.x, kept.c_q, kept.cos, kept.sin)
        k = layer.self_attn.indexer.keys(kept.x, kept.cos, kept.sin)
        scores = index_scores(q, w, k)
        assert_sets_agree(plain.indices[i], hf_selected[i], allowed, scores)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_dsv32_to_hf(name, tmp_path):
    ours = tiny_model(seed=5, **PARITY_CONFIGS[name]).eval()
    cfg = ours.config
    ours.save_pretrained(tmp_path)
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = inputs(cfg, seed=2)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
        real = mask.bool()
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real], ref[real], atol=ATOL, rtol=0)


def test_left_padding_equals_unpadded(tmp_path):
    """A left-padded row gives the logits the same prompt gets alone (positions count real tokens)."""
    model = tiny_model(seed=7, index_topk=5).eval()
    cfg = model.config
    ids, mask = inputs(cfg)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:2, 7:]).logits
    torch.testing.assert_close(padded[1, 7:], alone[0], atol=1e-5, rtol=0)
