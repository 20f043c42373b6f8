"""Per-token decode of one attention layer over a latent cache of L tokens: dsv32 sparse (the
indexer scores the whole cache, the attention gathers only the top-k latent rows) against
dense absorbed decode (attend to every cached row) over the same cache.

    python benchmarks/bench_decode.py                        # L = 1K .. 64K, H = 128, k = 2048
    python benchmarks/bench_decode.py --L 4096 16384 --steps 3
    python benchmarks/bench_decode.py --batch 4 --L 16384 65536   # B sequences decode together

V3.2 attention dims (r_kv=512, d_r=64, H_I=64, d_I=128), 128 heads, hidden reduced (--hidden).
Float32 on CPU, batch 1 unless --batch. Per step and sequence, work that differs between the two paths:

    FLOPs  dense   2 * H * L * (C + r_kv)                         C = r_kv + d_r
           sparse  2 * H * k * (C + r_kv)  +  2 * L * H_I * (d_I + 1)   (attention + indexer)
    bytes  dense   L * C * 4                                      (every latent row)
           sparse  k * C * 4  +  L * d_I * 4                      (gathered rows + indexer keys)

Both bounds are printed (dense / sparse); at these shapes both paths are compute-bound on a
CPU (>= 40 FLOP per byte), so the FLOP bound is the one the speedup is held to. The cache
column is the latent cache of this layer: (r_kv + d_r + d_I) x 4 bytes per token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import D_I, H_I, R_KV, D_R, build_layer, matmul_peak


@torch.no_grad()
def fill_cache(cfg, layer, L: int, extra: int, batch: int = 1):
    from dsv32.inference import StaticLatentCache
    cache = StaticLatentCache(cfg, batch, L + extra)
    C = R_KV + D_R
    g = torch.Generator().manual_seed(0)
    chunk = 8192
    for layer_idx in range(cfg.num_hidden_layers):
        for c0 in range(0, L, chunk):
            n = min(chunk, L - c0)
            cache.begin(batch, n, None)
            cache.update(layer_idx, torch.randn(batch, n, C, generator=g), torch.randn(batch, n, D_I, generator=g), c0)
            cache.commit(n)
    return cache


@torch.no_grad()
def decode_times(cfg, layer, L: int, steps: int, sparse: bool, batch: int = 1) -> tuple[list[float], list[float]]:
    """(layer times, attention times) per decode step. The attention time is what differs between
    the paths: dense = attention over every cached row; sparse = indexer (score the cache, top-k)
    + gather-attention. The rest of the layer (projections, cache write, o_proj) is the same."""
    from dsv32.model.context import AttentionOptions, ForwardContext
    from dsv32.model.rope import RotaryEmbedding
    cache = fill_cache(cfg, layer, L, steps + 1, batch)
    rope = RotaryEmbedding(cfg)
    opts = AttentionOptions(sparse=sparse, form="absorbed")
    layer_times, attn_times = [], []
    for step in range(steps + 1):                        # the first step warms up
        x = torch.randn(batch, 1, cfg.hidden_size)
        cos, sin = rope(torch.tensor([[cache.length]]))
        ctx = ForwardContext(cos=cos, sin=sin, key_valid=None, q_start=cache.length, attention=opts, cache=cache)
        t0 = time.perf_counter()
        cache.begin(batch, 1, None)
        c_q, q_n, q_r, latent = layer.project(x, cos, sin)
        k_new = layer.indexer.keys(x, cos, sin)
        latent_all, k_all = cache.update(0, latent, k_new, ctx.q_start)
        t1 = time.perf_counter()
        if sparse:
            q_i, w_i = layer.indexer.queries(x, c_q, cos, sin)
            idx = layer.indexer.select(q_i, w_i, k_all, ctx.q_start)
            out = layer._sparse_absorbed(q_n, q_r, latent_all, idx, "auto")
        else:
            out = layer._dense_absorbed(q_n, q_r, latent_all, ctx)
        t2 = time.perf_counter()
        layer.o_proj(out.reshape(batch, 1, -1))
        cache.commit(1)
        t3 = time.perf_counter()
        layer_times.append(t3 - t0)
        attn_times.append(t2 - t1)
    return layer_times[1:], attn_times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, nargs="*", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together, each with its own cache")
    args = ap.parse_args()
    H, k = args.heads, args.topk
    C = R_KV + D_R
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one layer, H={H}, k={k}, r_kv={R_KV}, d_r={D_R}, H_I={H_I}, d_I={D_I}, batch {args.batch}; "
          f"median of {args.steps} steps; times are per step (all {args.batch} sequences)\n")
    header = ("|     L | dense ms | sparse ms (idx+attn) | FLOP bound | byte bound | speedup | share of FLOP bound | "
              "layer ms dense / sparse | cache MiB |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    cfg, layer = build_layer(H, args.hidden, k)
    for L in args.L:
        dense_layer, dense_attn = decode_times(cfg, layer, L, args.steps, sparse=False, batch=args.batch)
        sparse_layer, sparse_attn = decode_times(cfg, layer, L, args.steps, sparse=True, batch=args.batch)
        dense, sparse = statistics.median(dense_attn), statistics.median(sparse_attn)
        keff = min(k, L)
        f_dense = 2 * H * L * (C + R_KV)
        f_sparse = 2 * H * keff * (C + R_KV) + 2 * L * H_I * (D_I + 1)
        b_dense = L * C * 4
        b_sparse = keff * C * 4 + L * D_I * 4
        bound = f_dense / f_sparse
        speedup = dense / sparse
        cache_mib = args.batch * L * (R_KV + D_R + D_I) * 4 / 2**20
        print(f"| {L:5d} | {dense * 1e3:8.2f} | {sparse * 1e3:20.2f} | {bound:10.2f} | {b_dense / b_sparse:10.2f} | "
              f"{speedup:7.2f} | {speedup / bound:19.0%} | {statistics.median(dense_layer) * 1e3:9.1f} / "
              f"{statistics.median(sparse_layer) * 1e3:9.1f} | {cache_mib:9.1f} |", flush=True)
    print("\ndense/sparse ms: the attention part of a decode step (sparse: indexer over the whole cache + "
          "gather-attention over k rows); layer ms adds the projections and o_proj, identical in both.")


if __name__ == "__main__":
    main()
