"""Sparse GQA attention (kernels.sparse_gqa): the blocked torch path against the dense masked
reference, forward and backward, at several head/group layouts; with every causal slot selected
it equals dense causal GQA attention; the dispatch and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv32 import kernels
from dsv32.kernels import sparse_gqa_reference, sparse_gqa_torch
from dsv32.kernels import torch_gqa as gqa_module


def make_inputs(B, T, H, G, S, d, dv, K, seed=0, dtype=torch.float32):
    """Random q/k/v and distinct slots with holes: K > S leaves a -1 tail, query (0, 1) has every
    other slot empty and the last query of batch 1 has none."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=gen)
    k = torch.randn(B, S, G, d, generator=gen)
    v = torch.randn(B, S, G, dv, generator=gen)
    idx = torch.argsort(torch.rand(B, T, S, generator=gen), dim=-1)[..., : min(K, S)]
    idx = torch.cat((idx, torch.full((B, T, K - idx.shape[-1]), -1, dtype=idx.dtype)), dim=-1)
    idx[0, 1, ::2] = -1
    if B > 1:
        idx[1, -1] = -1
    return q.to(dtype), k.to(dtype), v.to(dtype), idx


@pytest.mark.parametrize("H,G,K", [(4, 2, 7), (6, 1, 20), (3, 3, 30), (8, 2, 1)])
def test_torch_matches_reference_forward_and_backward(H, G, K, monkeypatch):
    monkeypatch.setattr(gqa_module, "_BUDGET_BYTES", 4096)       # several query blocks
    q, k, v, idx = make_inputs(2, 6, H, G, 24, 8, 6, K)
    dout = torch.randn(2, 6, H, 6, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (sparse_gqa_reference, sparse_gqa_torch):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, idx, 0.3)
        (out * dout).sum().backward()
        grads.append((out.detach(), lse, *[t.grad for t in leaves]))
    empty = ~(idx >= 0).any(-1)
    assert torch.isneginf(grads[1][1][empty]).all() and (grads[1][0][empty] == 0).all()
    for a, b, name in zip(grads[1], grads[0], ("out", "lse", "dq", "dk", "dv")):
        if name == "lse":
            a, b = a[~empty], b[~empty]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_all_causal_slots_equal_dense_gqa(backend):
    B, T, H, G, d = 2, 9, 6, 2, 8
    q, k, v, _ = make_inputs(B, T, H, G, T, d, d, 1, seed=3)
    slots = torch.arange(T)
    idx = torch.where(slots[None, :] <= slots[:, None], slots[None, :], -1).expand(B, T, T)   # k >= length
    out, _ = kernels.sparse_gqa(q, k, v, idx, d ** -0.5, backend=backend)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


def test_bad_shapes_and_backend_are_clear_errors():
    q, k, v, idx = make_inputs(1, 3, 4, 3, 5, 8, 8, 2)
    with pytest.raises(ValueError, match="multiple of kv groups"):
        sparse_gqa_torch(q, k, v, idx, 1.0)
    q, k, v, idx = make_inputs(1, 3, 4, 2, 5, 8, 8, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse_gqa_torch(q, k[..., :4], v, idx, 1.0)
    with pytest.raises(ValueError, match="unknown sparse GQA attention backend 'cuda'"):
        kernels.sparse_gqa(q, k, v, idx, 1.0, backend="cuda")
