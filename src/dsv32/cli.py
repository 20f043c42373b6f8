"""The `dsv32` command line: one tool, one verb per job.

Every verb takes flags and an optional `--config FILE` (JSON, or TOML on Python >= 3.11) whose
keys are the verb's flag names (dashes or underscores); flags given on the command line win.

Errors are one line on stderr, never a traceback (unless `--debug`, anywhere on the command
line, or DSV32_DEBUG=1):

    exit 2   a user error: a bad flag, value, file, output path or checkpoint, named
    exit 1   a runtime failure (divergence, NaN loss, out of disk, anything unexpected): the
             cause, and what was kept ("checkpoint runs/x/checkpoints/checkpoint-00000400 is intact")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .cli_support import (DISTRIBUTED_VERBS, HelpFormatter, UserError, check_args, describe_error, format_warning,
                          human_count)

Handler = Callable[[argparse.Namespace], int | None]


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
    """Find --config, take its values as defaults (a value from the file satisfies a required
    flag or positional), then parse the command line on top (flags win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = _load_config_file(known.config)
        actions = {a.dest: a for a in parser._actions}
        for a in parser._actions:              # every flag name is a key too (--keep, --no-progress)
            for option in a.option_strings:
                actions.setdefault(option.lstrip("-").replace("-", "_"), a)
        defaults = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in actions or name in ("config", "help"):
                raise UserError(f"config file {known.config}: unknown option {key!r} for `{parser.prog}`")
            action = actions[name]
            action.required = False
            if not action.option_strings:      # a positional given by the file becomes optional
                action.nargs = "?"
            if isinstance(action, argparse.BooleanOptionalAction) and name != action.dest and \
                    name.startswith("no_") and isinstance(value, bool):
                value = not value              # {"no_progress": true} means --no-progress
            defaults[action.dest] = value
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------- verbs
def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint
    from .checkpoint.hf import parse_size
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size: {e}") from None
    dtype = None if args.dtype in (None, "fp8") else args.dtype
    last = {"file": None}

    def progress(done: int, total: int, key: str, file: str) -> None:
        # One line per tensor on a terminal (rewritten in place), one per source file otherwise.
        if sys.stderr.isatty():
            sys.stderr.write(f"\rconvert: tensor {done}/{total} from {file} ({key})\033[K")
            if done == total:
                sys.stderr.write("\n")
        elif file != last["file"] or done == total:
            print(f"convert: tensor {done}/{total} from {file}", file=sys.stderr)
        last["file"] = file

    out = convert_checkpoint(args.src, args.dst, dtype=dtype, max_shard_size=max_shard, drop_mtp=args.drop_mtp,
                             fp8_weights=args.dtype == "fp8", verify=args.verify,
                             progress=progress if args.progress else None)
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .model import DSV32ForCausalLM
    if Path(args.model).is_dir() or Path(args.model).suffix == ".json":
        cfg = ModelConfig.from_hf_config(args.model)
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
    print(f"parameters: {human_count(main)} main, {human_count(total)} with MTP, "
          f"{human_count(main - inactive)} active per token")
    print(f"latent KV cache: {cache_bytes / 1024:.1f} KiB per token in bf16 "
          f"(r_kv + d_r + d_I = {cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim} per layer)")
    return 0


def resolve_model_dir(path: str | Path) -> Path:
    """A folder with config.json, or a run folder -> its latest checkpoint (a GRPO run's policy)."""
    from .training.checkpointing import CheckpointFolder
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = CheckpointFolder(path / "checkpoints").latest()
    if latest is None:
        raise ValueError(f"{path} is neither a checkpoint folder (no config.json) nor a run folder with checkpoints")
    return latest if (latest / "config.json").is_file() or not (latest / "policy").is_dir() else latest / "policy"


def load_model(spec: str | Path, *, dtype: str | None = None, device: str = "cpu", seed: int = 0,
               verify: bool = False, flag: str = "--model"):
    """What every verb's --model/--init names: a checkpoint folder, a run folder (its latest
    checkpoint) or a preset name (random weights, seeded). Another top-k needs no other model:
    pass `AttentionOptions(topk=...)` to its forward. `verify` checks a checkpoint's checksums
    first; `flag` names the flag in errors."""
    from .checkpoint import load_pretrained
    from .checkpoint.hf import parse_dtype
    from .checkpoint.hf_dense import is_dense_checkpoint, load_for_dsa
    from .config import PRESETS, ModelConfig
    from .model import DSV32ForCausalLM
    try:
        cast = parse_dtype(dtype)
    except ValueError as e:
        raise UserError(f"--dtype: {e}") from None
    if Path(spec).is_dir() and is_dense_checkpoint(resolve_model_dir(spec)):    # Llama/Qwen/Mistral: DSA retrofit
        if verify:
            from .checkpoint.integrity import verify_checksums
            verify_checksums(resolve_model_dir(spec))
        return load_for_dsa(resolve_model_dir(spec), dtype=dtype, device=device, seed=seed)
    if Path(spec).is_dir():
        model = load_pretrained(resolve_model_dir(spec), dtype=dtype, device=device, verify=verify)
    elif str(spec) in PRESETS:
        if verify:
            raise UserError(f"--verify checks a checkpoint's files; {str(spec)!r} is a preset (random weights)")
        model = DSV32ForCausalLM(ModelConfig.preset(str(spec)))
        model.init_weights(seed=seed)
        model = model.to(device=device, dtype=cast)
    else:
        raise UserError(f"{flag} {str(spec)!r} is neither a checkpoint folder nor a preset "
                        f"({', '.join(sorted(PRESETS))})")
    return model


def load_model_tokenizer(spec: str | Path, name: str | None, vocab_size: int, *, flag: str = "--model"):
    """The tokenizer a verb reads text for the model `spec` with: `name` ('byte', a tokenizer.json
    or a folder holding one) when given, else the tokenizer.json of the checkpoint `spec`
    resolves to (a run folder: its latest checkpoint), else the byte tokenizer. A tokenizer
    with an id the model has no embedding row for (max id >= vocab_size) is a UserError
    naming both."""
    from .tokenizer import tokenizer_for_model, tokenizer_name
    folder = Path(spec)
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
        folder = resolve_model_dir(folder)            # a run folder: its latest checkpoint
    tokenizer = tokenizer_for_model(folder, name)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer {tokenizer_name(tokenizer)} has ids up to {tokenizer.vocab_size - 1} but "
                        f"{flag} {spec} has vocab_size {vocab_size}; pass --tokenizer with the model's own "
                        f"tokenizer")
    return tokenizer


