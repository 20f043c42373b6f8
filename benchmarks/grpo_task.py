"""SFT, then GRPO, on a built-in verifiable task: does RL add accuracy on top of a short
supervised warm start?

    python benchmarks/grpo_task.py                         # the full run (< 30 min on 2 CPU cores)
    python benchmarks/grpo_task.py --sft-max-steps 200 --grpo-steps 10 --eval-size 50     # a smoke run

Task: arithmetic (default 2-digit a + b), exact-match reward. Model: see grpo_common (a 0.29 M
parameter MoE, byte tokenizer). The warm start trains until greedy accuracy on validation
prompts reaches --sft-target (see grpo_common.warm_start for why a target and not a step count),
so RL starts well below the ceiling. GRPO then trains on sampled completions with the task
reward only. Accuracy is greedy, on held-out prompts no stage trains or stops on, measured at
random init, after SFT and after GRPO. For context the table also shows the other use of the
same number of steps: SFT continued from the warm start instead of GRPO.

Writes the curves (SFT loss and validation accuracy; GRPO reward, accuracies, KL, ...) as PNG
and the GRPO metrics as JSONL under --out, and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_common import (TOKENIZER, answer_tokens, build_model, markdown_table, set_threads,  # noqa: E402
                         task_data, warm_start)

from dsv32.rl import GRPOConfig, SFTConfig, greedy_accuracy, plot_curves, train_grpo, train_sft  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--ops", default="+")
    ap.add_argument("--sft-target", type=float, default=0.25, help="validation greedy accuracy that ends SFT")
    ap.add_argument("--sft-max-steps", type=int, default=3000)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--grpo-steps", type=int, default=500)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4, help="GRPO learning rate")
    ap.add_argument("--eval-size", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_grpo_task")
    args = ap.parse_args()
    set_threads(args.threads)
    out = Path(args.out)

    train, val, held_out = task_data(args.digits, args.ops, args.eval_size, args.seed)
    budget = answer_tokens(args.digits)
    model = build_model(args.seed)
    print(f"task: arithmetic, digits={args.digits}, ops={args.ops!r}; {len(train)} training, {len(val)} validation, "
          f"{len(held_out)} held-out prompts; model {model.num_parameters() / 1e6:.2f} M parameters, "
          f"{args.threads} thread(s)", flush=True)

    t0 = time.perf_counter()
    acc_init = greedy_accuracy(model, TOKENIZER, held_out, max_new_tokens=budget)
    sft_history, sft_seconds = warm_start(model, train, val, target=args.sft_target, max_steps=args.sft_max_steps,
                                          seed=args.seed, max_new_tokens=budget, lr=args.sft_lr)
    sft_steps = len(sft_history)
    acc_sft = greedy_accuracy(model, TOKENIZER, held_out, max_new_tokens=budget)
    checks = [r for r in sft_history if "val_accuracy" in r]
    last_check = f"validation accuracy {checks[-1]['val_accuracy']:.3f} at step {checks[-1]['step']}" if checks \
        else "no validation check"
    print(f"SFT: {sft_steps} steps in {sft_seconds:.0f} s ({last_check}); held-out greedy accuracy "
          f"{acc_init:.3f} -> {acc_sft:.3f}", flush=True)

    control = copy.deepcopy(model)
    t = time.perf_counter()
    train_sft(control, TOKENIZER, train, SFTConfig(steps=args.grpo_steps, batch_size=32, lr=args.sft_lr,
                                                   warmup_steps=0, schedule="constant", seed=args.seed + 1))
    control_seconds = time.perf_counter() - t
    acc_control = greedy_accuracy(control, TOKENIZER, held_out, max_new_tokens=budget)

    config = GRPOConfig(steps=args.grpo_steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                        max_new_tokens=budget, temperature=1.0, lr=args.lr, ppo_epochs=1, minibatches=2,
                        eval_every=args.eval_every, seed=args.seed)
    shutil.rmtree(out / "grpo", ignore_errors=True)          # a fresh run, not a resumed one
    t1 = time.perf_counter()
    history = train_grpo(model, TOKENIZER, train, config, out_dir=out / "grpo", eval_examples=held_out)
    grpo_seconds = time.perf_counter() - t1
    acc_grpo = greedy_accuracy(model, TOKENIZER, held_out, max_new_tokens=budget)

    sft_curve = [{"step": r["step"], "sft_loss": r["loss"], "val_accuracy": r.get("val_accuracy")}
                 for r in sft_history]
    plot_curves({"sft": sft_curve}, out / "sft_curves.png", metrics=["sft_loss", "val_accuracy"],
                title="SFT warm start", smooth=25)
    plot_curves({"grpo": history}, out / "grpo_curves.png", title="GRPO after SFT", smooth=10)

    tenth = max(1, len(history) // 10)

    def sampled(records: list[dict]) -> str:
        return f"{sum(r['accuracy'] for r in records) / len(records):.3f}"

    rows = [
        ["init (random weights)", f"{acc_init:.3f}", "-", "-"],
        [f"after SFT ({sft_steps} steps)", f"{acc_sft:.3f}", sampled(history[:tenth]), f"{sft_seconds:.0f}"],
        [f"after GRPO ({args.grpo_steps} steps)", f"{acc_grpo:.3f}", sampled(history[-tenth:]), f"{grpo_seconds:.0f}"],
        [f"control: SFT continued instead ({args.grpo_steps} steps)", f"{acc_control:.3f}", "-",
         f"{control_seconds:.0f}"],
    ]
    print()
    print(markdown_table(["stage", "held-out greedy acc", "sampled acc (T=1)", "seconds"], rows))
    print(f"\nGRPO adds {100 * (acc_grpo - acc_sft):+.1f} points of held-out greedy accuracy over the SFT start "
          f"(G={args.group_size}, {args.prompts_per_step} prompts/step, lr {args.lr}, beta {config.beta}, "
          f"delta {config.delta}). Sampled accuracy: GRPO rollouts at T=1, mean over the first / last 10% of "
          f"steps. The control row uses the same steps for supervised training on the reference answers.")
    print(f"total {time.perf_counter() - t0:.0f} s; curves: {out / 'sft_curves.png'}, {out / 'grpo_curves.png'}; "
          f"metrics: {out / 'grpo' / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
