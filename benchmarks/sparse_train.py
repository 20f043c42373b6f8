"""Sparse training at few heads: the LM forward+backward of the `small` preset (4 heads,
index_topk 256) under DSA against dense causal attention, and where each way of computing the
sparse attention beats the others as the head count grows.

    python benchmarks/sparse_train.py                           # T = 2K, 4K, 8K; crossover table
    python benchmarks/sparse_train.py --lengths 2048 --heads 4 --crossover-lengths 1024 2048 --reps 1

Table 1: one forward + backward of the LM loss alone (no indexer loss), batch 1, per length:
dense (`AttentionOptions(sparse=False)`) and sparse (the indexer's top-k, `--backend auto`: on
CPU the gather kernel or the dense-masked path by the kernels' cost rule; `torch`: gather only),
and their ratio; the two alternate step by step (median of `--reps` each).
Table 2 (`--selection-lengths`): the indexer's top-k selection alone, best first and as an
unordered set (`ordered=False`, what the masked path asks for). Table 3: attention alone (one layer's shapes: the preset's head dims, H heads), forward +
backward: dense causal SDPA over expanded heads, and the sparse absorbed attention over k = 256
selected latent rows per query (a causal random selection) by the gather kernel and by the
dense-masked path, and which of the two the cost rule (`kernels.choose_masked`) picks. Times are
medians of `--reps` in this process's CPU time (the machine is shared; wall time swings with its
load), one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_common import markdown_table  # noqa: E402

from dsv32 import AttentionOptions, DSV32ForCausalLM, ModelConfig  # noqa: E402
from dsv32.kernels import choose_masked, select_topk, sparse_mla_absorbed  # noqa: E402
from dsv32.training.losses import lm_loss  # noqa: E402

DENSE = AttentionOptions(sparse=False)


def cpu_time(fn, reps: int) -> float:
    fn()                                              # warm-up (allocator, first-call costs)
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def interleaved_cpu_times(fns, reps: int) -> list[float]:
    """Median CPU seconds of each of `fns`, run in turn `reps` times after one warm-up each: a
    drift in the machine's load moves all of them alike, so their ratio is steadier than that
    of back-to-back medians."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            t = time.process_time()
            fn()
            out.append(time.process_time() - t)
    return [statistics.median(t) for t in times]


def lm_step(model: DSV32ForCausalLM, batch: torch.Tensor, attention: AttentionOptions):
    def run():
        model.zero_grad(set_to_none=True)
        lm_loss(model(batch, attention=attention).logits, batch)[0].backward()
    return run


def lm_table(lengths: list[int], reps: int, backend: str) -> str:
    sparse_opts = AttentionOptions(sparse=True, backend=backend)
    rows = []
    for T in lengths:
        cfg = ModelConfig.preset("small", max_position_embeddings=max(T, 256))
        model = DSV32ForCausalLM(cfg)
        model.init_weights(seed=0)
        batch = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        dense, sparse = interleaved_cpu_times([lm_step(model, batch, DENSE), lm_step(model, batch, sparse_opts)],
                                              reps)
        rows.append([str(T), f"{dense * 1e3:.0f}", f"{sparse * 1e3:.0f}", f"{sparse / dense:.2f}x"])
        print(f"  T={T}: dense {dense:.3f} s, sparse {sparse:.3f} s", flush=True)
    return markdown_table(["T", "dense ms", "sparse ms", "sparse / dense"], rows)


