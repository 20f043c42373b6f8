"""The training verbs of the `dsv32` command line: `pretrain`, `sparsify` and `eval`.

    dsv32 pretrain --model small --seq-len 2048 --steps 2000 --out runs/pre
    dsv32 sparsify --stage warmup --init runs/pre --topk 256 --steps 200 --out runs/warmup
    dsv32 sparsify --stage sparse --init runs/warmup --steps 500 --out runs/sparse
    dsv32 eval --model runs/sparse --lengths 512,1024,2048 --topk 64,128,256 --out runs/sparse/eval

`register(subparsers, verb)` adds them; cli.py calls it from `build_parser`. Every verb takes
`--config FILE` (handled by cli.py). The training settings of pretrain and sparsify are the
fields of `TrainConfig`, one flag each (`cli.add_config_flags`; `--bias-gamma` and `--keep`
are the short names of bias_update_gamma and keep_checkpoints), with each verb's own defaults;
the settings of eval are the fields of `EvalConfig`, one flag each. A run folder holds
`metrics.jsonl` and `checkpoints/`; `--init`/`--model` accept a run folder (its latest
checkpoint) or any HF-layout folder. `--resume` continues the run in `--out` from its latest
checkpoint (or from a given one).

Top-k is never a reason to rebuild a model: `eval --topk 64,128,256` evaluates one row per k
with `AttentionOptions(topk=k)` on the same model (plus a dense reference row) and prints one
table; `sparsify --topk K` makes K the model's recorded index_topk, which every layer reads at
call time.

Data: the corpus (files/folders given by `--corpus`, default this Python's standard library
source) is split by document hash into training and held-out sides; training sequences
mix corpus text with retrieval examples (`--task-fraction`; `--task-loss answer` trains them
on their answers only), or come from a JSONL file of (ids, labels) examples (`--data-jsonl`,
format in `data.JsonlSequences`); the held-out side gives the evaluation LM loss.

Tokenizer: `--tokenizer` ('byte', a tokenizer.json or a folder holding one; default: the
tokenizer.json of the checkpoint `--init`/`--model` names, else the byte tokenizer, which is
the presets' vocabulary) reads the corpus, the held-out text and the retrieval tasks, whose
lengths (`--seq-len`, `--lengths`) are then in its tokens. A training run copies its
tokenizer.json (and tokenizer_config.json) into every checkpoint, so `eval` and `generate` on
the result read text as it was trained. A tokenizer with an id the model has no embedding for
is an error naming both. Bad input
(an empty corpus, `--seq-len` beyond the model's max_position_embeddings, an unknown task, resuming with other settings) is a ValueError,
which cli.py prints in one line with exit code 2, before any checkpoint is touched.

Under torchrun both verbs shard the model with FSDP2 (distributed.py); `eval` runs on one process.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..cli import add_config_flags, config_from_args, load_model, load_model_tokenizer, resolve_model_dir
from ..config import ModelConfig
from ..model import AttentionOptions, DSV32ForCausalLM
from ..model.indexer import Indexer
from ..tokenizer import Tokenizer, tokenizer_files
from .data import JsonlSequences, PackedSequences, read_documents, split_documents, stdlib_documents
from ..distributed import init_distributed, shard_model
from .dsa import IndexerWarmup, SparseTraining, selection_report
from .evaluate import accuracy_summary, check_retrieval_tasks, lm_eval, retrieval_eval
from .objectives import LanguageModeling
from ..tasks import MixedSequences, get_task
from ..tasks.mixing import RETRIEVAL_TASKS, TASK_LOSSES
from .trainer import Trainer, TrainConfig
from ..validation import check_choice, check_int, check_number, is_int, require

Verb = Callable[..., argparse.ArgumentParser]


def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


# ------------------------------------------------------------------------------- flags
def _data_flags(p: argparse.ArgumentParser, seq_len: int) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--corpus", nargs="+", default=None,
                   help="text files or folders (default: this Python's standard library source)")
    g.add_argument("--max-bytes", type=int, default=4_000_000, help="cap on corpus bytes read (default 4e6)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of documents")
    g.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    g.add_argument("--tokenizer", default=None, help="'byte', or a tokenizer.json / folder (default: the model "
                                                     "folder's tokenizer.json, else byte)")


# TrainConfig's fields are flags of the same names; two keep the shorter names they had first,
# and `lr_overrides` is set by the verb (sparsify's --indexer-lr).
_TRAIN_ALIASES = {"bias_update_gamma": ["--bias-gamma"], "keep_checkpoints": ["--keep"]}
_TRAIN_HELP = {
    "steps": "optimizer steps in the whole run", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate",
    "warmup_steps": "linear warm-up steps", "min_lr_ratio": "cosine floor, as a fraction of the peak",
    "weight_decay": "AdamW weight decay", "betas": "AdamW betas", "eps": "AdamW eps",
    "grad_clip": "global grad-norm clip (0 = off)", "bias_update_gamma": "router bias update speed (0 = off)",
    "bf16": "bf16 autocast (CUDA only)", "activation_checkpointing": "recompute blocks in backward",
    "seed": "seeds the weights, the data order and the trainer", "log_every": "steps between log lines",
    "save_every": "steps between checkpoints (0 = only at the end)", "keep_checkpoints": "checkpoints to keep",
    "eval_every": "held-out evaluation cadence (0 = off)", "progress": "progress bar",
}


def _train_flags(p: argparse.ArgumentParser, *, steps: int, lr: float, warmup: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", help="run folder (metrics.jsonl, checkpoints/); required")
    g.add_argument("--task-fraction", type=float, default=0.25,
                   help="share of sequences that are retrieval examples (default 0.25)")
    g.add_argument("--tasks", type=_csv(str), default=list(RETRIEVAL_TASKS), help="retrieval tasks, comma-separated")
    g.add_argument("--task-loss", choices=TASK_LOSSES, default="all",
                   help="train task examples on every token (all) or on their answers only (answer)")
    g.add_argument("--data-jsonl", default=None, metavar="PATH",
                   help='train on a JSONL file of {"ids": [...], "labels": [...]} (labels -100 = not trained) '
                        "instead of the corpus mix")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--eval-sequences", type=int, default=8, help="held-out sequences per evaluation")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest checkpoint (or from CHECKPOINT)")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint (continue later with --resume)")
    add_config_flags(g, TrainConfig, defaults={"steps": steps, "lr": lr, "warmup_steps": warmup},
                     aliases=_TRAIN_ALIASES, help=_TRAIN_HELP, exclude=("lr_overrides",))


def _moe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE and MTP")
    g.add_argument("--balance-alpha", type=float, default=0.0, help="sequence-wise balance loss weight")
    g.add_argument("--mtp-weight", type=float, default=0.0, help="MTP loss weight (needs MTP layers)")


def register(verb: Verb) -> None:
    """Add the verbs through cli.py's `verb(name, help, handler)` helper."""
    p = verb("pretrain", "pretrain a model with dense attention on corpus text mixed with retrieval tasks",
             cmd_pretrain)
    p.add_argument("--model", default="small", help="a preset (tiny, small) or a config.json (default small)")
    _data_flags(p, 1024)
    _train_flags(p, steps=1000, lr=3e-3, warmup=50)
    _moe_flags(p)

    p = verb("sparsify", "DSA continued training: indexer warm-up, then sparse training (docs/math.md §8)",
             cmd_sparsify)
    p.add_argument("--stage", choices=["warmup", "sparse"], help="warmup or sparse; required")
    p.add_argument("--init", help="a run folder or HF-layout checkpoint to start from; required")
    p.add_argument("--topk", type=int, default=None,
                   help="make this the model's index_topk (its checkpoints record it; default: unchanged)")
    p.add_argument("--indexer-lr", type=float, default=None, help="peak lr of the indexers (default --lr)")
    p.add_argument("--indexer-weight", type=float, default=1.0, help="sparse stage: weight of the indexer KL")
    _data_flags(p, 1024)
    _train_flags(p, steps=200, lr=1e-3, warmup=20)
    _moe_flags(p)

    p = verb("eval", "held-out LM loss/perplexity, indexer recall and retrieval accuracy by length and depth; "
                     "--topk 64,128,256 sweeps k and tabulates", cmd_eval)
    p.add_argument("--model", help="a run folder, HF-layout checkpoint or preset name (random weights); required")
    p.add_argument("--out", default=None, help="folder for eval.json and the pictures (default: print only)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device, help=f"cpu or cuda (default: {device})")
    _data_flags(p, 1024)
    add_config_flags(p.add_argument_group("evaluation"), EvalConfig, choices={"attention": ATTENTION_CHOICES})


# ------------------------------------------------------------------------------- set-up
def _require(args: argparse.Namespace, *names: str) -> None:
    # Checked here rather than by argparse so that a --config file may supply them.
    for name in names:
        if getattr(args, name) is None:
            raise ValueError(f"--{name.replace('_', '-')} is required")


def _documents(args: argparse.Namespace):
    if args.corpus:
        docs = read_documents(args.corpus, max_bytes=args.max_bytes)
    else:
        docs = stdlib_documents(max_bytes=args.max_bytes)
    train, val = split_documents(docs, args.val_fraction)
    if not train:
        raise ValueError(f"the corpus has no documents left for training after the held-out split "
                         f"(--val-fraction {args.val_fraction}); give more documents or a smaller fraction")
    return train, val


def _check_seq_len(seq_len: int, cfg: ModelConfig) -> None:
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} is beyond the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")


