"""The `dsv32 sft` and `dsv32 grpo` verbs: flags, input checks and handlers. `cli.build_parser`
calls `register` once; everything RL-specific about the command line lives here.

    dsv32 sft  --model small --task arithmetic --task-options '{"digits": 2, "ops": "+"}' \\
               --steps 2000 --out runs/sft
    dsv32 grpo --model runs/sft --task arithmetic --task-options '{"digits": 2, "ops": "+"}' \\
               --steps 300 --lr 1e-4 --top-p 0.95 --out runs/grpo
    dsv32 grpo --config grpo.json        # keys: the flag names, e.g. {"group_size": 8, "delta": null}

Both keep a run folder like `pretrain` (`checkpoints/`, a metrics JSONL, the settings check on
resume of `dsv32.training.checkpointing`): `sft` continues with `--resume` (its `--out` also gets
the final model in the HF layout), `grpo` resumes whatever run is in `--out`.

Every field of `GRPOConfig` / `SFTConfig` is a flag of the same name (dashes for underscores;
booleans also as --no-NAME; `--delta none` switches the off-policy mask off). Input that cannot
work — G < 2, delta <= 0, eps outside (0, 1), an empty dataset, an unknown task — is reported
in one line (exit code 2) before any model is loaded.

Left out on purpose: building models from config overrides (use `dsv32 convert`/a checkpoint
folder, or a preset name for random weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..cli import add_config_flags, config_from_args
from .grpo import GRPOConfig
from .losses import AGGREGATIONS, KL_ESTIMATORS
from .sft import SCHEDULES, SFTConfig

_CHOICES = {"kl_estimator": KL_ESTIMATORS, "aggregation": AGGREGATIONS, "schedule": SCHEDULES}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    # Not argparse-required: the existing --config mechanism parses the command line before it
    # reads the file, so required values may only arrive with the file; `_require` checks them.
    parser.add_argument("--model", help="checkpoint folder, or a preset name (random weights); required")
    parser.add_argument("--tokenizer", default=None, help="'byte', or a tokenizer.json / folder (default: the "
                                                          "model folder's tokenizer.json, else byte)")
    parser.add_argument("--out", help="output folder; required")
    parser.add_argument("--task", default="arithmetic", help="built-in task: generates the prompts and scores "
                                                             "them (default: arithmetic)")
    parser.add_argument("--task-options", type=_json_object, default={},
                        help='JSON keywords of the task\'s example maker, e.g. \'{"digits": 2}\'')
    parser.add_argument("--dataset", default=None, help="JSONL file of {prompt, answer, meta?} to train on "
                                                        "instead of generated prompts (scored by --task)")
    parser.add_argument("--eval-dataset", default=None, help="JSONL file of held-out examples (with --dataset)")
    parser.add_argument("--train-size", type=int, default=4000, help="generated training prompts (default: 4000)")
    parser.add_argument("--eval-size", type=int, default=200,
                        help="generated held-out prompts, disjoint from the training ones; 0 = no evaluation")


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} must be given (as flags or config-file keys)")


def _datasets(args: argparse.Namespace):
    from .datasets import load_examples, train_eval_split
    from ..tasks import get_task
    get_task(args.task)                                        # an unknown task fails here
    if args.train_size < 0 or args.eval_size < 0:
        raise ValueError(f"--train-size and --eval-size must be >= 0, got {args.train_size}, {args.eval_size}")
    if args.dataset is not None:
        train = load_examples(args.dataset)
        held_out = load_examples(args.eval_dataset) if args.eval_dataset else []
        source = args.dataset
    else:
        train, held_out = train_eval_split(args.task, args.train_size, args.eval_size, seed=args.seed,
                                           options=args.task_options)
        source = f"task {args.task!r} with --train-size {args.train_size}"
    if not train:
        raise ValueError(f"the dataset is empty ({source}): give at least one training example")
    return train, held_out


def _run_info(args: argparse.Namespace) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint besides the config dataclass."""
    return {"model": str(args.model), "tokenizer": args.tokenizer,
            "data": {"task": args.task, "task_options": args.task_options, "dataset": args.dataset,
                     "eval_dataset": args.eval_dataset, "train_size": args.train_size, "eval_size": args.eval_size},
            **({"reward": list(args.reward)} if hasattr(args, "reward") else {})}


