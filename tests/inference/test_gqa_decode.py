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