def attention_times(T: int, H: int, k: int, reps: int) -> tuple[float, float, float, bool]:
    """CPU seconds of dense causal, sparse gather and sparse masked attention, and the rule's pick."""
    cfg = ModelConfig.preset("small")
    d_n, d_r, d_v, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, d_n + d_r, generator=gen, requires_grad=True)
    key = torch.randn(1, H, T, d_n + d_r, generator=gen, requires_grad=True)
    v = torch.randn(1, H, T, d_n + d_r, generator=gen, requires_grad=True)   # padded to the qk dim, as the model does

    def dense():
        F.scaled_dot_product_attention(q, key, v, is_causal=True).sum().backward()

    q_n = torch.randn(1, T, H, d_n, generator=gen, requires_grad=True)
    q_r = torch.randn(1, T, H, d_r, generator=gen, requires_grad=True)
    kv = torch.randn(1, T, r + d_r, generator=gen, requires_grad=True)
    w_uk = torch.randn(H, d_n, r, generator=gen, requires_grad=True)
    w_uv = torch.randn(H, d_v, r, generator=gen, requires_grad=True)
    # Causal random selection: query t keeps min(k, t + 1) of its keys, -1 for the rest.
    scores = torch.rand(T, T, generator=gen).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1.0)
    top = scores.topk(min(k, T), dim=-1)
    indices = torch.where(top.values < 0, -1, top.indices)[None]

    def sparse(backend):
        return lambda: sparse_mla_absorbed(q_n, q_r, kv, indices, w_uk, w_uv, 0.1, backend=backend).sum().backward()

    picks_masked = choose_masked(T, T, H, k, d_n + d_r, d_v, r + d_r)
    return cpu_time(dense, reps), cpu_time(sparse("torch"), reps), cpu_time(sparse("masked"), reps), picks_masked


def selection_table(lengths: list[int], reps: int) -> str:
    """The indexer's top-k selection alone (scores + top-k, torch backend) on the preset's indexer
    shapes, per layer and for all layers: the part of a sparse step that dense attention never pays."""
    cfg = ModelConfig.preset("small")
    rows = []
    for T in lengths:
        gen = torch.Generator().manual_seed(T)
        q = torch.randn(1, T, cfg.index_n_heads, cfg.index_head_dim, generator=gen)
        w = torch.randn(1, T, cfg.index_n_heads, generator=gen)
        k = torch.randn(1, T, cfg.index_head_dim, generator=gen)
        one, loose = interleaved_cpu_times(
            [lambda: select_topk(q, w, k, cfg.index_topk, backend="torch"),
             lambda: select_topk(q, w, k, cfg.index_topk, backend="torch", ordered=False)], reps)
        n = cfg.num_hidden_layers
        rows.append([str(T), f"{one * 1e3:.0f}", f"{one * n * 1e3:.0f}", f"{loose * 1e3:.0f}", f"{loose * n * 1e3:.0f}"])
        print(f"  selection T={T}: {one:.3f} s per layer, {loose:.3f} s unordered", flush=True)
    return markdown_table(["T", "per layer ms", f"{n} layers ms", "unordered, per layer ms", f"unordered, {n} layers ms"],
                          rows)


def crossover_table(lengths: list[int], heads: list[int], k: int, reps: int) -> str:
    rows = []
    for H in heads:
        cells = [str(H)]
        for T in lengths:
            dense, gather, masked, picks_masked = attention_times(T, H, k, reps)
            won = "masked" if masked < gather else "gather"
            rule = "masked" if picks_masked else "gather"
            cells.append(f"{dense * 1e3:.0f} / {gather * 1e3:.0f} / {masked * 1e3:.0f} ({won}; rule: {rule})")
            print(f"  H={H} T={T}: dense {dense:.3f} s, gather {gather:.3f} s, masked {masked:.3f} s, "
                  f"rule picks {rule}", flush=True)
        rows.append(cells)
    return markdown_table(["H", *(f"T={T}: dense / gather / masked ms" for T in lengths)], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--heads", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--crossover-lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--selection-lengths", type=int, nargs="*", default=[],
                    help="also time the indexer's top-k selection alone at these lengths")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="auto",
                    help="sparse kernels of the LM table: auto (cost rule), torch (gather only), masked")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) at start", flush=True)
    tables = []
    if args.lengths:
        tables.append(f"LM forward+backward, `small` preset, batch 1, sparse backend {args.backend} (CPU ms):\n\n"
                      + lm_table(args.lengths, args.reps, args.backend))
    if args.selection_lengths:
        tables.append(f"Top-k selection alone, k = {ModelConfig.preset('small').index_topk} (CPU ms):\n\n"
                      + selection_table(args.selection_lengths, args.reps))
    if args.heads and args.crossover_lengths:
        tables.append(f"Attention alone, forward+backward, k = {args.k} (CPU ms):\n\n"
                      + crossover_table(args.crossover_lengths, args.heads, args.k, args.reps))
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) at end")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
