"""The four V3.2 GRPO stabilisers, and keep selection, under off-policy pressure, each switched
off in turn against the all-on run (same SFT start, same seeds, same prompts).

    python benchmarks/grpo_stabilisers.py                   # the full run (< 30 min on 2 CPU cores)
    python benchmarks/grpo_stabilisers.py --sft-max-steps 200 --steps 6 --eval-size 50     # a smoke run
    python benchmarks/grpo_stabilisers.py --index-topk 16 --variants "all on" "no keep selection"

Pressure: every rollout is used for `ppo_epochs` x `minibatches` = 8 updates at a high rate, so
all but the first see data from an older policy; sampling truncates with top-p (and top-k); the
sampler runs over the simulated FP8 latent cache, as a production inference engine would, so its
numerics (and some routing decisions) differ from the training forward's.

Runs: all on (unbiased KL, off-policy mask, keep routing, keep sampling mask); then one off at a
time: k3 KL instead of the unbiased estimate, no off-policy mask (delta = None), no keep
routing, no keep sampling mask, no keep selection. Keep selection only changes anything where
DSA selects (sequences longer than `--index-topk`; the default 64 keeps every key of these
~40-token sequences, so attention is dense): run it with a smaller k, e.g. 16, where the model
is SFT-trained and RL-trained with sparse attention and a random (untrained) indexer.

Columns: mismatch = mean |log pi_theta - log pi_old| at each step's first update, where the
weights are still the sampler's (sampler/trainer mismatch, not learning); ratio statistics over
all updates (r = pi_theta / pi_old); clip and masked fractions; KL (the run's own estimator, so
k3 and unbiased values are not the same quantity); reward and held-out greedy accuracy at the
start and end; collapse = held-out accuracy ends more than 10 points below the start, or the
reward of the last tenth of steps is below half that of the first tenth, or a non-finite loss;
selection B/token = bytes of recorded key selection per completion position (layers x K x 4;
0 where no step had more than top-k keys, nan with keep selection off).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_common import (TOKENIZER, answer_tokens, build_model, markdown_table, set_threads,  # noqa: E402
                         task_data, warm_start)

from dsv32.rl import GRPOConfig, greedy_accuracy, plot_curves, train_grpo  # noqa: E402

VARIANTS = {
    "all on": {},
    "k3 KL": {"kl_estimator": "k3"},
    "no off-policy mask": {"delta": None},
    "no keep routing": {"keep_routing": False},
    "no keep sampling mask": {"keep_sampling_mask": False},
    "no keep selection": {"keep_selection": False},
}


def _mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--ops", default="+")
    ap.add_argument("--sft-target", type=float, default=0.25, help="validation greedy accuracy that ends SFT")
    ap.add_argument("--sft-max-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=150, help="GRPO steps per run")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--minibatches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--fp8-sampler", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--eval-size", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--index-topk", type=int, default=64, help="DSA top-k (64: every key, dense attention)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="runs to make (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_grpo_stabilisers")
    args = ap.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()

    train, val, held_out = task_data(args.digits, args.ops, args.eval_size, args.seed)
    budget = answer_tokens(args.digits)
    start_model = build_model(args.seed, index_topk=args.index_topk)
    sft_history, sft_seconds = warm_start(start_model, train, val, target=args.sft_target,
                                          max_steps=args.sft_max_steps, seed=args.seed, max_new_tokens=budget)
    acc_start = greedy_accuracy(start_model, TOKENIZER, held_out, max_new_tokens=budget)
    print(f"SFT start: {len(sft_history)} steps in {sft_seconds:.0f} s, held-out greedy accuracy {acc_start:.3f}; "
          f"pressure: {args.ppo_epochs} x {args.minibatches} updates per rollout at lr {args.lr}, top-p "
          f"{args.top_p}, top-k {args.top_k}, FP8 sampler cache {args.fp8_sampler}; beta {args.beta}, "
          f"delta {args.delta}; index top-k {args.index_topk}", flush=True)

    base = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                max_new_tokens=budget, temperature=1.0, top_p=args.top_p, top_k=args.top_k,
                sampler_fp8_cache=args.fp8_sampler, lr=args.lr, ppo_epochs=args.ppo_epochs,
                minibatches=args.minibatches, beta=args.beta, delta=args.delta, eval_every=args.eval_every,
                seed=args.seed)
    runs: dict[str, list[dict]] = {}
    rows = []
    for name in args.variants:
        change = VARIANTS[name]
        model = copy.deepcopy(start_model)
        t = time.perf_counter()
        history = train_grpo(model, TOKENIZER, train, GRPOConfig(**{**base, **change}), eval_examples=held_out,
                             show_progress=False)
        seconds = time.perf_counter() - t
        runs[name] = history
        tenth = max(1, len(history) // 10)
        first, last = history[:tenth], history[-tenth:]
        acc_end = history[-1]["eval_accuracy"]
        reward_first, reward_last = _mean(first, "reward_mean"), _mean(last, "reward_mean")
        finite = all(math.isfinite(r["loss"]) for r in history)
        collapsed = (acc_end < acc_start - 0.10) or (reward_last < 0.5 * reward_first) or not finite
        rows.append([
            name, f"{_mean(history, 'mismatch'):.4f}", f"{_mean(history, 'ratio_mean'):.3f}",
            f"{max(r['ratio_max'] for r in history):.2f}", f"{min(r['ratio_min'] for r in history):.3f}",
            f"{_mean(history, 'clip_frac'):.3f}", f"{_mean(history, 'masked_frac'):.3f}",
            f"{_mean(last, 'kl'):.3f}", f"{_mean(last, 'entropy'):.3f}",
            f"{reward_first:.3f} -> {reward_last:.3f}", f"{acc_start:.3f} -> {acc_end:.3f}",
            "yes" if collapsed else "no", f"{_mean(history, 'selection_bytes_per_token'):.0f}", f"{seconds:.0f}",
        ])
        print(f"{name}: done in {seconds:.0f} s", flush=True)

    plot_curves(runs, out / "stabilisers.png", title="GRPO stabilisers, one off at a time", smooth=10,
                metrics=("reward_mean", "eval_accuracy", "kl", "mismatch", "ratio_max", "ratio_mean",
                         "clip_frac", "masked_frac", "entropy"))
    print()
    print(markdown_table(["run", "mismatch", "ratio mean", "ratio max", "ratio min", "clip frac", "masked frac",
                          "KL (end)", "entropy (end)", "reward first -> last 10%", "held-out acc", "collapse",
                          "selection B/token", "seconds"], rows))
    print(f"\nmismatch, ratio mean, clip and masked fractions: means over all steps; ratio max/min: extremes over "
          f"all updates; KL, entropy: mean of the last 10% of steps. total {time.perf_counter() - t0:.0f} s; "
          f"curves: {out / 'stabilisers.png'}")


if __name__ == "__main__":
    main()
