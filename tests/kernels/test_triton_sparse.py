"""Triton sparse MLA (forward, backward, split-K decode) against the plain-torch references.

Without a GPU the kernels run under the Triton interpreter on CPU (float32 and float16; the
interpreter mishandles bfloat16). With a GPU the same tests run compiled on CUDA instead: the
interpreter is a process-wide switch read when the kernels are defined, so one process tests
one mode. Shapes are tiny except one case at the real row width (C = 576, Dv = 512).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_env import DEVICE, LOW, TOL   # first: picks the Triton interpreter without a GPU

pytest.importorskip("triton", reason="triton is not installed (pip install dsv32[gpu])")

from dsv32 import kernels  # noqa: E402
from dsv32.kernels import sparse_mla_reference, sparse_mla_torch  # noqa: E402
from dsv32.kernels.triton_sparse import sparse_mla_triton  # noqa: E402


def make_inputs(B, T, H, S, r, dr, K, dtype, seed=0):
    """Random q, kv and indices of distinct slots with holes: K > S leaves a -1 tail, query
    (0, 1) has every other slot empty and the last query of batch 1 has no slot at all."""
    gen = torch.Generator().manual_seed(seed)
    C = r + dr
    q = torch.randn(B, T, H, C, generator=gen)
    kv = torch.randn(B, S, C, generator=gen)
    idx = torch.argsort(torch.rand(B, T, S, generator=gen), dim=-1)[..., :min(K, S)]
    idx = torch.cat((idx, torch.full((B, T, K - idx.shape[-1]), -1, dtype=idx.dtype)), dim=-1)
    if T > 1:
        idx[0, 1, ::2] = -1
    if B > 1:
        idx[1, -1] = -1
    return q.to(DEVICE, dtype), kv.to(DEVICE, dtype), idx.to(DEVICE)


def check_forward(q, kv, idx, dv, num_splits=None):
    scale = q.shape[-1] ** -0.5
    out, lse = sparse_mla_triton(q, kv, idx, scale, dv, num_splits=num_splits)
    ref_out, ref_lse = sparse_mla_reference(q.float(), kv.float(), idx, scale, dv)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, **TOL[q.dtype])
    empty = ~(idx >= 0).any(-1)
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], **TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("H,K", [(6, 10), (16, 37), (3, 70)])
def test_forward_matches_reference(dtype, H, K):
    q, kv, idx = make_inputs(2, 5, H, 48, r=20, dr=8, K=K, dtype=dtype)
    check_forward(q, kv, idx, dv=20)


def test_forward_without_tail_and_int32_indices():
    q, kv, idx = make_inputs(1, 3, 4, 20, r=24, dr=0, K=9, dtype=torch.float32)
    check_forward(q, kv, idx.int(), dv=24)


def test_real_shape_forward_and_backward():
    """H = 128, C = 576 = 512 + 64, Dv = 512: the V3.2 tiles and launch options, on 2 queries."""
    q, kv, idx = make_inputs(1, 2, 128, 96, r=512, dr=64, K=70, dtype=LOW)
    check_forward(q, kv, idx, dv=512)
    q1, kv1 = q.float().clone().requires_grad_(), kv.float().clone().requires_grad_()
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out1, _ = sparse_mla_torch(q1, kv1, idx, 0.05, 512)
    out2, _ = sparse_mla_triton(q2, kv2, idx, 0.05, 512)
    dout = torch.randn(out1.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out1 * dout).sum().backward()
    (out2.float() * dout).sum().backward()
    torch.testing.assert_close(q2.grad.float(), q1.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(kv2.grad.float(), kv1.grad, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_decode_split_k_matches_reference(num_splits):
    """T = 1 with the slots cut into splits; with 8 splits of a 37-slot list some splits are
    dropped and one query has no slot, so the combine sees empty partials."""
    q, kv, idx = make_inputs(2, 1, 6, 64, r=20, dr=8, K=37, dtype=torch.float32)
    idx[0, 0, :32] = -1                       # the first splits of this query are all empty
    check_forward(q, kv, idx, dv=20, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("H,K", [(6, 21), (16, 40)])
def test_backward_matches_torch(dtype, H, K):
    q, kv, idx = make_inputs(2, 4, H, 32, r=20, dr=8, K=K, dtype=dtype, seed=1)
    scale = 0.2
    q1, kv1 = q.float().clone().requires_grad_(), kv.float().clone().requires_grad_()
    out1, _ = sparse_mla_torch(q1, kv1, idx, scale, 20)
    dout = torch.randn(out1.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (out1 * dout).sum().backward()
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out2, _ = sparse_mla_triton(q2, kv2, idx, scale, 20)
    (out2.float() * dout).sum().backward()
    assert q2.grad.dtype == dtype and kv2.grad.dtype == dtype
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out2.float(), out1, **TOL[dtype])
    torch.testing.assert_close(q2.grad.float(), q1.grad, **tol)
    torch.testing.assert_close(kv2.grad.float(), kv1.grad, **tol)
    assert (q2.grad[1, -1] == 0).all()        # the query with no slot gets no gradient


def test_registered_behind_dispatch():
    assert "triton" in kernels._BACKENDS
    assert kernels.resolve_backend("auto", torch.device(DEVICE)) == ("triton" if DEVICE == "cuda" else "torch")
    q, kv, idx = make_inputs(1, 2, 4, 16, r=20, dr=8, K=8, dtype=torch.float32)
    out, lse = kernels.sparse_mla(q, kv, idx, 0.3, 20, backend="triton")
    ref_out, _ = sparse_mla_reference(q, kv, idx, 0.3, 20)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])


@pytest.mark.parametrize("bad", ["dv", "dtype", "kv_shape", "idx_dtype"])
def test_bad_inputs_raise(bad):
    q, kv, idx = make_inputs(1, 2, 4, 16, r=20, dr=8, K=8, dtype=torch.float32)
    dv = 20
    if bad == "dv":
        dv = 29
    elif bad == "dtype":
        kv = kv.half()
    elif bad == "kv_shape":
        kv = kv[..., :-1]
    else:
        idx = idx.float()
    with pytest.raises(ValueError):
        sparse_mla_triton(q, kv, idx, 0.3, dv)


def test_forward_reads_a_strided_cache_view():
    """Decode over a preallocated cache: kv is a (B, S, C) view of a (B, S_max, C) buffer, so
    batch rows are not contiguous with each other; the kernel reads it in place."""
    q, kv, idx = make_inputs(3, 1, 4, 40, r=20, dr=8, K=12, dtype=torch.float32)
    buffer = torch.zeros(3, 64, kv.shape[-1], device=DEVICE)
    buffer[:, :40] = kv
    view = buffer[:, :40]
    assert not view.is_contiguous()
    check_forward(q, view, idx, dv=20)
