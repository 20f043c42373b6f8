"""One attention layer's prefill: dsv32 sparse (indexer + top-k gather attention) against dense
causal attention with the same weights, at the V3.2 attention dims.

    python benchmarks/bench_attention.py                 # T = 4K, 8K, 16K; H = 16, 128; k = 512, 2048
    python benchmarks/bench_attention.py --long          # adds T = 32K
    python benchmarks/bench_attention.py --T 2048 --heads 16 --topk 512   # a quick look
    python benchmarks/bench_attention.py --T 16384 --heads 128 --sparse-only --cpu-time   # the kernel alone

--cpu-time runs every child on one thread and times it on that thread's CPU clock
(time.thread_time), the matmul peak too: wall time with two threads on a shared machine is
mostly the neighbours' load. --sparse-only skips the dense baseline (minutes at T=16K, H=128)
and prints the sparse rows only; --repeats runs each sparse child that many times and reports
the medians. Two fp32 matmul peaks are printed: torch.mm's (MKL; the one '% peak' refers to)
and oneDNN's, which on AMD processors is up to ~2x higher because MKL runs its AVX2 code
there; the kernel uses oneDNN at many heads (kernels/torch_sparse.py), so both are shown.

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
import statistics
import subprocess
import sys
import time

import torch

from common import (D_I, D_N, D_R, D_V, H_I, R_KV, build_layer, matmul_peak, onednn_matmul_peak, peak_bytes,
                    rss_bytes)


def flops(T: int, H: int, k: int) -> dict[str, float]:
    pairs = T * (T + 1) / 2
    kept = sum(min(k, t + 1) for t in range(T))
    return {"dense": 2 * H * pairs * (D_N + D_R + D_V),
            "dense_absorbed": 2 * H * pairs * (2 * R_KV + D_R),
            "sparse": 2 * H * kept * (2 * R_KV + D_R),
            "indexer": 2 * pairs * H_I * (D_I + 1)}


clock = time.perf_counter          # --cpu-time: time.thread_time (one thread; ignores time descheduled)


def timed(fn):
    t = clock()
    out = fn()
    return out, clock() - t


class _Stopwatch:
    """Adds up the time spent in one function (the benchmark wraps the kernel and the selection
    to split a layer call into its parts without copying the layer's code)."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name, self.total = owner, name, 0.0
        self.inner = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        t = clock()
        out = self.inner(*args, **kwargs)
        self.total += clock() - t
        return out


@torch.no_grad()
def run_one(T: int, H: int, what: str, hidden: int) -> dict:
    """Child process: one layer call, `what` = "dense:expanded", "dense:absorbed" or "sparse:K".
    Returns the timings of its parts and the peak memory growth of the call."""
    from dsv32 import kernels
    from dsv32.model.context import AttentionOptions, ForwardContext
    from dsv32.model.rope import RotaryEmbedding
    path, arg = what.split(":")
    topk = int(arg) if path == "sparse" else 2048
    cfg, layer = build_layer(H, hidden, topk)
    x = torch.randn(1, T, hidden)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(T)[None])
    warm = min(T, 512)                       # warm up the code path on a short prefix
    layer(x[:, :warm], ForwardContext(cos=cos[:, :warm], sin=sin[:, :warm], key_valid=None, q_start=0,
                                      attention=AttentionOptions(sparse=True, form="absorbed", backend="torch",
                                                                 dense_shortcut=False)))
    kernel = _Stopwatch(kernels, "sparse_mla")
    select = _Stopwatch(layer.indexer, "select")
    base = rss_bytes()
    (c_q, q_n, q_r, latent), t_proj = timed(lambda: layer.project(x, cos, sin))
    ctx = ForwardContext(cos=cos, sin=sin, key_valid=None, q_start=0,
                         attention=AttentionOptions(sparse=path == "sparse", form="absorbed"))
    result = {"T": T, "H": H, "what": what}
    if path == "dense":
        fn = layer._dense_expanded if arg == "expanded" else layer._dense_absorbed
        out, t_core = timed(lambda: fn(q_n, q_r, latent, ctx))
        result.update(core=t_core)
    else:
        (q_i, w_i, k_i), t_qk = timed(lambda: (*layer.indexer.queries(x, c_q, cos, sin), layer.indexer.keys(x, cos, sin)))
        out, t_core = timed(lambda: layer._sparse_absorbed(q_n, q_r, latent, layer.indexer.select(q_i, w_i, k_i),
                                                           "torch"))
        result.update(index=t_qk + select.total, attention=t_core - select.total, kernel=kernel.total)
    _, t_o = timed(lambda: layer.o_proj(out.reshape(1, T, -1)))
    result.update(proj=t_proj + t_o, peak=peak_bytes() - base)
    return result


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if spec.get("cpu_time"):
        global clock
        clock = time.thread_time
        torch.set_num_threads(1)
    print(json.dumps(run_one(spec["T"], spec["H"], spec["what"], spec["hidden"])))


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child failed for {spec}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sparse(spec: dict, repeats: int) -> dict:
    """The sparse child `repeats` times; the median of each timing, the largest peak memory."""
    runs = [run_child(spec) for _ in range(repeats)]
    med = {key: statistics.median(r[key] for r in runs) for key in ("index", "attention", "kernel", "proj")}
    return {**runs[0], **med, "peak": max(r["peak"] for r in runs)}


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def share(gflops: float, peak: float | None) -> str:
    return f"{gflops / peak:4.0%}" if peak else " n/a"