def _load(args: argparse.Namespace):
    from ..cli import load_model, load_model_tokenizer
    model = load_model(args.model, seed=args.seed)
    return model, load_model_tokenizer(args.model, args.tokenizer, model.config.vocab_size)


def _cmd_sft(args: argparse.Namespace) -> int:
    from .rollout import greedy_accuracy
    from .sft import train_sft
    _require(args, "model", "out")
    config = config_from_args(args, SFTConfig)
    train, held_out = _datasets(args)
    model, tokenizer = _load(args)
    from ..training.checkpointing import save_full_model
    from ..distributed import init_distributed, shard_model
    info = init_distributed(str(next(model.parameters()).device))   # torchrun: FSDP2, rank 0 reports
    if info.enabled:
        shard_model(model)
    out = Path(args.out)
    answer_tokens = max(len(tokenizer.encode(ex.answer)) for ex in train + held_out) + 1

    def accuracy() -> str:
        if not held_out:
            return "n/a"
        acc = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=answer_tokens, rank=info.rank,
                              world_size=info.world_size)
        return f"{acc:.3f}"

    before = accuracy()
    if info.is_main:
        print(f"sft: {len(train)} training examples, held-out greedy accuracy before: {before}")
    history = train_sft(model, tokenizer, train, config, out_dir=out, metrics_name="sft_metrics.jsonl",
                        resume=args.resume, run_info=_run_info(args), dist=info)
    save_full_model(model, out, info)
    after = accuracy()
    if info.is_main:
        done = f"final loss {history[-1]['loss']:.4f}" if history else f"nothing to do, already at step {config.steps}"
        print(f"sft: {done}, held-out greedy accuracy after: {after}; model written to {out}")
    return 0


def _cmd_grpo(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .grpo import train_grpo
    from .plot import plot_curves
    from .rewards import RewardError, load_reward, task_reward
    from ..training.checkpointing import CheckpointFolder
    from ..training.metrics import read_metrics
    _require(args, "model", "out")
    config = config_from_args(args, GRPOConfig)
    train, held_out = _datasets(args)
    rewards = [load_reward(spec) for spec in args.reward] if args.reward else [task_reward(args.task)]
    if config.eval_every and not held_out:
        raise ValueError("--eval-every needs held-out prompts (--eval-size > 0, or --eval-dataset)")
    model, tokenizer = _load(args)
    from ..distributed import init_distributed
    info = init_distributed(str(next(model.parameters()).device))   # torchrun: FSDP2, rank 0 reports
    try:
        history = train_grpo(model, tokenizer, train, config, reward_fns=rewards, out_dir=args.out,
                             eval_examples=held_out or None, dist=info, run_info=_run_info(args))
    except RewardError as e:
        raise UserError(str(e)) from None
    out = Path(args.out)
    if not info.is_main:
        return 0
    if history:
        last = history[-1]
        print(f"grpo: step {last['step']}: reward {last['reward_mean']:.3f}, accuracy {last['accuracy']:.3f}"
              + (f", held-out greedy accuracy {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""))
        plot_curves({"grpo": read_metrics(out / "metrics.jsonl")}, out / "curves.png")
    else:
        print(f"grpo: nothing to do, the run in {out} already reached step {config.steps}")
    print(f"grpo: policy in {CheckpointFolder(out / 'checkpoints').latest() / 'policy'}, metrics in "
          f"{out / 'metrics.jsonl'}")
    return 0


def register(verb: Callable[[str, str, Callable], argparse.ArgumentParser]) -> None:
    """Add the RL verbs through `cli.build_parser`'s `verb(name, help, handler)`."""
    p = verb("sft", "supervised warm start on a task's prompt -> answer examples (loss on the answers only)",
             _cmd_sft)
    _add_data_flags(p)
    add_config_flags(p, SFTConfig, choices=_CHOICES)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest checkpoint (or from CHECKPOINT)")

    p = verb("grpo", "GRPO fine-tuning with the V3.2 stabilisers on a verifiable task; resumes from --out",
             _cmd_grpo)
    _add_data_flags(p)
    p.add_argument("--reward", action="append", default=[],
                   help="reward 'task:NAME' or 'package.module:function' (prompt, completion, example) -> float; "
                        "repeat to sum several (default: the --task exact-match reward)")
    add_config_flags(p, GRPOConfig, choices=_CHOICES)