def _held_out(args: argparse.Namespace, val_docs, n: int, tokenizer: Tokenizer) -> torch.Tensor:
    if not val_docs:
        raise ValueError(f"the corpus has no held-out documents at --val-fraction {args.val_fraction}; "
                         f"give a larger corpus or a larger fraction")
    return PackedSequences(val_docs, tokenizer, args.seq_len, shuffle=False).next_batch(n)


def _train_config(args: argparse.Namespace, lr_overrides: dict[str, float] | None = None) -> TrainConfig:
    return config_from_args(args, TrainConfig, lr_overrides=lr_overrides or {})


def _run(args: argparse.Namespace, model: DSV32ForCausalLM, tokenizer: Tokenizer, objective,
         evaluate_with: AttentionOptions, extra: dict[str, Any], lr_overrides: dict[str, float] | None = None) -> int:
    """Shared by pretrain and sparsify: data, trainer, fit, a one-line summary. `tokenizer`
    reads the corpus and the task text, and travels into every checkpoint (`tokenizer_files`)."""
    _check_seq_len(args.seq_len, model.config)
    check_retrieval_tasks(args.tasks)
    config = _train_config(args, lr_overrides)          # validates the numbers before reading data
    train_docs, val_docs = _documents(args)
    corpus = PackedSequences(train_docs, tokenizer, args.seq_len, seed=args.seed)
    if args.data_jsonl:
        data = JsonlSequences(args.data_jsonl, args.seq_len, pad_id=model.config.pad_token_id or 0, seed=args.seed)
    else:
        data = MixedSequences(corpus, tokenizer, task_fraction=args.task_fraction, tasks=args.tasks, seed=args.seed,
                              task_loss=args.task_loss)
    evaluate = None
    if args.eval_every:
        held_out = _held_out(args, val_docs, args.eval_sequences, tokenizer)

        def evaluate(m: DSV32ForCausalLM) -> dict[str, float]:
            out = lm_eval(m, held_out, attention=evaluate_with, batch_size=args.batch_size)
            report = selection_report(m, held_out[:2].to(args.device), attention=evaluate_with)
            return {**out, **report.recall(m.config.index_topk)}

    run_info = {"data": {"corpus": args.corpus or "stdlib", "max_bytes": args.max_bytes,
                         "val_fraction": args.val_fraction, "seq_len": args.seq_len,
                         "task_fraction": args.task_fraction, "tasks": args.tasks, "task_loss": args.task_loss,
                         "jsonl": args.data_jsonl}, **extra}
    info = init_distributed(args.device)
    if info.enabled:                      # torchrun: FSDP2 shards, DCP checkpoints, rank 0 reports
        shard_model(model)
    trainer = Trainer(model, objective, data, config, args.out, evaluate=evaluate, run_info=run_info, dist=info,
                      checkpoint_files=tokenizer_files(tokenizer))
    history = trainer.fit(resume=args.resume, stop_at=args.stop_at)
    last = history[-1] if history else None
    where = trainer.checkpointer.latest()
    if not info.is_main:
        return 0
    if last is None:
        print(f"nothing to do: {where} is already at step {trainer.step} of {config.steps}")
    else:
        print(f"step {trainer.step}/{config.steps}: loss {last['loss']:.4f}; checkpoint {where}")
    return 0


