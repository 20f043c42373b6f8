"""Does DSA keep retrieval? A dense model that retrieves (MQAR), its DSA conversion, one table.

    python benchmarks/dsa_retrieval.py --quick               # T=128, 8 pairs, vocabulary 64: a few minutes
    python benchmarks/dsa_retrieval.py                       # T=1024, 64 pairs, vocabulary 136
    python benchmarks/dsa_retrieval.py --out runs/dsa_retrieval   # also writes result.json and heatmaps
    python benchmarks/dsa_retrieval.py --quick --curriculum none  # 8 pairs from the first step (the 1/N floor)

Trains a 2-layer dense-MLP model on multi-query associative recall (`dsv32.tasks.mqar`,
answer-only loss) through a curriculum over (T, pairs) — 2 pairs at T=32 first, the next
stage once held-out accuracy passes --stage-target — until its held-out answer accuracy at
the final (T, pairs) reaches --target. Then runs the indexer warm-up and sparse training from
it (`dsv32.training.recall_study`) and prints one table: dense; sparse before warm-up (the
untrained indexer: the control); after warm-up; after sparse training; and dense trained as
many more steps as sparse training took (the fair comparison, since sparse training trains
the main model on the task too). Each sparse row is at k = T/8, T/16, T/32: answer accuracy,
answer NLL, needle selected (the queried value's context position inside the query's top-k,
per layer) and the indexer's recall of the dense attention mass; and all again at 2T (no
target). Then the step times, dense vs sparse, and `uptime`'s load: the machine may be
shared, so read them with it.

Why MQAR rather than passkey: over integer ids a 2-layer model can solve MQAR with an
induction head, every sequence carries N answers (N graded signals per example, not one),
and the needle is one known position, so "needle selected" is exact. Passkey over bytes
needs a model that first learns to read digits in English filler.

Why the curriculum: trained on many pairs from the first step, the small model sits at the
1/N floor of guessing among the values in the context for thousands of steps (Zoology's
attention runs see millions of sequences). With 2 pairs the binding forms within a few
hundred steps and carries over as the pairs and the length grow (README, "Retrieval: does DSA
keep it?").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from dsv32.training.recall_study import (CONTINUED, RecallStudy, StudySizes, by_distance, format_step_times,
                                         format_table)

QUICK = StudySizes(seq_len=128, num_pairs=8, vocab_size=64, batch_size=16, dense_steps=2000, check_every=50,
                   curriculum=((32, 2), (64, 4)), warmup_steps=60, sparse_steps=60, eval_examples=32)
FULL = StudySizes()


def _stages(text: str) -> tuple[tuple[int, int], ...]:
    if text == "none":
        return ()
    try:
        return tuple((int(t), int(n)) for t, n in (stage.split(":") for stage in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T:N,T:N,... or 'none', got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T=128, 8 pairs, vocabulary 64")
    for name, kind in (("seq_len", int), ("num_pairs", int), ("vocab_size", int), ("power_a", float),
                       ("hidden", int), ("layers", int), ("heads", int), ("batch_size", int), ("lr", float),
                       ("dense_steps", int), ("target", float), ("stage_target", float), ("warmup_steps", int), ("sparse_steps", int), ("eval_examples", int),
                       ("seed", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--show-answers", action="store_true", default=None,
                   help="also write each answer into the ids (the construction before Zoology's; later queries "
                        "then see earlier answers, and guessing among the unanswered values scores H_N/N)")
    p.add_argument("--curriculum", default=None, type=_stages,
                   help="stages before the final (T, pairs) as T:N,T:N,... (e.g. 32:2,64:4), or 'none'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for result.json and the heatmaps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, **{k: v for k, v in vars(args).items() if k in sizes.__dataclass_fields__ and v is not None})
    print(f"MQAR T={sizes.seq_len}, {sizes.num_pairs} pairs, vocabulary {sizes.vocab_size}, power_a {sizes.power_a}, "
          f"answers in the ids: {sizes.show_answers}; curriculum {list(sizes.curriculum) or 'none'}; "
          f"model {sizes.layers} layers, hidden {sizes.hidden}, {sizes.heads} heads; load before: {os.getloadavg()}",
          flush=True)
    study = RecallStudy(sizes)
    result = study.run()
    print()
    print(format_table(result))
    dense = next(r for r in result["rows"] if r["stage"] == "dense" and r["length"] == sizes.seq_len)
    at_t = [r for r in result["rows"] if r["length"] == sizes.seq_len]
    sparse8 = next(r for r in at_t if r["stage"] == "sparse, after sparse training")
    control8 = next(r for r in at_t if r["stage"].endswith("(control)"))
    longer = next(r for r in at_t if r["stage"] == CONTINUED)
    print(f"\ndense accuracy {dense['accuracy']:.3f} (target {sizes.target}) after {result['dense_steps_run']} steps; "
          f"sparse at k=T/8 {sparse8['accuracy']:.3f} ({100 * (sparse8['accuracy'] - dense['accuracy']):+.1f} points; "
          f"target within 2); dense trained as long as the sparse stages {longer['accuracy']:.3f} (sparse "
          f"{100 * (sparse8['accuracy'] - longer['accuracy']):+.1f} points); control {control8['accuracy']:.3f}")
    print(format_step_times(result))
    print(f"load after: {os.getloadavg()}")
    if args.out:
        from dsv32.training.plots import plot_retrieval_heatmap
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        k = sizes.seq_len // sizes.fractions[0]
        from dsv32 import AttentionOptions
        for name, model, attention in (("dense", study.models["dense"], AttentionOptions(sparse=False)),
                                       ("control", study.models["control"], AttentionOptions(sparse=True, topk=k)),
                                       ("sparse", study.models["sparse"], AttentionOptions(sparse=True, topk=k))):
            cells = [c for n, (ids, labels) in study.held_out.items()
                     for c in by_distance(model, ids, labels, sizes.num_pairs, attention=attention)]
            plot_retrieval_heatmap(cells, out / f"mqar_{name}.png", title=f"MQAR, {name}",
                                   value="token_accuracy",
                                   xlabel="needle distance back from the query / length")
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}/result.json and heatmaps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
