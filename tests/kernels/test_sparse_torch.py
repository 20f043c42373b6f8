"""The blocked-gather sparse MLA kernel against the dense masked reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv32 import kernels
from dsv32.kernels import torch_sparse


def make(B, T, S, H, C, K, seed, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, C, generator=g, dtype=torch.float64).float()
    kv = torch.randn(B, S, C, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    drop = torch.rand(B, T, K, generator=g) < 0.3
    idx = torch.where(drop, -1, idx)
    if empty_row:
        idx[0, 0] = -1                        # a query with no keys at all
    return q, kv, idx


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), S=st.integers(1, 12), H=st.integers(1, 5),
       seed=st.integers(0, 1000), budget=st.sampled_from([64, 10**9]), min_hk=st.sampled_from([0, 10**9]))
def test_forward_backward_match_reference(B, T, S, H, seed, budget, min_hk):
    """budget 64: one query per block; min_hk 0: the per-query oneDNN forward (where torch has
    oneDNN), 10**9: the blocked one."""
    C, dv = 12, 8
    K = min(S, 5)
    q, kv, idx = make(B, T, S, H, C, K, seed)
    old = torch_sparse._BUDGET_BYTES, torch_sparse._PER_QUERY_MIN_HK
    torch_sparse._BUDGET_BYTES, torch_sparse._PER_QUERY_MIN_HK = budget, min_hk
    try:
        q1, kv1 = q.clone().requires_grad_(), kv.clone().requires_grad_()
        q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out1, lse1 = kernels.sparse_mla(q1, kv1, idx, 0.3, dv, backend="torch")
        out2, lse2 = kernels.sparse_mla(q2, kv2, idx, 0.3, dv, backend="reference")
        torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse1, lse2, atol=1e-5, rtol=1e-5)
        assert (out1[0, 0] == 0).all() and torch.isinf(lse1[0, 0]).all()
        dout = torch.randn_like(out1)
        (out1 * dout).sum().backward()
        (out2 * dout).sum().backward()
        torch.testing.assert_close(q1.grad, q2.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv1.grad, kv2.grad, atol=1e-5, rtol=1e-4)
    finally:
        torch_sparse._BUDGET_BYTES, torch_sparse._PER_QUERY_MIN_HK = old


needs_onednn = pytest.mark.skipif(torch_sparse._onednn_inner() is None, reason="this torch build has no oneDNN ops")


@needs_onednn
@pytest.mark.parametrize("path", ["blocked", "per_query"])
@pytest.mark.parametrize("K", [48, 128])
def test_forward_paths_match_reference_at_many_heads(path, K):
    """Both forward paths at a shape where the oneDNN products use their blocked kernels
    (H=32, C=72, dv=64), over a strided cache view: full rows (K=128: one oneDNN shape, no
    masked slots; K=48: rounded up), rows padded at the end (a prefill's first queries), rows
    padded anywhere, and an empty row."""
    g = torch.Generator().manual_seed(4)
    B, T, S, H, C = 2, 6, 160, 32, 72
    q = torch.randn(B, T, H, C, generator=g)
    buffer = torch.randn(B, 2 * S, C, generator=g)
    kv = buffer[:, :S]                                        # (B, S, C) view with a batch stride of 2S
    idx = torch.argsort(torch.rand(B, T, S, generator=g), dim=-1)[..., :K]
    idx[0, 1, 5:] = -1                                        # padded at the end
    idx[1, 2, torch.rand(K, generator=g) < 0.5] = -1          # padded anywhere
    idx[0, 0] = -1                                            # empty
    ref, ref_lse = kernels.sparse_mla_reference(q, kv.contiguous(), idx, 0.1, 64)
    out, lse = torch_sparse._forward(q, torch_sparse.unit_stride_rows(kv), idx, 0.1, 64, path)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert (out[0, 0] == 0).all() and torch.isinf(lse[0, 0]).all()


@needs_onednn
def test_the_per_query_path_is_chosen_for_many_heads_on_cpu():
    q = torch.zeros(1, 1, 128, 8)
    assert torch_sparse._choose_path(q, 512) == "per_query"          # H * K = 65536
    assert torch_sparse._choose_path(q[:, :, :16], 512) == "blocked"  # 8192
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        assert torch_sparse._choose_path(q, 512) == "blocked"
    finally:
        torch.backends.mkldnn.enabled = before


def test_unknown_forward_path():
    q, kv, idx = make(1, 2, 4, 1, 4, 2, seed=0)
    with pytest.raises(ValueError, match="unknown sparse forward path 'fast'"):
        torch_sparse._forward(q, kv, idx, 0.1, 2, "fast")


def test_gradcheck_double():
    q, kv, idx = make(1, 3, 6, 2, 5, 4, seed=1, empty_row=False)
    q, kv = q.double().requires_grad_(), kv.double().requires_grad_()
    fn = lambda a, b: torch_sparse._SparseMLA.apply(a, b, idx, 0.7, 3)[0]  # noqa: E731
    # The kernel computes in float32; compare its Jacobian loosely against finite differences.
    assert torch.autograd.gradcheck(fn, (q, kv), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_bf16_inputs_compute_in_float32():
    q, kv, idx = make(1, 4, 8, 2, 12, 5, seed=2)
    out, _ = kernels.sparse_mla(q.bfloat16(), kv.bfloat16(), idx, 0.3, 8, backend="torch")
    ref, _ = kernels.sparse_mla(q.bfloat16().float(), kv.bfloat16().float(), idx, 0.3, 8, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown sparse attention backend"):
        kernels.resolve_backend("cuda-magic", torch.device("cpu"))


def test_inference_reads_a_strided_cache_view():
    """kv as a view of a larger preallocated cache (B > 1, so not contiguous) gives the same
    result as a contiguous copy."""
    g = torch.Generator().manual_seed(5)
    q, buffer = torch.randn(3, 1, 4, 28, generator=g), torch.randn(3, 64, 28, generator=g)
    view = buffer[:, :40]
    assert not view.is_contiguous()
    idx = torch.argsort(torch.rand(3, 1, 40, generator=g), dim=-1)[..., :12]
    with torch.no_grad():
        out, lse = torch_sparse.sparse_mla_torch(q, view, idx, 0.2, 20)
        ref, ref_lse = kernels.sparse_mla_reference(q, view.contiguous(), idx, 0.2, 20)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [1, 10**9])         # 1: one query per chunk; 10**9: one chunk
def test_absorbed_chunks_equal_one_call_and_reference(budget):
    """absorb -> attend -> un-absorb: the chunked inference strategy (reused buffers), the
    whole-sequence autograd strategy and the reference backend give the same output."""
    from dsv32.kernels import absorbed
    g = torch.Generator().manual_seed(0)
    B, T, S, H, d_n, d_r, r, d_v, K = 2, 7, 11, 3, 5, 4, 6, 5, 4
    q_n, q_r = torch.randn(B, T, H, d_n, generator=g), torch.randn(B, T, H, d_r, generator=g)
    kv = torch.randn(B, S, r + d_r, generator=g)
    w_uk, w_uv = torch.randn(H, d_n, r, generator=g), torch.randn(H, d_v, r, generator=g)
    _, _, idx = make(B, T, S, H, r + d_r, K, seed=1)
    old = absorbed._CHUNK_BUDGET_BYTES
    absorbed._CHUNK_BUDGET_BYTES = budget
    try:
        with torch.no_grad():
            chunks = kernels.sparse_mla_absorbed(q_n, q_r, kv, idx, w_uk, w_uv, 0.3, backend="torch")
        whole = kernels.sparse_mla_absorbed(q_n.requires_grad_(), q_r, kv, idx, w_uk, w_uv, 0.3, backend="torch")
        ref = kernels.sparse_mla_absorbed(q_n, q_r, kv, idx, w_uk, w_uv, 0.3, backend="reference")
    finally:
        absorbed._CHUNK_BUDGET_BYTES = old
    assert whole.requires_grad and chunks.shape == (B, T, H, d_v)
    torch.testing.assert_close(chunks, whole.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunks, ref.detach(), atol=1e-5, rtol=1e-5)
