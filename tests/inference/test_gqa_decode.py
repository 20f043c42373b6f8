"""Decoding the retrofitted GQA model over its K/V + indexer-key cache: prefill then one token at
a time equals one full forward (sparse, k small enough that selection drops keys, left padding
included), and `dsv32.inference.generate` runs it and reproduces greedy argmax of full forwards."""

from __future__ import annotations

import pytest
import torch

from dsv32 import AttentionOptions
from dsv32.inference.generate import generate
from tests.model.test_gqa_sparse import retrofitted


def test_incremental_decode_equals_full_forward():
    model = retrofitted(seed=6)
    ids = torch.randint(0, 53, (2, 15), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, :3] = 0
    opts = AttentionOptions(topk=4)
    with torch.no_grad():
        full = model(ids, mask, attention=opts).logits
        cache = model.new_cache(2, 15)
        steps = [model(ids[:, :8], mask[:, :8], cache=cache, attention=opts).logits]
        for t in range(8, 15):
            steps.append(model(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache, attention=opts).logits)
    inc = torch.cat(steps, dim=1)
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


def test_fp8_cache_is_refused():
    with pytest.raises(ValueError, match="fp8_cache is not supported for dense GQA"):
        retrofitted().new_cache(1, 8, fp8=True)


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
