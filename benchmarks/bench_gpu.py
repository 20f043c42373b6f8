"""GPU benchmark of the Triton kernels at the V3.2 attention shape, against dense flash attention.

    python benchmarks/bench_gpu.py                          # T = 8K, 16K, 32K, 64K (one H100/H200, < 8 min)
    python benchmarks/bench_gpu.py --seq-lens 4096 --decode-batch 2  # a quick look

Rows, each at T in --seq-lens (B = 1 for prefill; decode = --decode-batch sequences, one new
token each over a context of T):

    sparse fwd / fwd+bwd / decode   `sparse_mla_triton`, H = 128, top-k = 2048, C = 576, Dv = 512,
                                    bf16; indices: every slot <= t while t < k, else k distinct
                                    slots spread evenly over [0, t] (the indexer's cost pattern:
                                    each row a separate 1152-byte gather)
    dense  fwd / fwd+bwd / decode   torch SDPA, flash backend, expanded MHA form: d_qk = 192,
                                    d_v = 128 zero-padded to 192 (flash needs equal head dims),
                                    causal for prefill
    indexer prefill / decode        `select_topk_triton` (scores + top-k), H_I = 64, d_I = 128,
                                    bf16 q and k, float32 weights

FLOPs (multiply-add = 2):
    sparse fwd       2 * T * k * H * (C + Dv)
    sparse fwd+bwd   2 * T * k * H * (4C + 3Dv)    bwd: q.k recompute, dO.v, dS.k, dS^T.q, P^T.dO
    dense fwd        2 * H * (T^2/2) * (192 + 128)
    dense fwd+bwd    2 * H * (T^2/2) * (4*192 + 3*128)
    decode           as fwd with T -> batch and, for dense, T^2/2 -> batch * T (no causal mask)
    indexer          2 * (T^2/2) * H_I * d_I (prefill), 2 * batch * T * H_I * d_I (decode)
Dense counts use d_v = 128 although the kernel runs with v padded to 192, so its TFLOP/s
understates the hardware rate by up to 320/384; the time ratio is what compares the two.
"x dense" is dense time / this row's time for the same T and mode (> 1 = faster than dense);
indexer rows are compared with dense fwd (prefill) or dense decode. Peak memory is
torch.cuda.max_memory_allocated over the row, inputs included.

Anchor: FlashMLA reports about 640 TFLOP/s for sparse prefill forward on H800 (hand-written
CUDA/CuTe). These Triton kernels were written without access to a GPU: their tile sizes are
reasoned, not tuned, and nobody has run this script yet; expect a fraction of that.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shapes:
    heads: int = 128
    c: int = 576            # r_kv + d_r
    dv: int = 512           # r_kv
    topk: int = 2048
    d_qk: int = 192         # d_n + d_r, dense baseline
    d_v: int = 128
    h_i: int = 64
    d_i: int = 128
    dtype: torch.dtype = torch.bfloat16


Work = tuple[Callable[[], object], float]     # (run once -> output, FLOPs of one run)


def spread_indices(T: int, k: int, q_start: int, device) -> torch.Tensor:
    """(T, k) int32: for the query at slot t = q_start + i, all slots 0..t (then -1) while
    t < k, else k distinct slots t - floor(j (t+1) / k), j < k, spread over [0, t]."""
    t = torch.arange(q_start, q_start + T, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    spread = t - (j * (t + 1)) // k          # strictly decreasing in j since (t+1)/k >= 1
    early = torch.where(j <= t, j, -1)
    return torch.where(t + 1 > k, spread, early).to(torch.int32)


def _randn(*shape, s: Shapes, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(s.dtype)


def sparse_prefill(T: int, s: Shapes, device, backward: bool) -> Work:
    from dsv32.kernels.triton_sparse import sparse_mla_triton
    q = _randn(1, T, s.heads, s.c, s=s, device=device).requires_grad_(backward)
    kv = _randn(1, T, s.c, s=s, device=device).requires_grad_(backward)
    idx = spread_indices(T, s.topk, 0, device)[None]
    scale = s.d_qk ** -0.5
    if not backward:
        def run():
            with torch.no_grad():
                return sparse_mla_triton(q, kv, idx, scale, s.dv)[0]
        return run, 2.0 * T * s.topk * s.heads * (s.c + s.dv)
    dout = _randn(1, T, s.heads, s.dv, s=s, device=device)

    def run_bwd():
        out, _ = sparse_mla_triton(q, kv, idx, scale, s.dv)
        return torch.autograd.grad(out, (q, kv), dout)
    return run_bwd, 2.0 * T * s.topk * s.heads * (4 * s.c + 3 * s.dv)


def sparse_decode(L: int, batch: int, s: Shapes, device) -> Work:
    from dsv32.kernels.triton_sparse import sparse_mla_triton
    q = _randn(batch, 1, s.heads, s.c, s=s, device=device)
    kv = _randn(batch, L, s.c, s=s, device=device)
    idx = spread_indices(1, s.topk, L - 1, device)[None].expand(batch, 1, -1)
    scale = s.d_qk ** -0.5

    def run():
        with torch.no_grad():
            return sparse_mla_triton(q, kv, idx, scale, s.dv)[0]
    return run, 2.0 * batch * min(s.topk, L) * s.heads * (s.c + s.dv)


def _sdpa_backends(device) -> list:
    from torch.nn.attention import SDPBackend
    # Flash is the baseline on CUDA; the math backend only lets the tests run this on CPU.
    return [SDPBackend.FLASH_ATTENTION] if torch.device(device).type == "cuda" else [SDPBackend.MATH]


def dense_prefill(T: int, s: Shapes, device, backward: bool) -> Work:
    from torch.nn.attention import sdpa_kernel
    q, k = (_randn(1, s.heads, T, s.d_qk, s=s, device=device).requires_grad_(backward) for _ in range(2))
    v = F.pad(_randn(1, s.heads, T, s.d_v, s=s, device=device), (0, s.d_qk - s.d_v)).requires_grad_(backward)
    pairs = T * T / 2

    def fwd():
        with sdpa_kernel(_sdpa_backends(device)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if not backward:
        def run():
            with torch.no_grad():
                return fwd()
        return run, 2.0 * s.heads * pairs * (s.d_qk + s.d_v)
    dout = torch.randn_like(v)

    def run_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), dout)
    return run_bwd, 2.0 * s.heads * pairs * (4 * s.d_qk + 3 * s.d_v)


def dense_decode(L: int, batch: int, s: Shapes, device) -> Work:
    from torch.nn.attention import sdpa_kernel
    q = _randn(batch, s.heads, 1, s.d_qk, s=s, device=device)
    k = _randn(batch, s.heads, L, s.d_qk, s=s, device=device)
    v = F.pad(_randn(batch, s.heads, L, s.d_v, s=s, device=device), (0, s.d_qk - s.d_v))

    def run():
        with torch.no_grad(), sdpa_kernel(_sdpa_backends(device)):
            return F.scaled_dot_product_attention(q, k, v)
    return run, 2.0 * batch * s.heads * L * (s.d_qk + s.d_v)


def indexer(T: int, L: int, batch: int, s: Shapes, device) -> Work:
    """T queries at slots L-T..L-1 over L keys: T = L is prefill, T = 1 decode."""
    from dsv32.kernels.triton_indexer import select_topk_triton
    q = _randn(batch, T, s.h_i, s.d_i, s=s, device=device)
    k = _randn(batch, L, s.d_i, s=s, device=device)
    w = torch.randn(batch, T, s.h_i, device=device) * (s.h_i * s.d_i) ** -0.5

    def run():
        return select_topk_triton(q, w, k, s.topk, q_start=L - T)
    pairs = T * T / 2 if T == L else batch * T * L
    return run, 2.0 * pairs * s.h_i * s.d_i


# ----------------------------------------------------------------------------- timing
_SLOW_S = 20.0   # a row slower than this per run is not repeated at larger T (8-minute budget)


def run_row(build: Callable[[], Work], budget_s: float = 1.0) -> tuple[float, int, float]:
    """(seconds per run, peak bytes, FLOPs per run). One untimed run (it compiles), then as many
    as fit budget_s (1..10) between two CUDA events. The inputs die when this returns."""
    fn, flops = build()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end) / 1e3
    iters = int(max(1, min(10, budget_s // max(first, 1e-6))))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters, torch.cuda.max_memory_allocated(), flops


def sanity_check(device) -> float:
    """Max |Triton - torch| at a small bf16 shape, so a broken kernel is not timed as fast."""
    from dsv32.kernels import sparse_mla_torch
    from dsv32.kernels.triton_sparse import sparse_mla_triton
    s = Shapes()
    T = 512
    q = _randn(1, T, 16, s.c, s=s, device=device)
    kv = _randn(1, T, s.c, s=s, device=device)
    idx = spread_indices(T, 256, 0, device)[None]
    a = sparse_mla_triton(q, kv, idx, s.d_qk ** -0.5, s.dv)[0].float()
    b = sparse_mla_torch(q.float(), kv.float(), idx, s.d_qk ** -0.5, s.dv)[0].float()
    return (a - b).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--decode-batch", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (it times Triton and flash-attention kernels); "
              "none is visible to torch.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_gpu.py needs triton: pip install 'dsv32[gpu]'", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    s = Shapes()
    print(f"{torch.cuda.get_device_name(device)}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"H={s.heads} top-k={s.topk} C={s.c} Dv={s.dv} | dense d_qk={s.d_qk} d_v={s.d_v} | "
          f"indexer H_I={s.h_i} d_I={s.d_i} | {s.dtype}, decode batch {args.decode_batch}")
    err = sanity_check(device)
    print(f"sanity: max |triton - torch| = {err:.3g} (bf16 output)")
    if not math.isfinite(err) or err > 5e-2:
        print("sanity check failed; not timing a wrong kernel", file=sys.stderr)
        return 1

    B = args.decode_batch
    header = f"{'row':<18}{'T':>7}{'ms':>11}{'TFLOP/s':>10}{'x dense':>9}{'peak GiB':>10}"
    print(header + "\n" + "-" * len(header))
    too_slow: set[str] = set()
    for T in args.seq_lens:
        rows = [
            ("dense fwd", lambda: dense_prefill(T, s, device, False), None),
            ("sparse fwd", lambda: sparse_prefill(T, s, device, False), "dense fwd"),
            ("indexer prefill", lambda: indexer(T, T, 1, s, device), "dense fwd"),
            ("dense fwd+bwd", lambda: dense_prefill(T, s, device, True), None),
            ("sparse fwd+bwd", lambda: sparse_prefill(T, s, device, True), "dense fwd+bwd"),
            ("dense decode", lambda: dense_decode(T, B, s, device), None),
            ("sparse decode", lambda: sparse_decode(T, B, s, device), "dense decode"),
            ("indexer decode", lambda: indexer(1, T, B, s, device), "dense decode"),
        ]
        times: dict[str, float] = {}
        for name, build, baseline in rows:
            if name in too_slow:
                print(f"{name:<18}{T:>7}  skipped (over {_SLOW_S:.0f} s per run at a smaller T)")
                continue
            try:
                sec, peak, flops = run_row(build)
            except Exception as e:   # one failing row (OOM, a kernel that does not compile) must not hide the rest
                print(f"{name:<18}{T:>7}  failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
                continue
            finally:
                torch.cuda.empty_cache()
            if sec > _SLOW_S:
                too_slow.add(name)
            times[name] = sec
            ref = times.get(baseline or name)
            ratio = f"{ref / sec:9.2f}" if ref else f"{'-':>9}"
            print(f"{name:<18}{T:>7}{sec * 1e3:>11.2f}{flops / sec / 1e12:>10.1f}{ratio}{peak / 2**30:>10.2f}")
        for mode, parts in (("prefill fwd", ("dense fwd", "sparse fwd", "indexer prefill")),
                            ("decode", ("dense decode", "sparse decode", "indexer decode"))):
            if all(p in times for p in parts):
                dense, sparse, index = (times[p] for p in parts)
                print(f"  {mode}: dense / (sparse + indexer) = {dense / (sparse + index):.2f}")
        print()
    print("anchor: FlashMLA reports ~640 TFLOP/s sparse prefill fwd on H800 (hand-written CUDA); "
          "compare the 'sparse fwd' TFLOP/s above. The Triton tiles here are untuned.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
