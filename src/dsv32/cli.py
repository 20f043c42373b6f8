"""The `dsv32` command line: one tool, one verb per job.

Every verb takes flags and an optional `--config FILE` (JSON, or TOML on Python >= 3.11) whose
keys are the verb's flag names (dashes or underscores); flags given on the command line win.
A user error (bad flag, bad file, bad value) prints one line and exits with code 2, without
a traceback; set DSV32_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from .checkpoint import CheckpointError

Handler = Callable[[argparse.Namespace], int | None]


class UserError(Exception):
    """A mistake in what the user asked for; reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:
            raise UserError("TOML config files need Python >= 3.11; use JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path}: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of option names to values")
    return data


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse once to find --config, set its values as defaults, parse again (flags win)."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        values = _load_config_file(args.config)
        known = {a.dest for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            if dest not in known or dest in ("config", "help"):
                raise UserError(f"config file {args.config}: unknown option {key!r} for `{parser.prog}`")
            defaults[dest] = value
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


# ------------------------------------------------------------------------------- verbs
def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint
    dtype = None if args.dtype in (None, "fp8") else args.dtype
    out = convert_checkpoint(args.src, args.dst, dtype=dtype, max_shard_size=args.max_shard_size,
                             drop_mtp=args.drop_mtp, fp8_weights=args.dtype == "fp8")
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .model import DSV32ForCausalLM
    if Path(args.model).is_dir():
        cfg = ModelConfig.from_hf_config(Path(args.model) / "config.json")
    else:
        cfg = ModelConfig.preset(args.model)
    with torch.device("meta"):
        model = DSV32ForCausalLM(cfg, init=False)
    total = model.num_parameters(exclude_mtp=False)
    main = model.num_parameters()
    moe_layers = cfg.num_moe_layers
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    cache_bytes = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * 2
    print(f"layers {cfg.num_hidden_layers} ({moe_layers} MoE), hidden {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}, experts {cfg.n_routed_experts} (top-{cfg.num_experts_per_tok}, "
          f"{cfg.n_group} groups keep {cfg.topk_group}), index top-k {cfg.index_topk}")
    print(f"parameters: {main / 1e9:.3f} B main, {total / 1e9:.3f} B with MTP, "
          f"{(main - inactive) / 1e9:.3f} B active per token")
    print(f"latent KV cache: {cache_bytes / 1024:.1f} KiB per token in bf16 "
          f"(r_kv + d_r + d_I = {cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim} per layer)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out_dir=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv32", description="DeepSeek-V3.2-style models: build, load, train, sparsify, "
                                               "RL-fine-tune, run, convert.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    def verb(name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="JSON/TOML file of option values (flags override)")
        p.set_defaults(handler=handler)
        return p

    p = verb("demo", "run the main job on the embedded default and write a report", _cmd_demo)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)

    p = verb("convert", "convert a HF-layout checkpoint (FP8 -> bf16, dtype change, re-shard, drop MTP)",
             _cmd_convert)
    p.add_argument("src", help="source checkpoint folder")
    p.add_argument("dst", help="destination folder (other files there are kept)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], default=None,
                   help="target dtype; fp8 writes block-wise e4m3 weights (default: the config's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB")
    p.add_argument("--drop-mtp", action="store_true", help="leave out the MTP layers")

    p = verb("info", "print the size of a preset or a checkpoint's config", _cmd_info)
    p.add_argument("model", help="a preset name (tiny, small, v3.2) or a checkpoint folder")

    from .training.commands import register as register_training  # pretrain, sparsify, eval
    register_training(verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if not argv:
            parser.print_help()
            return 0
        verb_parser = parser
        if argv[0] in parser._subparsers._group_actions[0].choices:
            verb_parser = parser._subparsers._group_actions[0].choices[argv[0]]
            args = _apply_config(verb_parser, argv[1:])
        else:
            args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except (UserError, CheckpointError, ValueError, FileNotFoundError) as e:
        if os.environ.get("DSV32_DEBUG"):
            raise
        print(f"dsv32: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsv32: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
