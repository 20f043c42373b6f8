"""Triton sparse GQA (forward, backward) against the plain-torch reference. Without a GPU the
kernels run under the Triton interpreter on CPU (tiny shapes, float32 and float16); with one the
same tests run compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_env import DEVICE, LOW, TOL   # first: picks the Triton interpreter without a GPU

pytest.importorskip("triton", reason="triton is not installed (pip install dsv32[gpu])")

from dsv32.kernels import sparse_gqa_reference  # noqa: E402
from dsv32.kernels.sparse_gqa_triton import sparse_gqa_triton  # noqa: E402
from tests.kernels.test_sparse_gqa import make_inputs  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("H,G,K,d,dv", [(4, 2, 10, 8, 8), (6, 1, 37, 12, 20), (2, 2, 5, 16, 16)])
def test_forward_matches_reference(dtype, H, G, K, d, dv):
    q, k, v, idx = (t.to(DEVICE) for t in make_inputs(2, 4, H, G, 40, d, dv, K, dtype=dtype))
    out, lse = sparse_gqa_triton(q, k, v, idx, 0.25)
    ref, ref_lse = sparse_gqa_reference(q.float(), k.float(), v.float(), idx, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    empty = ~(idx >= 0).any(-1)
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], **TOL[dtype])


@pytest.mark.parametrize("H,G,K", [(4, 2, 10), (3, 1, 21)])
def test_backward_matches_reference(H, G, K):
    q, k, v, idx = (t.to(DEVICE) for t in make_inputs(2, 3, H, G, 30, 8, 12, K, seed=2))
    dout = torch.randn(2, 3, H, 12, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = []
    for fn in (sparse_gqa_reference, sparse_gqa_triton):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = fn(*leaves, idx, 0.3)
        (out * dout).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b, name in zip(grads[1], grads[0], ("dq", "dk", "dv")):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
