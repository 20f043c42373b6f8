"""Decoding the retrofitted GQA model over its K/V + indexer-key cache: prefill then one token at
a time equals one full forward (sparse, k small enough that selection drops keys, left padding
included), and `dsv32.inference.generate` runs it and reproduces greedy argmax of full forwards,
shared prompts included. The FP8 cache stores `dsv32.fp8`'s format and decodes exactly as its float
reference (the same rows rounded through FP8 and kept in float32)."""

from __future__ import annotations

import torch

from dsv32 import AttentionOptions, fp8
from dsv32.inference.generate import generate
from dsv32.inference.gqa_cache import GQACache
from tests.model.test_gqa_sparse import retrofitted


def _batch():
    """Two rows of 15 tokens, the first left-padded by 3."""
    ids = torch.randint(0, 53, (2, 15), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def _decode(model, ids, mask, cache, opts):
    """Prefill 8 tokens, then decode the rest one at a time; the logits of every step, joined."""
    with torch.no_grad():
        steps = [model(ids[:, :8], mask[:, :8], cache=cache, attention=opts).logits]
        for t in range(8, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache, attention=opts).logits)
    return torch.cat(steps, dim=1)


def test_incremental_decode_equals_full_forward():
    model = retrofitted(seed=6)
    ids, mask = _batch()
    opts = AttentionOptions(topk=4)
    with torch.no_grad():
        full = model(ids, mask, attention=opts).logits
    inc = _decode(model, ids, mask, model.new_cache(2, 15), opts)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        dense = model(ids, mask, attention=AttentionOptions(sparse=False)).logits
    assert (full[real] - dense[real]).abs().max() > 1e-3          # top-4 of up to 15 keys really bites


def test_generate_greedy_matches_full_forward():
    model = retrofitted(seed=7)
    prompts = [[5, 9, 11, 3, 7, 8, 2, 30], [4, 40, 41]]
    opts = AttentionOptions(topk=4)
    res = generate(model, prompts, max_new_tokens=6, temperature=0.0, attention=opts, stop_tokens=[])
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                logits = model(torch.tensor([seq]), attention=opts).logits[0, -1]
            seq.append(int(logits.argmax()))
        assert res.tokens[row].tolist() == seq[len(prompt):]


def test_shared_prompts_prefilled_once_equal_separate_rows():
    """generate copies the cache rows of a prompt several rows share (GRPO's groups)."""
    model = retrofitted(seed=7)
    opts = AttentionOptions(topk=4)
    prompts = [[5, 9, 11, 3, 7, 8], [5, 9, 11, 3, 7, 8], [4, 40, 41]]
    together = generate(model, prompts, max_new_tokens=5, temperature=0.0, attention=opts, stop_tokens=[])
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=5, temperature=0.0, attention=opts, stop_tokens=[])
        assert together.tokens[row].tolist() == alone.tokens[0].tolist()


def test_fp8_cache_stores_and_reads_the_shared_format():
    cfg = retrofitted().config
    cache = GQACache(cfg, 2, 8, fp8=True)
    G, d, d_i = cfg.num_key_value_heads, cfg.head_dim, cfg.indexer.head_dim
    gen = torch.Generator().manual_seed(0)
    rows = {"k": torch.randn(2, 6, G, d, generator=gen), "v": torch.randn(2, 6, G, d, generator=gen),
            "k_index": torch.randn(2, 6, d_i, generator=gen)}
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.has_indexer(i))
    cache.begin(2, 6, None)
    got = dict(zip(rows, cache.update(layer, rows["k"], rows["v"], rows["k_index"], 0)))
    cache.commit(6)
    stored = {k: v[:2, :6] for k, v in cache._store[layer].items()}
    for name, x in rows.items():
        q, scale = fp8.quantize(x)
        assert stored[name].dtype == torch.float8_e4m3fn
        assert torch.equal(stored[name].float(), q.float()) and torch.equal(stored[name + "_scale"], scale)
        assert torch.equal(got[name], fp8.roundtrip(x))
    # One byte a number and 4 a block of 128 (here one block per head row), for every layer.
    per_slot = sum(2 * (G * d + 4 * G) + (d_i + 4 if cfg.has_indexer(i) else 0) for i in range(cfg.num_hidden_layers))
    assert cache.nbytes() == per_slot * 2 * 6
    plain = GQACache(cfg, 2, 8)
    plain.begin(2, 6, None)
    plain.update(layer, rows["k"], rows["v"], rows["k_index"], 0)
    plain.commit(6)
    assert cache.nbytes() < plain.nbytes() / 2


class RoundTripCache(GQACache):
    """The float reference of the FP8 cache: rows rounded through FP8 and stored in float32."""

    def update(self, layer, k, v, k_index, start):
        k_index = None if k_index is None else fp8.roundtrip(k_index)
        return super().update(layer, fp8.roundtrip(k), fp8.roundtrip(v), k_index, start)


def test_fp8_cache_decode_equals_its_float_reference():
    model = retrofitted(seed=6)
    ids, mask = _batch()
    opts = AttentionOptions(topk=4)
    real = mask.bool()
    stored = _decode(model, ids, mask, model.new_cache(2, 15, fp8=True), opts)[real]
    reference = _decode(model, ids, mask, RoundTripCache(model.config, 2, 15), opts)[real]
    exact = _decode(model, ids, mask, model.new_cache(2, 15), opts)[real]
    torch.testing.assert_close(stored, reference, atol=1e-6, rtol=0)
    assert (stored - exact).abs().max() > 1e-3                     # the rounding is really there
    res = generate(model, [[5, 9, 11, 3], [4, 40]], max_new_tokens=4, temperature=0.0, attention=opts,
                   stop_tokens=[], fp8_cache=True)
    assert res.tokens.shape == (2, 4)


def test_sliding_window_decode_equals_full_forward():
    """Mistral-style sliding window (dense attention, no indexer) through the cache."""
    from dsv32.model.gqa import GQAForCausalLM
    from tests.conftest import randomize_
    from tests.model.test_gqa_indexer import dense_config
    model = randomize_(GQAForCausalLM(dense_config(model_type="mistral", rope_scaling=None, sliding_window=4,
                                                   layer_types=("sliding_attention",) * 3)), seed=3).eval()
    ids = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        full = model(ids, mask).logits
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :5], mask[:, :5], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
        no_window = GQAForCausalLM(model.config.replace(sliding_window=None, layer_types=()))
        no_window.load_state_dict(model.state_dict())
        unwindowed = no_window.eval()(ids, mask).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert (unwindowed[real] - full[real]).abs().max() > 1e-3            # the window really masks