# ------------------------------------------------------------------------------- verbs
def cmd_pretrain(args: argparse.Namespace) -> int:
    _require(args, "out")
    path = Path(args.model)
    cfg = ModelConfig.from_hf_config(path) if path.suffix == ".json" else ModelConfig.preset(args.model)
    # A config.json's folder may hold the tokenizer it is meant for; a preset's is the byte tokenizer.
    tokenizer = load_model_tokenizer(path.parent if path.suffix == ".json" else args.model, args.tokenizer,
                                     cfg.vocab_size)
    torch.manual_seed(args.seed)
    model = DSV32ForCausalLM(cfg, init=False)
    model.init_weights(seed=args.seed)
    objective = LanguageModeling(balance_alpha=args.balance_alpha, mtp_weight=args.mtp_weight)
    return _run(args, model.to(args.device), tokenizer, objective, AttentionOptions(sparse=False),
                {"model": str(args.model)})


def cmd_sparsify(args: argparse.Namespace) -> int:
    _require(args, "stage", "init", "out")
    if args.stage not in ("warmup", "sparse"):    # a --config value escapes argparse's choices
        raise ValueError(f"--stage must be 'warmup' or 'sparse', got {args.stage!r}")
    model = load_model(args.init, device=args.device, seed=args.seed, flag="--init")
    tokenizer = load_model_tokenizer(args.init, args.tokenizer, model.config.vocab_size, flag="--init")
    if args.topk is not None:
        _record_topk(model, args.topk)
    if args.stage == "warmup":
        objective = IndexerWarmup()
        attention = AttentionOptions(sparse=False)
    else:
        objective = SparseTraining(indexer_weight=args.indexer_weight, balance_alpha=args.balance_alpha,
                                   mtp_weight=args.mtp_weight)
        attention = AttentionOptions(sparse=True)
    overrides = {".indexer.": args.indexer_lr} if args.indexer_lr else None
    return _run(args, model, tokenizer, objective, attention, {"init": str(args.init), "stage": args.stage},
                overrides)


