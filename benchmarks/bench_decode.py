"""Per-token decode of one attention layer over a latent cache of L tokens: dsv32 sparse (the
indexer scores the whole cache, the attention gathers only the top-k latent rows) against
dense absorbed decode (attend to every cached row) over the same cache.

    python benchmarks/bench_decode.py                        # L = 1K .. 64K, H = 128, k = 2048
    python benchmarks/bench_decode.py --L 4096 16384 --steps 3
    python benchmarks/bench_decode.py --batch 4 --L 16384 65536   # B sequences decode together
    python benchmarks/bench_decode.py --L 65536 --parts            # + a roofline of each sparse part
    python benchmarks/bench_decode.py --L 16384 65536 --parts --cpu-time   # one thread, its CPU clock
    python benchmarks/bench_decode.py --layout row                # weights as loaded, no decode_layout

V3.2 attention dims (r_kv=512, d_r=64, H_I=64, d_I=128), 128 heads, hidden reduced (--hidden).
Float32 on CPU, batch 1 unless --batch. Per step and sequence, work that differs between the two paths:

    FLOPs  dense   2 * H * L * (C + r_kv)                         C = r_kv + d_r
           sparse  2 * H * k * (C + r_kv)  +  2 * L * H_I * (d_I + 1)   (attention + indexer)
    bytes  dense   L * C * 4                                      (every latent row)
           sparse  k * C * 4  +  L * d_I * 4                      (gathered rows + indexer keys)

The layer's linear weights are stored column-major first (`dsv32.inference.decode_layout`, as
the CLI's generate does): one-row products read them faster; `--layout row` keeps them as built.

Both bounds are printed (dense / sparse); at these shapes both paths are compute-bound on a
CPU (>= 40 FLOP per byte), so the FLOP bound is the one the speedup is held to. The cache
column is the latent cache of this layer: (r_kv + d_r + d_I) x 4 bytes per token.

--parts times each part of a sparse step one by one at every L (batch 1) and holds it to its own
limit, max(FLOPs / matmul peak, bytes / read bandwidth), both measured here (the peak: the faster
of torch.mm and oneDNN on a 2048^3 product):

    indexer q-proj   FLOPs 2 * (r_q * H_I * d_I + hidden * H_I)   bytes: wq_b + weights_proj
    scores           FLOPs 2 * L * H_I * (d_I + 1)                bytes: L * d_I * 4 (the keys)
    top-k            (mask, order codes, topk over L scores)     bytes: L * 4 (read once)
    absorb + attend  FLOPs 2 * H * (d_n * r_kv + k * (C + r_kv) + r_kv * d_v)
                     bytes: W_uk + W_uv (H * r_kv * (d_n + d_v) * 4) + k * C * 4 (gathered rows)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import D_I, D_N, D_V, H_I, R_KV, D_R, build_layer, matmul_peak, onednn_matmul_peak

clock = time.perf_counter          # --cpu-time: time.thread_time (one thread; ignores time descheduled)


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
        t0 = clock()
        cache.begin(batch, 1, None)
        c_q, q_n, q_r, latent = layer.project(x, cos, sin)
        k_new = layer.indexer.keys(x, cos, sin)
        latent_all, k_all = cache.update(0, latent, k_new, ctx.q_start)
        t1 = clock()
        if sparse:
            q_i, w_i = layer.indexer.queries(x, c_q, cos, sin)
            idx = layer.indexer.select(q_i, w_i, k_all, ctx.q_start)
            out = layer._sparse_absorbed(q_n, q_r, latent_all, idx, "auto")
        else:
            out = layer._dense_absorbed(q_n, q_r, latent_all, ctx)
        t2 = clock()
        layer.o_proj(out.reshape(batch, 1, -1))
        cache.commit(1)
        t3 = clock()
        layer_times.append(t3 - t0)
        attn_times.append(t2 - t1)
    return layer_times[1:], attn_times[1:]


def read_bandwidth(n_bytes: int = 512 * 2**20, reps: int = 5) -> float:
    """GB/s of one read pass (a sum) over a buffer far larger than the caches, best of `reps`."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = clock()
        x.sum()
        best = min(best, clock() - t)
    return n_bytes / best / 1e9