# ------------------------------------------------------------------------------- config flags
def _number_or_none(kind: type) -> Callable[[str], float | int | None]:
    def parse(text: str):
        if text.lower() in ("none", "null", "off"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    return parse


def add_config_flags(parser, cls: type, *, defaults: dict[str, Any] | None = None,
                     aliases: dict[str, list[str]] | None = None, choices: dict[str, Sequence] | None = None,
                     help: dict[str, str] | None = None, exclude: Sequence[str] = ()) -> None:
    """One flag per field of the dataclass `cls`: `--field-name` (plus `aliases`), typed by the
    field's default, with the field's help (metadata "help", or `help`) and its default.
    Booleans also take --no-NAME; a field that may be None takes 'none'; a tuple takes as many
    values as its default has, except a `tuple[X, ...]` field, which takes one comma-separated
    list (`--lengths 512,1024`). `defaults` overrides a field's default for this verb; the
    dataclass still validates every value (`config_from_args`)."""
    defaults, aliases, choices, help = defaults or {}, aliases or {}, choices or {}, help or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = defaults.get(f.name, f.default)
        if default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} has no plain default and cannot be a flag; exclude it")
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])]
        element = _list_element(f.type)
        shown = ",".join(map(str, default)) if element and isinstance(default, tuple) else default
        text = f"{help.get(f.name) or f.metadata.get('help', '')} (default: {shown})".lstrip()
        kw: dict[str, Any] = dict(dest=f.name, default=default, help=text)
        if element:
            parser.add_argument(*flags, type=_comma_list(element), metavar=f"{element.__name__.upper()},...", **kw)
        elif isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            parser.add_argument(*flags, type=type(default[0]), nargs=len(default), **kw)
        elif "None" in str(f.type) and isinstance(default, (int, float)):
            parser.add_argument(*flags, type=_number_or_none(_scalar(f.type, default)),
                                metavar=f"{f.name.upper()}|none", **kw)
        else:
            parser.add_argument(*flags, type=_scalar(f.type, default), choices=choices.get(f.name), **kw)


def _list_element(annotation: Any) -> type | None:
    """int, float or str for a `tuple[int, ...]`-style annotation (optionally `| None`), else None."""
    match = re.search(r"tuple\[(int|float|str), \.\.\.\]", str(annotation))
    return {"int": int, "float": float, "str": str}[match.group(1)] if match else None


def _comma_list(kind: type) -> Callable[[str], tuple | None]:
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _scalar(annotation: Any, default: Any) -> type:
    # The annotation wins over the default's type: `lr: float = 1` still parses "1e-3".
    return float if str(annotation).split(" ")[0] in ("float", "<class 'float'>") else type(default)