def sparse_table(args, Ts: list[int], peak: float, dnn_peak: float | None) -> None:
    """--sparse-only: the sparse rows alone (indexer, attention, and the gather-attention kernel).
    Both peaks are measured again before each row and the higher of the run's readings is used:
    a neighbour's burst of memory traffic can lower one reading by a quarter."""
    header = ("|     T |   H |    k | sparse s (index + attention) | kernel s | kernel GFLOP/s (% peak) | "
              "% oneDNN peak | peaks GFLOP/s (mm / oneDNN) | index GFLOP/s | sparse mem GiB |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for H in args.heads:
        for T in Ts:
            for k in args.topk:
                peak = max(peak, matmul_peak(clock=clock))
                dnn_peak = max(dnn_peak or 0.0, onednn_matmul_peak(clock=clock) or 0.0) or None
                s = run_sparse({"T": T, "H": H, "what": f"sparse:{k}", "hidden": args.hidden,
                                "cpu_time": args.cpu_time}, args.repeats)
                f = flops(T, H, k)
                kernel = f["sparse"] / s["kernel"] / 1e9
                peaks = f"{peak:.1f} / {dnn_peak:.1f}" if dnn_peak else f"{peak:.1f} / n/a"
                print(f"| {T:5d} | {H:3d} | {k:4d} | {s['index'] + s['attention']:7.2f} ({s['index']:6.2f} + "
                      f"{s['attention']:6.2f}) | {s['kernel']:8.2f} | {kernel:9.1f} ({kernel / peak:4.0%}) | "
                      f"{share(kernel, dnn_peak):>13} | {peaks:>27} | {f['indexer'] / s['index'] / 1e9:13.1f} | "
                      f"{gib(s['peak']):>14} |", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument("--long", action="store_true", help="also run T = 32768")
    ap.add_argument("--heads", type=int, nargs="*", default=[16, 128])
    ap.add_argument("--topk", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread per child, timed on its CPU clock (steadier on a loaded machine)")
    ap.add_argument("--sparse-only", action="store_true", help="skip the dense baseline: the sparse rows only")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each sparse child (medians reported)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    Ts = sorted(set(args.T + ([32768] if args.long else [])))
    if args.cpu_time:
        global clock
        clock = time.thread_time
        torch.set_num_threads(1)

    peak, dnn_peak = matmul_peak(clock=clock), onednn_matmul_peak(clock=clock)
    print(f"fp32 matmul peak (2048^3, {torch.get_num_threads()} threads, {'thread CPU' if args.cpu_time else 'wall'} "
          f"time): {peak:.1f} GFLOP/s torch.mm (MKL), "
          f"{f'{dnn_peak:.1f} GFLOP/s' if dnn_peak else 'n/a'} oneDNN; '% peak' is of the torch.mm one")
    print(f"torch {torch.__version__}; dims r_kv={R_KV} d_r={D_R} d_n={D_N} d_v={D_V} H_I={H_I} d_I={D_I}; "
          f"hidden {args.hidden}\n")
    if args.sparse_only:
        return sparse_table(args, Ts, peak, dnn_peak)
    header = ("|     T |   H |    k | dense s | sparse s (index + attention) | bound | speedup | share | "
              "kernel GFLOP/s (% peak) | % oneDNN peak | index GFLOP/s | dense mem GiB | sparse mem GiB |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    mems: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for H in args.heads:
        dense_form = None
        for T in Ts:
            if dense_form is None:     # measure both dense forms once per head count, keep the faster
                both = {f: run_child({"T": T, "H": H, "what": f"dense:{f}", "hidden": args.hidden,
                                      "cpu_time": args.cpu_time})
                        for f in ("expanded", "absorbed")}
                dense_form = min(both, key=lambda f: both[f]["core"])
                for f, d in both.items():
                    print(f"|  (H={H}, T={T}: dense {f} {d['core']:.2f} s{' <- baseline' if f == dense_form else ''})")
                d = both[dense_form]
            else:
                d = run_child({"T": T, "H": H, "what": f"dense:{dense_form}", "hidden": args.hidden,
                               "cpu_time": args.cpu_time})
            for k in args.topk:
                s = run_sparse({"T": T, "H": H, "what": f"sparse:{k}", "hidden": args.hidden,
                                "cpu_time": args.cpu_time}, args.repeats)
                f = flops(T, H, k)
                bound = f["dense"] / (f["sparse"] + f["indexer"])
                sparse_time = s["index"] + s["attention"]
                speedup = d["core"] / sparse_time
                kernel = f["sparse"] / s["kernel"] / 1e9
                print(f"| {T:5d} | {H:3d} | {k:4d} | {d['core']:7.2f} | {sparse_time:7.2f} ({s['index']:6.2f} + "
                      f"{s['attention']:6.2f}) | {bound:5.2f} | {speedup:7.2f} | {speedup / bound:5.0%} | "
                      f"{kernel:9.1f} ({kernel / peak:4.0%}) | {share(kernel, dnn_peak):>13} | "
                      f"{f['indexer'] / s['index'] / 1e9:13.1f} | {gib(d['peak']):>13} | {gib(s['peak']):>14} |", flush=True)
                mems.setdefault((H, k), []).append((T, s["peak"]))
    print("\ntimes exclude the projections that both paths share (q, kv, o); the sparse attention part includes "
          "the absorption of W_uk / W_uv, the kernel GFLOP/s counts the gather-attention kernel alone; memory is "
          "the peak RSS growth of the layer call, each path in its own process.")
    for (H, k), rows in mems.items():
        if len(rows) >= 2:
            (t0, m0), (t1, m1) = rows[0], rows[-1]
            print(f"H={H} k={k}: sparse peak memory x{m1 / max(m0, 1):.2f} for T x{t1 / t0:.0f}")


if __name__ == "__main__":
    main()