@torch.no_grad()
def part_times(cfg, layer, L: int, steps: int) -> dict[str, float]:
    """Median seconds of each part of a sparse decode step at batch 1, each timed on its own."""
    from dsv32.kernels.reference import allowed_keys
    from dsv32.kernels.torch_indexer import index_scores_tiled, order_codes, topk_ordered
    from dsv32.model.rope import RotaryEmbedding
    cache = fill_cache(cfg, layer, L, 2)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(1, 1, cfg.hidden_size)
    cos, sin = rope(torch.tensor([[L]]))
    cache.begin(1, 1, None)
    c_q, q_n, q_r, latent = layer.project(x, cos, sin)
    latent_all, k_all = cache.update(0, latent, layer.indexer.keys(x, cos, sin), L)
    q_i, w_i = layer.indexer.queries(x, c_q, cos, sin)
    idx = layer.indexer.select(q_i, w_i, k_all, L)
    scores, slots, n_keys = index_scores_tiled(q_i, w_i, k_all), torch.arange(L + 1), L + 1

    def topk():                                        # what select does after scoring (no window/sink)
        masked = scores.masked_fill(~allowed_keys(n_keys, torch.tensor([L]), None), float("-inf"))
        return topk_ordered(order_codes(masked, slots), min(cfg.index_topk, n_keys))

    parts = {
        "indexer q-proj": lambda: layer.indexer.queries(x, c_q, cos, sin),
        "scores": lambda: index_scores_tiled(q_i, w_i, k_all),
        "top-k": topk,
        "scores + top-k": lambda: layer.indexer.select(q_i, w_i, k_all, L),
        "absorb + attend": lambda: layer._sparse_absorbed(q_n, q_r, latent_all, idx, "auto"),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for step in range(steps + 1):                      # the first round warms up
        for name, fn in parts.items():
            t = clock()
            fn()
            if step:
                times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_parts(cfg, layer, L: int, steps: int, H: int, k: int, peak: float, bw: float) -> None:
    C, keff = R_KV + D_R, min(k, L)
    t = part_times(cfg, layer, L, steps)
    work = {                                           # part -> (FLOPs, bytes)
        "indexer q-proj": (2 * (cfg.q_lora_rank * H_I * D_I + cfg.hidden_size * H_I),
                           (cfg.q_lora_rank * H_I * D_I + cfg.hidden_size * H_I) * 4),
        "scores": (2 * L * H_I * (D_I + 1), L * D_I * 4),
        "top-k": (0, L * 4),
        "absorb + attend": (2 * H * (D_N * R_KV + keff * (C + R_KV) + R_KV * D_V),
                            H * R_KV * (D_N + D_V) * 4 + keff * C * 4),
    }
    work["scores + top-k"] = (work["scores"][0], work["scores"][1] + work["top-k"][1])
    print(f"\nparts of a sparse step at L={L} (batch 1, median of {steps}); limit = max(FLOPs / {peak:.0f} "
          f"GFLOP/s, bytes / {bw:.1f} GB/s)\n")
    header = "| part | ms | MFLOP | MB | limit ms | x limit |"
    print(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in ("indexer q-proj", "scores", "top-k", "scores + top-k", "absorb + attend"):
        flops, nbytes = work[name]
        limit = max(flops / (peak * 1e9), nbytes / (bw * 1e9))
        ratio = "n/a" if name == "top-k" else f"{t[name] / limit:.2f}x"    # a selection: no FLOP/byte limit
        print(f"| {name} | {t[name] * 1e3:.2f} | {flops / 1e6:.1f} | {nbytes / 1e6:.1f} | {limit * 1e3:.2f} | "
              f"{ratio} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, nargs="*", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together, each with its own cache")
    ap.add_argument("--parts", action="store_true", help="also time each part of a sparse step against its limit")
    ap.add_argument("--layout", choices=["column", "row"], default="column",
                    help="linear weights column-major (decode_layout, the default) or as built")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time on the thread's CPU clock (sets one thread): steadier on a loaded machine")
    args = ap.parse_args()
    if args.cpu_time:
        global clock
        clock = time.thread_time
        torch.set_num_threads(1)
    H, k = args.heads, args.topk
    C = R_KV + D_R
    # the per-part limits use the higher peak: oneDNN ran ~2x MKL (torch.mm) on the AMD CPUs we measured
    peak_mm, peak_dnn = matmul_peak(clock=clock), onednn_matmul_peak(clock=clock) or 0.0
    peak = max(peak_mm, peak_dnn)
    print(f"fp32 matmul peak: {peak_mm:.1f} GFLOP/s torch.mm, {peak_dnn:.1f} oneDNN; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; "
          f"{'thread CPU' if args.cpu_time else 'wall'} time")
    print(f"one layer, H={H}, k={k}, r_kv={R_KV}, d_r={D_R}, H_I={H_I}, d_I={D_I}, batch {args.batch}; "
          f"median of {args.steps} steps; times are per step (all {args.batch} sequences); "
          f"{args.layout}-major linear weights\n")
    header = ("|     L | dense ms | sparse ms (idx+attn) | FLOP bound | byte bound | speedup | share of FLOP bound | "
              "layer ms dense / sparse | cache MiB |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    cfg, layer = build_layer(H, args.hidden, k)
    if args.layout == "column":
        from dsv32.inference import decode_layout
        decode_layout(layer)
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
    if args.parts:
        bw = read_bandwidth()
        for L in args.L:
            print_parts(cfg, layer, L, args.steps, H, k, peak, bw)
    print("\ndense/sparse ms: the attention part of a decode step (sparse: indexer over the whole cache + "
          "gather-attention over k rows); layer ms adds the projections and o_proj, identical in both.")


if __name__ == "__main__":
    main()