def config_from_args(args: argparse.Namespace, cls: type, **fields: Any):
    """The dataclass `cls` built from the flags `add_config_flags` added (and `fields`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **fields})


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .inference import decode_layout, generate
    model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed, verify=args.verify).eval()
    decode_layout(model)                   # column-major linear weights: faster one-row products
    tok = load_model_tokenizer(args.model, args.tokenizer, model.config.vocab_size)
    prompts = args.prompt or [sys.stdin.read()]
    ids = [tok.encode(p, add_bos=args.bos and tok.bos_id is not None) for p in prompts]
    single = len(ids) == 1
    stops = [tok.eos_id] + [tok.encode(s)[0] for s in args.stop if tok.encode(s)]
    shown = {"chars": 0, "done": None}
    pieces: list[int] = []

    def stream(step: int, tokens: "torch.Tensor", finished: "torch.Tensor") -> None:
        # Only the single-prompt case streams; text appears as soon as its bytes form characters.
        if step == 0:
            sys.stdout.write(prompts[0])
        if shown["done"] is None or not shown["done"]:
            pieces.append(int(tokens[0]))
        shown["done"] = bool(finished[0])
        text = tok.decode(pieces).rstrip("\ufffd")
        sys.stdout.write(text[shown["chars"]:])
        sys.stdout.flush()
        shown["chars"] = len(text)

    start = time.perf_counter()
    res = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_tokens=stops, stream=stream if single else None,
                   fp8_cache=args.fp8_cache, vocab_limit=min(tok.vocab_size, model.config.vocab_size))
    seconds = time.perf_counter() - start
    n = int(res.lengths.sum())
    if single:
        sys.stdout.write(tok.decode(res.completions()[0])[shown["chars"]:] + "\n")
    else:
        for p, c in zip(prompts, res.completions()):
            print(f"--- {p!r}\n{p}{tok.decode(c)}")
    print(f"[{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s; "
          f"finish: {', '.join(res.finish_reason)}]", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out_dir=args.out, seed=args.seed, quick=args.quick, fresh=args.fresh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv32", description="DeepSeek-V3.2-style models: build, load, train, sparsify, "
                                               "RL-fine-tune, run, convert.", formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the "
                                                             "command line)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    def verb(name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.add_argument("--config", help="JSON/TOML file of option values (flags override)")
        p.set_defaults(handler=handler)
        return p

    p = verb("demo", "the whole story on the embedded default: pretrain, sparsify, evaluate, GRPO, "
                     "generate; writes a report", _cmd_demo)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seeds every stage")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds; a smoke test, not a result)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")

    p = verb("convert", "convert a HF-layout checkpoint (FP8 -> bf16, dtype change, re-shard, drop MTP)",
             _cmd_convert)
    p.add_argument("src", help="source checkpoint folder")
    p.add_argument("dst", help="destination folder (other files there are kept)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], default=None,
                   help="target dtype; fp8 writes block-wise e4m3 weights (default: the config's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB")
    p.add_argument("--drop-mtp", action="store_true", help="leave out the MTP layers")
    p.add_argument("--verify", action="store_true", help="check the source's checksums.sha256 first")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="report progress per tensor on stderr")

    p = verb("generate", "generate text from a checkpoint (or a preset), streaming to the terminal", _cmd_generate)
    p.add_argument("--model", required=True, help="checkpoint folder, or a preset name (random weights)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: stdin)")
    p.add_argument("--tokenizer", default=None, help="'byte', or a tokenizer.json / folder (default: the "
                                                     "model folder's tokenizer.json, else byte)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling (and a preset's random weights)")
    p.add_argument("--stop", action="append", default=[], help="also stop at this string's first token")
    p.add_argument("--bos", action="store_true", help="prepend the BOS token")
    p.add_argument("--fp8-cache", action="store_true", help="store the latent cache in simulated FP8")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="parameter dtype (default: float32 on CPU, the config's elsewhere)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--verify", action="store_true", help="check the checkpoint's checksums.sha256 first")

    p = verb("info", "print the size of a preset or a checkpoint's config", _cmd_info)
    p.add_argument("model", help="a preset name (tiny, small, v3.2), a checkpoint folder or a config.json")

    from .training.commands import register as register_training  # pretrain, sparsify, eval
    register_training(verb)
    from .rl import commands as rl_commands
    rl_commands.register(verb)                 # sft, grpo
    return parser


def _check_launcher(verb: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and verb not in DISTRIBUTED_VERBS:
        raise UserError(f"{verb} runs on one process; launch it without torchrun (the verbs that run under "
                        f"torchrun: {', '.join(DISTRIBUTED_VERBS)})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DSV32_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = None
    previous_format, warnings.formatwarning = warnings.formatwarning, format_warning   # one line each
    try:
        if not argv:
            parser.print_help()
            return 0
        _check_launcher(argv[0])
        if argv[0] in parser._subparsers._group_actions[0].choices:
            verb_parser = parser._subparsers._group_actions[0].choices[argv[0]]
            args = _apply_config(verb_parser, argv[1:])
            args.verb = argv[0]
        else:
            args = parser.parse_args(argv)
        check_args(args)
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("dsv32: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        code, message = describe_error(e, args)
        print(f"dsv32: error: {message}", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    raise SystemExit(main())
