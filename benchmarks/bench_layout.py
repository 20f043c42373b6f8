"""One linear layer, its weight stored row-major (as built) or column-major (as
`dsv32.inference.decode_layout` leaves it): decode's one-row product and prefill/training GEMMs.

    python benchmarks/bench_layout.py                          # V3.2's indexer wq_b and q_b_proj shapes
    python benchmarks/bench_layout.py --shapes 8192x1536 --rows 1 512 --reps 3

Times are medians over --reps on the thread's CPU clock, one thread, both layouts interleaved
(the machine is shared: interleaving keeps a burst of load from landing on one layout only).
Rows of 1 are decode at batch 1 (a matrix-vector product, bound by reading the weight: GB/s
shown against a plain read of the same bytes); larger rows are prefill/training GEMMs, timed
forward and forward + backward (grad of input and weight).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _times(fns: dict, reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.thread_time()
            fn()
            ts[name].append(time.thread_time() - t)
    return {name: statistics.median(v) for name, v in ts.items()}


def _row(out_f: int, in_f: int, rows: int, reps: int) -> str:
    g = torch.Generator().manual_seed(0)
    w_row = torch.randn(out_f, in_f, generator=g) * 0.02
    w_col = w_row.t().contiguous().t()                          # same values, column-major storage
    x = torch.randn(rows, in_f, generator=g)
    fns = {"row": lambda: F.linear(x, w_row), "col": lambda: F.linear(x, w_col)}
    if rows == 1:
        fns["read"] = lambda: w_row.sum()
    else:
        xg, dy = x.clone().requires_grad_(), torch.randn(rows, out_f, generator=g)
        params = {"row": w_row.clone().requires_grad_(), "col": w_col.clone().requires_grad_()}

        def fwd_bwd(w):
            def run():
                w.grad = xg.grad = None
                F.linear(xg, w).backward(dy)
            return run
        fns.update({f"{k} fwd+bwd": fwd_bwd(w) for k, w in params.items()})
    t = _times(fns, reps)
    shape = f"{out_f}x{in_f}"
    if rows == 1:
        gb = out_f * in_f * 4 / 1e9
        return (f"| {shape} | {rows} | {t['row'] * 1e3:.2f} ({gb / t['row']:.1f} GB/s) | "
                f"{t['col'] * 1e3:.2f} ({gb / t['col']:.1f} GB/s) | {t['col'] / t['row']:.2f} | "
                f"read {t['read'] * 1e3:.2f} ({gb / t['read']:.1f} GB/s) |")
    return (f"| {shape} | {rows} | {t['row'] * 1e3:.2f} | {t['col'] * 1e3:.2f} | {t['col'] / t['row']:.2f} | "
            f"fwd+bwd {t['row fwd+bwd'] * 1e3:.1f} / {t['col fwd+bwd'] * 1e3:.1f} "
            f"({t['col fwd+bwd'] / t['row fwd+bwd']:.2f}) |")


def _shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is OUTxIN, e.g. 8192x1536; got {text!r}") from None
    if out_f < 1 or in_f < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be >= 1, got {text!r}")
    return out_f, in_f


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=_shape, nargs="+", default=[(8192, 1536), (24576, 1536)],
                    help="weight shapes OUTxIN (default: V3.2's indexer wq_b and q_b_proj)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 512, 2048], help="rows of the input (tokens)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if min(args.rows) < 1 or args.reps < 1:
        ap.error("--rows and --reps must be >= 1")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, thread CPU time, median of {args.reps}\n")
    print("| weight | rows | row-major ms | column-major ms | col / row | |")
    print("|--------|------|--------------|-----------------|-----------|-|")
    for out_f, in_f in args.shapes:
        for rows in args.rows:
            print(_row(out_f, in_f, rows, args.reps), flush=True)


if __name__ == "__main__":
    main()
