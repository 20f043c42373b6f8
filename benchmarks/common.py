"""Shared pieces of the benchmark scripts: one MLA layer at the V3.2 attention dims, the fp32
matmul peak, and memory readings."""

from __future__ import annotations

import os
import resource
import time

import torch

from dsv32.kernels.onednn import onednn_op

R_KV, D_R, D_N, D_V, H_I, D_I, R_Q = 512, 64, 128, 128, 64, 128, 1536


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak(n: int = 2048, reps: int = 5, clock=time.perf_counter) -> float:
    """fp32 GFLOP/s of an n^3 matmul, best of `reps`, timed on `clock` (time.thread_time for a
    one-thread CPU-time measurement)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n ** 3 / best / 1e9


def onednn_matmul_peak(n: int = 2048, reps: int = 5, clock=time.perf_counter) -> float | None:
    """fp32 GFLOP/s of an n^3 product through oneDNN (the inner-product op torch's CPU compiler
    calls), best of `reps`; None where this torch build has no oneDNN. On AMD processors MKL
    (torch.mm) runs its AVX2 code and oneDNN its AVX-512 code, so this can be ~2x `matmul_peak`."""
    inner = onednn_op()
    if inner is None:
        return None
    a, b = torch.randn(n, n), torch.randn(n, n)
    inner(a, b, None, "none", [], "")
    best = float("inf")
    for _ in range(reps):
        t = clock()
        inner(a, b, None, "none", [], "")
        best = min(best, clock() - t)
    return 2 * n ** 3 / best / 1e9


def build_layer(heads: int, hidden: int, topk: int, max_positions: int = 1 << 17):
    """An MLA layer (with its indexer) at the V3.2 attention dims, N(0, 0.02) weights."""
    from dsv32 import ModelConfig
    from dsv32.model.attention import MLA
    cfg = ModelConfig(hidden_size=hidden, num_attention_heads=heads, q_lora_rank=R_Q, kv_lora_rank=R_KV,
                      qk_nope_head_dim=D_N, qk_rope_head_dim=D_R, v_head_dim=D_V, index_n_heads=H_I,
                      index_head_dim=D_I, index_topk=topk, num_hidden_layers=1, vocab_size=256,
                      max_position_embeddings=max_positions, dtype="float32", intermediate_size=256,
                      moe_intermediate_size=64, n_routed_experts=8, n_group=1, topk_group=1,
                      num_experts_per_tok=2, first_k_dense_replace=1)
    torch.manual_seed(0)
    layer = MLA(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return cfg, layer
