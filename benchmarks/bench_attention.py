"""One attention layer's prefill: dsv32 sparse (indexer + top-k gather attention) against dense
causal attention with the same weights, at the V3.2 attention dims.

    python benchmarks/bench_attention.py                 # T = 4K, 8K, 16K; H = 16, 128; k = 512, 2048
    python benchmarks/bench_attention.py --long          # adds T = 32K
    python benchmarks/bench_attention.py --T 2048 --heads 16 --topk 512   # a quick look

Dims: r_kv=512, d_r=64, d_n=128, d_v=128, H_I=64, d_I=128, q_lora_rank=1536; hidden size is
reduced (--hidden, default 1024) because only the attention is measured. Float32 on CPU.

Each (T, H) runs in a fresh subprocess so that peak memory (peak RSS over the call minus RSS
before it) is per configuration. Every phase is timed: projections, the indexer (scores +
top-k), the sparse attention kernel (absorb, gather-attend, un-absorb), and, for dense, the
fused SDPA call. The dense baseline is the faster of the expanded form (v zero-padded to
d_qk so the fused CPU kernel applies) and the absorbed form (MQA over [c_kv ; k_r]); both
are measured at the smallest T for each head count and the winner is used above it (the
absorbed form does 3.4x the FLOPs and never wins at these dims).

FLOPs (multiply-adds x 2, causal pairs P = T(T+1)/2):
    dense      2 * H * P * (d_qk + d_v)                 d_qk = d_n + d_r (expanded form)
    sparse     2 * H * sum_t min(k, t+1) * (C + r_kv)   C = r_kv + d_r (absorbed form)
    indexer    2 * P * H_I * (d_I + 1)
The bound is dense / (sparse + indexer); the speedup is the dense attention time over the
indexer-plus-sparse-attention time (projections, identical in both, are shown separately).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import D_I, D_N, D_R, D_V, H_I, R_KV, build_layer, matmul_peak, peak_bytes, rss_bytes


def flops(T: int, H: int, k: int) -> dict[str, float]:
    pairs = T * (T + 1) / 2
    kept = sum(min(k, t + 1) for t in range(T))
    return {"dense": 2 * H * pairs * (D_N + D_R + D_V),
            "dense_absorbed": 2 * H * pairs * (2 * R_KV + D_R),
            "sparse": 2 * H * kept * (2 * R_KV + D_R),
            "indexer": 2 * pairs * H_I * (D_I + 1)}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def run_one(T: int, H: int, topks: list[int], hidden: int, dense_form: str) -> dict:
    """Child process: one (T, H); dense once, sparse for each k. Returns timings and memory."""
    from dsv32.model.context import AttentionOptions, ForwardContext
    from dsv32.model.indexer import select_topk
    from dsv32.model.rope import RotaryEmbedding
    results = {"T": T, "H": H, "dense": {}, "sparse": {}}
    cfg, layer = build_layer(H, hidden, max(topks))
    x = torch.randn(1, T, hidden)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(T)[None])

    def ctx(sparse: bool, form: str) -> ForwardContext:
        return ForwardContext(cos=cos, sin=sin, key_valid=None, q_start=0,
                              attention=AttentionOptions(sparse=sparse, form=form))

    # warm up every code path on a short prefix (allocator, thread pools)
    warm = min(T, 512)
    c_small = ForwardContext(cos=cos[:, :warm], sin=sin[:, :warm], key_valid=None, q_start=0,
                             attention=AttentionOptions(sparse=True, form="absorbed", backend="torch"))
    layer(x[:, :warm], c_small)

    forms = ["expanded", "absorbed"] if dense_form == "both" else [dense_form]
    for form in forms:
        base = rss_bytes()
        (c_q, q_n, q_r, latent), t_proj = timed(lambda: layer.project(x, cos, sin))
        c = ctx(False, form)
        fn = layer._dense_expanded if form == "expanded" else layer._dense_absorbed
        out, t_core = timed(lambda: fn(q_n, q_r, latent, c))
        _, t_o = timed(lambda: layer.o_proj(out.reshape(1, T, -1)))
        results["dense"][form] = {"proj": t_proj + t_o, "core": t_core, "peak": peak_bytes() - base}
        del out, c_q, q_n, q_r, latent

    for k in topks:
        layer.topk = layer.indexer.topk = k
        base = rss_bytes()
        (c_q, q_n, q_r, latent), t_proj = timed(lambda: layer.project(x, cos, sin))

        def index():
            q_i, w_i = layer.indexer.queries(x, c_q, cos, sin)
            k_i = layer.indexer.keys(x, cos, sin)
            return select_topk(q_i, w_i, k_i, k)
        idx, t_index = timed(index)
        c = ctx(True, "absorbed")
        out, t_sparse = timed(lambda: layer._sparse_absorbed(q_n, q_r, latent, c, idx, None, "torch"))
        _, t_o = timed(lambda: layer.o_proj(out.reshape(1, T, -1)))
        results["sparse"][k] = {"proj": t_proj + t_o, "index": t_index, "core": t_sparse,
                                "peak": peak_bytes() - base}
        del out, idx, c_q, q_n, q_r, latent
    return results


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    print(json.dumps(run_one(spec["T"], spec["H"], spec["topks"], spec["hidden"], spec["dense_form"])))


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child failed for {spec}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument("--long", action="store_true", help="also run T = 32768")
    ap.add_argument("--heads", type=int, nargs="*", default=[16, 128])
    ap.add_argument("--topk", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--hidden", type=int, default=1024)
    args = ap.parse_args()
    Ts = sorted(set(args.T + ([32768] if args.long else [])))

    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    print(f"torch {torch.__version__}; dims r_kv={R_KV} d_r={D_R} d_n={D_N} d_v={D_V} H_I={H_I} d_I={D_I}; "
          f"hidden {args.hidden}\n")
    header = ("|     T |   H |    k | dense s | sparse s (idx + attn) | bound | speedup | share | "
              "attn GFLOP/s (% peak) | idx GFLOP/s | dense mem GiB | sparse mem GiB |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for H in args.heads:
        dense_form = "both"
        for T in Ts:
            r = run_child({"T": T, "H": H, "topks": args.topk, "hidden": args.hidden, "dense_form": dense_form})
            if dense_form == "both":
                dense_form = min(r["dense"], key=lambda f: r["dense"][f]["core"])
                for f, d in r["dense"].items():
                    print(f"|  (H={H}, T={T}: dense {f} core {d['core']:.2f} s"
                          f"{' <- baseline' if f == dense_form else ''})")
            d = r["dense"][dense_form]
            for k in args.topk:
                s = r["sparse"][str(k)]
                f = flops(T, H, k)
                bound = f["dense"] / (f["sparse"] + f["indexer"])
                sparse_time = s["index"] + s["core"]
                speedup = d["core"] / sparse_time
                attn_gflops = f["sparse"] / s["core"] / 1e9
                row = (f"| {T:5d} | {H:3d} | {k:4d} | {d['core']:7.2f} | {sparse_time:7.2f} ({s['index']:5.2f} + "
                       f"{s['core']:6.2f}) | {bound:5.2f} | {speedup:7.2f} | {speedup / bound:5.0%} | "
                       f"{attn_gflops:8.1f} ({attn_gflops / peak:4.0%}) | {f['indexer'] / s['index'] / 1e9:11.1f} | "
                       f"{gib(d['peak']):>13} | {gib(s['peak']):>14} |")
                print(row, flush=True)
                rows.append((T, H, k, s["peak"], d["peak"]))
    print("\nprojections (identical in both paths) are excluded from the times above; "
          "memory is peak RSS growth during the layer call.")
    for H in args.heads:
        for k in args.topk:
            mems = [(T, m) for T, h, kk, m, _ in rows if h == H and kk == k]
            if len(mems) >= 2:
                (t0, m0), (t1, m1) = mems[0], mems[-1]
                print(f"H={H} k={k}: sparse peak memory x{m1 / max(m0, 1):.2f} for T x{t1 / t0:.0f}")


if __name__ == "__main__":
    main()