def _record_topk(model: DSV32ForCausalLM, topk: int) -> None:
    """`sparsify --topk K`: K becomes the model's index_topk, which its checkpoints record and the
    next stage and `eval` default to. No rebuild: every layer reads index_topk from the model's
    one config object at each call (`AttentionOptions(topk=...)` overrides it for one call)."""
    check_int("--topk", topk, 1)
    if hasattr(model, "set_indexer_topk"):         # a retrofitted dense model (dsv32.model.gqa)
        model.set_indexer_topk(topk)
        return
    model.config.replace(index_topk=topk)          # validates the config with the new value
    model.config.index_topk = topk
    assert all(m.config is model.config for m in model.modules() if isinstance(m, Indexer))


# ------------------------------------------------------------------------------- eval
ATTENTION_CHOICES = ("dense", "sparse", "both")


def _as_tuple(value: Any) -> Any:
    # A config file may give a JSON list or a single value where the command line gives "a,b".
    if value is None or isinstance(value, tuple):
        return value
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass
class EvalConfig:
    """What `dsv32 eval` measures; every field is a flag of the same name (`cli.add_config_flags`),
    the tuple fields as comma-separated lists. One row per attention setting: dense (the
    reference) and sparse at each k of `topk`, read per call (no model rebuild)."""

    attention: str = field(default="both", metadata={"help": "dense, sparse or both (dense is the reference row)"})
    topk: tuple[int, ...] | None = field(default=None, metadata={
        "help": "keys per query of the sparse rows, one row each, e.g. 64,128,256; at most the longest sequence "
                "evaluated (none = the model's index_topk)"})
    tasks: tuple[str, ...] = field(default=RETRIEVAL_TASKS, metadata={"help": "retrieval tasks"})
    lengths: tuple[int, ...] = field(default=(512, 1024, 2048), metadata={"help": "retrieval prompt lengths in tokens"})
    depths: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0),
                                      metadata={"help": "needle depths in [0, 1] (0 = first, 1 = last)"})
    examples_per_cell: int = field(default=4, metadata={"help": "retrieval examples per (task, length, depth)"})
    eval_sequences: int = field(default=8, metadata={"help": "held-out sequences of --seq-len tokens for the LM loss"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward"})
    plot_layer: int = field(default=-1, metadata={"help": "layer of the selection pictures (-1 = the last)"})
    seed: int = field(default=0, metadata={"help": "seeds the retrieval examples"})

    def __post_init__(self) -> None:
        self.topk, self.tasks, self.lengths, self.depths = map(_as_tuple, (self.topk, self.tasks, self.lengths,
                                                                           self.depths))
        check_choice("attention", self.attention, ATTENTION_CHOICES)
        if self.topk is not None:
            require(len(self.topk) > 0, "topk", "one or more k values, or none", self.topk)
            for k in self.topk:
                require(is_int(k) and k >= 1, "topk", "integers >= 1 (keys per query)", k)
            require(self.attention != "dense", "topk", "none with attention 'dense' (k sets the sparse rows)",
                    self.topk)
            self.topk = tuple(dict.fromkeys(self.topk))
        for name in ("tasks", "lengths", "depths"):
            require(isinstance(getattr(self, name), tuple) and len(getattr(self, name)) > 0, name,
                    "one or more values", getattr(self, name))
        check_retrieval_tasks(self.tasks)
        for n in self.lengths:
            require(is_int(n) and n >= 1, "lengths", "integers >= 1 (prompt tokens)", n)
        for d in self.depths:
            check_number("depths", d, 0.0, 1.0)
        for name in ("examples_per_cell", "eval_sequences", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("plot_layer", self.plot_layer)
        check_int("seed", self.seed, 0)


def _check_eval_lengths(config: EvalConfig, seq_len: int) -> None:
    """Before any model is loaded: every k fits the sequences evaluated, every length fits every task."""
    longest = max(seq_len, *config.lengths)
    for k in config.topk or ():
        if k > longest:
            raise ValueError(f"--topk {k} is larger than the longest sequence this evaluation reads ({longest} "
                             f"tokens: --seq-len {seq_len}, --lengths up to {max(config.lengths)}); every query "
                             f"would keep all its keys, which is the dense row")
    for name in config.tasks:
        for n in config.lengths:
            try:
                get_task(name).make_example(random.Random(0), n, 0.5)
            except ValueError as e:
                raise ValueError(f"--lengths {n} is too short for task {name}: {e}") from None


def _attention_settings(config: EvalConfig, model: DSV32ForCausalLM) -> list[tuple[str, AttentionOptions]]:
    settings = [("dense", AttentionOptions(sparse=False))] if config.attention != "sparse" else []
    if config.attention != "dense":
        for k in config.topk or (model.config.index_topk,):
            settings.append((f"sparse k={k}", AttentionOptions(sparse=True, topk=k)))
    return settings


def _measure(model: DSV32ForCausalLM, tokenizer: Tokenizer, attention: AttentionOptions, config: EvalConfig,
             held_out: torch.Tensor):
    """One row of the sweep: LM loss/perplexity, (sparse) indexer recall at this k, retrieval
    metrics; and the selection report the recall came from (None for dense)."""
    lm = lm_eval(model, held_out, attention=attention, batch_size=config.batch_size)
    report, recall = None, {}
    if attention.sparse:
        device = next(model.parameters()).device
        report = selection_report(model, held_out[:1].to(device), attention=attention)
        recall = report.recall(attention.topk)
    rows = retrieval_eval(model, tokenizer, tasks=config.tasks, lengths=config.lengths, depths=config.depths,
                          examples_per_cell=config.examples_per_cell, attention=attention, seed=config.seed,
                          batch_size=config.batch_size)
    return {**lm, **recall, **accuracy_summary(rows), "retrieval": rows}, report


def sweep_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """A Markdown table of (label, measurements) pairs: one row per attention setting, one
    column per overall number (per-layer and per-task numbers stay in eval.json); '-' where a
    row has no such number (the dense row has no indexer recall)."""
    columns: list[str] = []
    for _, row in sorted(results, key=lambda item: -len(item[1])):
        columns += [key for key, value in row.items()
                    if isinstance(value, float) and "/" not in key and key not in columns]
    lines = ["| attention | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in results:
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.4f}" if c in row else "-" for c in columns) + " |")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    _require(args, "model")
    config = config_from_args(args, EvalConfig)
    _check_eval_lengths(config, args.seq_len)
    model = load_model(args.model, device=args.device).eval()
    tokenizer = load_model_tokenizer(args.model, args.tokenizer, model.config.vocab_size)
    _check_seq_len(args.seq_len, model.config)
    _, val_docs = _documents(args)
    held_out = _held_out(args, val_docs, config.eval_sequences, tokenizer)
    layer = config.plot_layer % model.config.num_hidden_layers
    out_dir = Path(args.out) if args.out else None
    source = str(resolve_model_dir(args.model)) if Path(args.model).is_dir() else str(args.model)
    results: dict[str, Any] = {"model": source, "index_topk": model.config.index_topk,
                               "topk": list(config.topk) if config.topk else None}
    table = []
    for label, attention in _attention_settings(config, model):
        row, report = _measure(model, tokenizer, attention, config, held_out)
        table.append((label, row))
        if attention.sparse:
            results.setdefault("sparse", {})[str(attention.topk)] = row
        else:
            results["dense"] = row
        recall = (f", indexer recall {row['indexer_recall']:.3f} (ceiling {row['indexer_recall_ceiling']:.3f})"
                  if report is not None else "")
        print(f"[{label}] held-out loss {row['lm_loss']:.4f} (ppl {row['perplexity']:.3f}){recall}, retrieval exact "
              f"match {row['accuracy']:.3f} (answer tokens {row['token_accuracy']:.3f}, NLL {row['answer_nll']:.3f})")
        _print_grid(row["retrieval"], config.lengths, config.depths)
        if out_dir is not None:
            from .plots import plot_retrieval_heatmap, plot_selection
            name = "dense" if report is None else f"sparse_k{attention.topk}"
            plot_retrieval_heatmap(row["retrieval"], out_dir / f"retrieval_{name}.png", title=f"{label} attention")
            if report is not None:
                plot_selection(report, layer, out_dir / f"selection_{name}_layer{layer}.png",
                               title=f"sparse attention, layer {layer}, top-{attention.topk}")
    print(f"\nheld-out LM ({held_out.shape[0]} x {held_out.shape[1]} tokens), indexer recall and retrieval "
          f"({', '.join(config.tasks)}; lengths {', '.join(map(str, config.lengths))}), by attention:")
    print(sweep_table(table))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out_dir / 'eval.json'} and pictures")
    return 0


def _print_grid(rows: list[dict], lengths: Sequence[int], depths: Sequence[float]) -> None:
    print("    length \\ depth " + "".join(f"{d:>7g}" for d in depths))
    for n in lengths:
        cells = []
        for d in depths:
            sel = [r for r in rows if r["length"] == n and r["depth"] == d]
            cells.append(sum(r["correct"] for r in sel) / max(1, sum(r["n"] for r in sel)))
        print(f"    {n:>15d} " + "".join(f"{c:>7.2f}" for c in cells))
