"""`dsv32 demo`: the whole story on the embedded default, in minutes on a laptop CPU.

    1. build a small MoE model (MLA + DSA indexer + DeepSeekMoE) and check its HF round trip;
    2. pretrain it dense on the default corpus (the Python stdlib's source) mixed with
       long-context retrieval tasks;
    3. convert it to sparse attention: indexer warm-up (dense, KL to the attention), then
       sparse training with top-k = T/8 (docs/math.md §8);
    4. evaluate dense vs sparse on held-out text and the retrieval tasks, with the indexer's
       recall before/after warm-up and after sparse training, and draw the causal mask beside
       the indexer's actual selection;
    4b. retrieval on a task built for it: a separate small dense model trained on MQAR
        (multi-query associative recall over integer ids, answer-only loss) through a
        curriculum over pair counts until it retrieves, converted with the same two DSA
        stages, scored dense, sparse with the untrained indexer (the control) and converted
        sparse (`training.recall_study`);
    5. a short SFT on arithmetic, then GRPO steps with all four V3.2 stabilisers;
    6. generate samples, time sparse vs dense attention;
    7. write `report.md` with the numbers and PNG plots, and print where it is.

Each stage saves its result under the output folder; a second run reuses finished stages
(unless `--fresh`). `quick=True` shrinks everything so the whole job takes well under a
minute (used by the tests); the numbers are then only a smoke signal.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ModelConfig
from .model import AttentionOptions, DSV32ForCausalLM


@dataclass(frozen=True)
class DemoSizes:
    seq_len: int
    topk: int
    pretrain_steps: int
    warmup_steps: int
    sparse_steps: int
    batch_size: int
    corpus_bytes: int
    eval_sequences: int
    retrieval_lengths: tuple[int, ...]
    retrieval_depths: tuple[float, ...]
    examples_per_cell: int
    sft_steps: int
    grpo_steps: int
    speed_lengths: tuple[int, ...]
    recall: Any = None                        # training.recall_study.StudySizes of stage 4b


def _recall_sizes(quick: bool):
    from .training.recall_study import StudySizes
    if quick:
        return StudySizes(seq_len=64, num_pairs=4, vocab_size=32, hidden=32, batch_size=4, dense_steps=4, check_every=2,
                          curriculum=((32, 2),), warmup_steps=2, sparse_steps=2, eval_examples=4)
    # The curriculum (2 pairs at T=32, then 4 at T=64, then the final 8 at T=128) is what makes the
    # binding learnable here: trained on 8 pairs from the start, the model sits at the 1/8 floor for
    # thousands of steps (README, "Retrieval: does DSA keep it?").
    return StudySizes(seq_len=128, num_pairs=8, vocab_size=64, batch_size=16, dense_steps=2000, check_every=50,
                      curriculum=((32, 2), (64, 4)), warmup_steps=40, sparse_steps=40, eval_examples=32)


FULL = DemoSizes(seq_len=1024, topk=128, pretrain_steps=400, warmup_steps=60, sparse_steps=60, batch_size=8,
                 corpus_bytes=3_000_000, eval_sequences=16, retrieval_lengths=(500, 1000),
                 retrieval_depths=(0.0, 0.25, 0.5, 0.75, 1.0), examples_per_cell=4, sft_steps=300, grpo_steps=30,
                 speed_lengths=(1024, 4096, 8192), recall=_recall_sizes(False))
QUICK = DemoSizes(seq_len=512, topk=64, pretrain_steps=4, warmup_steps=2, sparse_steps=2, batch_size=2,
                  corpus_bytes=150_000, eval_sequences=2, retrieval_lengths=(480,), retrieval_depths=(0.0, 1.0),
                  examples_per_cell=1, sft_steps=3, grpo_steps=2, speed_lengths=(256, 512), recall=_recall_sizes(True))

RETRIEVAL = ("passkey", "variable_tracking")
ARITHMETIC = {"digits": 1, "ops": "+"}


def demo_config(sizes: DemoSizes) -> ModelConfig:
    """A 3-layer model: one dense MLP layer, then two DeepSeekMoE layers with 8 routed experts in
    2 groups (top-2, one group kept) and a shared expert; 4 MLA heads; a 4-head indexer."""
    return ModelConfig(
        vocab_size=259, hidden_size=96, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=16,
        v_head_dim=24, index_n_heads=4, index_head_dim=32, index_topk=sizes.topk, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        max_position_embeddings=16384, rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        dtype="float32")


class _Stages:
    """Runs named stages once; a finished stage's result (JSON) is read back on the next run."""

    def __init__(self, out: Path, total: int) -> None:
        self.out, self.total, self.n = out, total, 0
        self.results: dict[str, Any] = {}

    def run(self, name: str, title: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        self.n += 1
        folder = self.out / name
        done = folder / "result.json"
        if done.is_file():
            result = json.loads(done.read_text())
            print(f"[{self.n}/{self.total}] {title}: done before, reusing {folder}")
        else:
            print(f"[{self.n}/{self.total}] {title} ...", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            result = fn(folder)
            result["seconds"] = time.perf_counter() - start
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(done)
            print(f"      {title}: {result['seconds']:.0f} s")
        self.results[name] = result
        return result


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, *, quick: bool = False, fresh: bool = False) -> Path:
    from .checkpoint import load_pretrained
    out = Path(out_dir)
    sizes = QUICK if quick else FULL
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"quick": quick, "seed": seed, "sizes": {**sizes.__dict__, "recall": sizes.recall.__dict__}}
    marker = out / "settings.json"
    if marker.exists() and json.loads(marker.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{out} holds a demo run with other settings; pass --fresh to start over or use another --out")
    marker.write_text(json.dumps(settings, indent=1) + "\n")
    torch.manual_seed(seed)
    stages = _Stages(out, total=9)
    cfg = demo_config(sizes)

    def latest(stage: str) -> DSV32ForCausalLM:
        from .cli import resolve_model_dir
        return load_pretrained(resolve_model_dir(out / stage))

    stages.run("build", "build the model and check its Hugging Face round trip", lambda f: _build(cfg, f, seed))
    stages.run("pretrain", f"pretrain dense at T={sizes.seq_len} on stdlib source + retrieval tasks",
               lambda f: _train(load_pretrained(out / "build" / "model"), "pretrain", f, sizes, seed))
    stages.run("warmup", "DSA stage 1: indexer warm-up (dense attention, KL to its mass)",
               lambda f: _train(latest("pretrain"), "warmup", f, sizes, seed))
    stages.run("sparse", f"DSA stage 2: sparse training with top-k {sizes.topk} = T/{sizes.seq_len // sizes.topk}",
               lambda f: _train(latest("warmup"), "sparse", f, sizes, seed))
    stages.run("evaluate", "evaluate dense vs sparse: held-out loss, retrieval, indexer recall",
               lambda f: _evaluate(latest("pretrain"), latest("warmup"), latest("sparse"), f, sizes, seed))
    stages.run("recall", "retrieval on MQAR: dense, then both DSA stages (a separate small model)",
               lambda f: _recall(f, sizes))
    stages.run("grpo", "SFT warm start on arithmetic, then GRPO with all four V3.2 stabilisers",
               lambda f: _grpo(latest("sparse"), f, sizes, seed))
    stages.run("samples", "generate samples and time sparse vs dense attention",
               lambda f: _samples_and_speed(load_pretrained(out / "grpo" / "policy"), f, sizes, seed))
    report = stages.run("report", "write the report", lambda f: {"path": str(_report(out, stages.results, sizes))})
    print(f"report: {report['path']}")
    return Path(report["path"])


# ------------------------------------------------------------------------------ stages
def _build(cfg: ModelConfig, folder: Path, seed: int) -> dict[str, Any]:
    from .checkpoint import load_pretrained
    model = DSV32ForCausalLM(cfg)
    model.init_weights(seed=seed)
    model.save_pretrained(folder / "model")
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 load_pretrained(folder / "model").state_dict().values()))
    if not same:
        raise RuntimeError("the checkpoint round trip changed the weights")
    return {"parameters": model.num_parameters(), "layers": cfg.num_hidden_layers, "moe_layers": cfg.num_moe_layers,
            "experts": cfg.n_routed_experts, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "round_trip": "identical"}


def _data(sizes: DemoSizes, seed: int):
    from .tokenizer import ByteTokenizer
    from .training.data import PackedSequences, split_documents, stdlib_documents
    from .tasks import MixedSequences
    docs = stdlib_documents(max_bytes=sizes.corpus_bytes)
    train_docs, val_docs = split_documents(docs, 0.05)
    if not val_docs or not train_docs:        # a very small corpus (quick mode): hold out one file
        train_docs, val_docs = docs[:-1], docs[-1:]
    tok = ByteTokenizer()
    corpus = PackedSequences(train_docs, tok, sizes.seq_len, seed=seed)
    # Answer-only loss on the task examples, at prompt lengths from just under the shortest
    # evaluation length to the full sequence, so training covers the lengths evaluation asks at.
    mixed = MixedSequences(corpus, tok, task_fraction=0.25, tasks=RETRIEVAL, seed=seed, task_loss="answer",
                           length_range=(min(sizes.retrieval_lengths) - 10, sizes.seq_len - 33))
    held = PackedSequences(val_docs, tok, sizes.seq_len, seed=seed + 1, shuffle=False)
    return mixed, held.next_batch(sizes.eval_sequences)


def _train(model: DSV32ForCausalLM, stage: str, folder: Path, sizes: DemoSizes, seed: int) -> dict[str, Any]:
    from .training.dsa import IndexerWarmup, SparseTraining
    from .training.objectives import LanguageModeling
    from .training.trainer import TrainConfig, Trainer
    data, _ = _data(sizes, seed)
    if stage == "pretrain":
        objective, steps, lr, overrides = LanguageModeling(), sizes.pretrain_steps, 3e-3, {}
    elif stage == "warmup":
        objective, steps, lr, overrides = IndexerWarmup(), sizes.warmup_steps, 3e-3, {}
    else:
        objective, steps, lr, overrides = SparseTraining(), sizes.sparse_steps, 3e-4, {".indexer.": 1e-3}
    config = TrainConfig(steps=steps, batch_size=sizes.batch_size, lr=lr, lr_overrides=overrides,
                         warmup_steps=max(1, steps // 10), log_every=1, seed=seed)
    trainer = Trainer(model, objective, data, config, folder)
    history = trainer.fit()
    last = history[-1]
    keep = ("loss", "lm_loss", "indexer_kl", "tokens_per_s", "step_s")
    return {"steps": steps, "final": {k: last[k] for k in keep if k in last},
            "mean_step_s": sum(r["step_s"] for r in history) / len(history)}


def _evaluate(pretrained, warmed, sparse_model, folder: Path, sizes: DemoSizes, seed: int) -> dict[str, Any]:
    from .tokenizer import ByteTokenizer
    from .training.dsa import selection_report
    from .training.evaluate import accuracy_summary, lm_eval, retrieval_eval
    from .training.plots import plot_retrieval_heatmap, plot_selection
    _, held = _data(sizes, seed)
    dense, sparse = AttentionOptions(sparse=False), AttentionOptions(sparse=True)
    result: dict[str, Any] = {}
    sample = held[:1]
    for label, model in (("before warm-up", pretrained), ("after warm-up", warmed), ("after sparse training",
                                                                                    sparse_model)):
        rep = selection_report(model.eval(), sample, attention=dense if label != "after sparse training" else sparse)
        result.setdefault("recall", {})[label] = rep.recall(model.config.index_topk)
        if label == "after sparse training":
            plot_selection(rep, model.config.num_hidden_layers - 1, folder / "selection.png",
                           title=f"last layer, top-{model.config.index_topk} of T={sizes.seq_len}")
    tok = ByteTokenizer()
    rows_by_mode = {}
    for mode, model, attention in (("dense (pretrained)", pretrained, dense),
                                   ("dense (converted weights)", sparse_model, dense),
                                   ("sparse (converted)", sparse_model, sparse)):
        lm = lm_eval(model, held, attention=attention, batch_size=sizes.batch_size)
        rows = retrieval_eval(model, tok, tasks=RETRIEVAL, lengths=sizes.retrieval_lengths,
                              depths=sizes.retrieval_depths, examples_per_cell=sizes.examples_per_cell,
                              attention=attention, seed=seed, batch_size=sizes.batch_size)
        rows_by_mode[mode] = rows
        result[mode] = {**lm, **accuracy_summary(rows)}
        if "weights" not in mode:
            plot_retrieval_heatmap(rows, folder / f"retrieval_{mode.split()[0]}.png", title=f"{mode} attention")
    result["retrieval_rows"] = rows_by_mode
    return result


def _recall(folder: Path, sizes: DemoSizes) -> dict[str, Any]:
    from .training.plots import plot_retrieval_heatmap
    from .training.recall_study import RecallStudy, by_distance, format_table
    s = sizes.recall
    study = RecallStudy(s, log=lambda line: None)
    result = study.run()
    k = s.seq_len // s.fractions[0]
    for name, model, attention in (("dense", study.models["dense"], AttentionOptions(sparse=False)),
                                   ("control", study.models["control"], AttentionOptions(sparse=True, topk=k)),
                                   ("sparse", study.models["sparse"], AttentionOptions(sparse=True, topk=k))):
        cells = [c for ids, labels in study.held_out.values()
                 for c in by_distance(model.eval(), ids, labels, s.num_pairs, attention=attention)]
        plot_retrieval_heatmap(cells, folder / f"mqar_{name}.png", title=f"MQAR, {name} (k={k})",
                               value="token_accuracy",
                               xlabel="needle distance back from the query / length")
    result["table"] = format_table(result)
    return result


def _grpo(model: DSV32ForCausalLM, folder: Path, sizes: DemoSizes, seed: int) -> dict[str, Any]:
    from .rl import GRPOConfig, train_eval_split, train_grpo
    from .rl.plot import plot_curves
    from .rl.rollout import greedy_accuracy
    from .rl.sft import SFTConfig, train_sft
    from .tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    # 1-digit additions have 100 prompts; the held-out ones never occur in training, so a larger held-out set
    # leaves too few to learn addition from (64 held out: 49 distinct training prompts, and the converted model
    # memorises them: 0.03-0.09 held-out after SFT; 32 held out: 73, and 0.59-0.75).
    train, held = train_eval_split("arithmetic", 2000, 16 if sizes is QUICK else 32, seed=seed, options=ARITHMETIC)
    before = greedy_accuracy(model, tok, held, max_new_tokens=4)
    from .training.checkpointing import CheckpointFolder
    sft_run = folder / "sft"                   # a stage killed during SFT resumes it
    train_sft(model, tok, train, SFTConfig(steps=sizes.sft_steps, batch_size=32, lr=3e-3, warmup_steps=2,
                                           seed=seed), out_dir=sft_run, metrics_name="sft_metrics.jsonl",
              resume=CheckpointFolder(sft_run / "checkpoints").latest() is not None)
    after_sft = greedy_accuracy(model, tok, held, max_new_tokens=4)
    config = GRPOConfig(steps=sizes.grpo_steps, prompts_per_step=16, group_size=4, max_new_tokens=4, lr=3e-5,
                        top_p=0.95, temperature=1.0, ppo_epochs=2, minibatches=2, beta=0.01,
                        kl_estimator="unbiased", delta=0.5, keep_routing=True, keep_sampling_mask=True,
                        eval_every=sizes.grpo_steps, seed=seed, checkpoint_every=0)
    history = train_grpo(model, tok, train, config, out_dir=folder / "run", eval_examples=held)
    model.save_pretrained(folder / "policy")
    plot_curves({"grpo": history}, folder / "curves.png", title="GRPO with unbiased KL, off-policy mask, "
                                                                "keep routing, keep sampling mask")
    keys = ("reward_mean", "accuracy", "kl", "clip_frac", "masked_frac", "ratio_mean", "ratio_max", "mismatch",
            "entropy")
    return {"accuracy_before_sft": before, "accuracy_after_sft": after_sft,
            "accuracy_after_grpo": history[-1].get("eval_accuracy"), "steps": len(history),
            "history": [{k: r.get(k) for k in ("step",) + keys} for r in history]}


def _samples_and_speed(model: DSV32ForCausalLM, folder: Path, sizes: DemoSizes, seed: int) -> dict[str, Any]:
    from .inference import generate
    from .tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    prompts = ["def read_config(path):\n", "Question: What is 4 + 3?\nAnswer: "]
    res = generate(model.eval(), [tok.encode(p) for p in prompts], max_new_tokens=48 if sizes is FULL else 8,
                   temperature=0.7, top_p=0.9, seed=seed, stop_tokens=[tok.eos_id])
    samples = [{"prompt": p, "completion": tok.decode(c)} for p, c in zip(prompts, res.completions())]
    speed = []
    for T in sizes.speed_lengths:
        model_k = model.config.index_topk
        x = torch.randint(0, 256, (1, T))
        times = {}
        for mode in ("dense", "sparse"):
            opts = AttentionOptions(sparse=mode == "sparse")
            with torch.no_grad():
                model(x[:, :64], attention=opts)
                start = time.perf_counter()
                model(x, attention=opts)
            times[mode] = time.perf_counter() - start
        speed.append({"T": T, "k": model_k, "dense_s": times["dense"], "sparse_s": times["sparse"]})
    decode_tps = float(res.lengths.sum()) / res.seconds
    return {"samples": samples, "prefill": speed, "decode_tokens_per_s": decode_tps}


# ------------------------------------------------------------------------------ report
def _train_curves(out: Path, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .training.metrics import read_metrics
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, stage, key, title in ((axes[0], "pretrain", "loss", "pretraining (dense): LM loss"),
                                  (axes[1], "warmup", "indexer_kl", "indexer warm-up: KL"),
                                  (axes[2], "sparse", "lm_loss", "sparse training: LM loss")):
        records = read_metrics(out / stage / "metrics.jsonl")
        points = [(r["step"], r[key]) for r in records if r.get("kind") == "train" and key in r]
        if points:
            ax.plot(*zip(*points))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _recall_section(rc: dict[str, Any]) -> list[str]:
    s = rc["sizes"]
    T, N = s["seq_len"], s["num_pairs"]
    final = [acc for _, t, n, acc in rc["dense_curve"] if (t, n) == (T, N)]
    stages = " -> ".join(f"{n} pairs at T={t}" for t, n in [*s["curriculum"], (T, N)])
    return [
        "## Retrieval: does DSA keep it?", "",
        f"The corpus model above does not learn to retrieve in this budget (its retrieval numbers are near zero), "
        f"so the demo trains a separate {s['layers']}-layer dense-MLP model (hidden {s['hidden']}) on MQAR: "
        f"{N} key-value pairs over integer ids (vocabulary {s['vocab_size']}) in sequences of T={T}, each key "
        f"queried once, loss on the answers only, the answers only in the labels. A curriculum ({stages}; the next "
        f"stage once held-out accuracy reaches {s['stage_target']}) lets the key-value binding form: trained on "
        f"{N} pairs from the start, the model sits at the 1/{N} floor of guessing among the context's values. "
        f"It trained {rc['dense_steps_run']} steps (held-out accuracy at T={T}: "
        f"{final[-1] if final else float('nan'):.3f}, target {s['target']}), then the two DSA stages "
        f"({s['warmup_steps']} warm-up and {s['sparse_steps']} sparse steps at k=T/8). Chance is "
        f"{1 / (s['vocab_size'] - s['vocab_size'] // 2):.3f}; picking any of the {N} values in the context gives "
        f"{1 / N:.3f}. The control is the dense model with sparse attention through its untrained indexer. Needle "
        "selected: the share of answer-bearing context positions inside the query's top-k, per layer; recall: "
        "dense attention mass inside the top-k.", "",
        rc["table"], "",
        "Answer accuracy by how far back the needle is (rows: length, T and 2T), dense, control and converted "
        "sparse at k=T/8:", "",
        "![MQAR dense](recall/mqar_dense.png)", "![MQAR control](recall/mqar_control.png)",
        "![MQAR sparse](recall/mqar_sparse.png)", ""]


def _report(out: Path, r: dict[str, Any], sizes: DemoSizes) -> Path:
    _train_curves(out, out / "report" / "training_curves.png")
    b, ev, g, s = r["build"], r["evaluate"], r["grpo"], r["samples"]
    lines = [
        "# dsv32 demo report",
        "",
        f"A {b['parameters']:,}-parameter DeepSeek-V3.2-style model ({b['layers']} layers, {b['moe_layers']} "
        f"DeepSeekMoE with {b['experts']} experts, {b['heads']} MLA heads, hidden {b['hidden']}) trained on 2 CPU "
        f"cores from scratch: dense pretraining at T={sizes.seq_len}, then the two DSA stages with top-k "
        f"{sizes.topk}, then GRPO. Checkpoint round trip through the Hugging Face layout: {b['round_trip']}.",
        "",
        "## Stages",
        "",
        "| stage | steps | final | seconds |",
        "|---|---|---|---|",
    ]
    for stage in ("pretrain", "warmup", "sparse"):
        st = r[stage]
        final = ", ".join(f"{k} {v:.4g}" for k, v in st["final"].items() if k in ("loss", "lm_loss", "indexer_kl"))
        lines.append(f"| {stage} | {st['steps']} | {final} | {st['seconds']:.0f} |")
    lines.append(f"| GRPO (+ SFT) | {g['steps']} | accuracy {g['accuracy_after_grpo']} | {g['seconds']:.0f} |")
    lines += ["", "![training curves](report/training_curves.png)", "",
              "## Dense vs sparse", "",
              "| attention | held-out LM loss | perplexity | retrieval exact match | answer-token accuracy |",
              "|---|---|---|---|---|"]
    for mode in ("dense (pretrained)", "dense (converted weights)", "sparse (converted)"):
        m = ev[mode]
        lines.append(f"| {mode} | {m['lm_loss']:.4f} | {m['perplexity']:.3f} | {m['accuracy']:.3f} | "
                     f"{m['token_accuracy']:.3f} |")
    lines += ["", "Indexer recall (share of the dense attention mass inside the selected top-k set; the ceiling "
              "is the mass of the best possible k keys):", "", "| when | recall | ceiling |", "|---|---|---|"]
    for label, rec in ev["recall"].items():
        lines.append(f"| {label} | {rec['indexer_recall']:.3f} | {rec['indexer_recall_ceiling']:.3f} |")
    lines += ["", "![dense retrieval](evaluate/retrieval_dense.png)", "![sparse retrieval](evaluate/retrieval_sparse.png)",
              "", "The causal mask beside the indexer's actual selection, and the dense attention mass it captures:",
              "", "![selection](evaluate/selection.png)", ""]
    lines += _recall_section(r["recall"])
    lines += [
              "## GRPO with the four V3.2 stabilisers", "",
              f"Greedy accuracy on held-out 1-digit additions: {g['accuracy_before_sft']:.3f} before SFT, "
              f"{g['accuracy_after_sft']:.3f} after SFT, {g['accuracy_after_grpo']:.3f} after {g['steps']} GRPO steps "
              "(unbiased KL, off-policy sequence masking, keep routing, keep sampling mask). The held-out "
              "additions never occur in training; the reward column is the mean sampled reward on the "
              "training prompts of each step, which the SFT has largely memorised.", "",
              "| step | reward | KL | clip frac | masked frac | ratio mean | ratio max | mismatch |",
              "|---|---|---|---|---|---|---|---|"]
    for h in g["history"]:
        lines.append("| " + " | ".join(f"{h[k]:.4g}" if isinstance(h[k], float) else str(h[k]) for k in
                                        ("step", "reward_mean", "kl", "clip_frac", "masked_frac", "ratio_mean",
                                         "ratio_max", "mismatch")) + " |")
    lines += ["", "![GRPO curves](grpo/curves.png)", "", "## Samples", ""]
    for sample in s["samples"]:
        lines += ["```", sample["prompt"] + sample["completion"], "```", ""]
    lines += ["## Speed (this model, this machine)", "",
              f"Decode: {s['decode_tokens_per_s']:.1f} tokens/s (batch of 2, latent cache). Prefill of the whole "
              "model, dense vs sparse attention (a model this small is dominated by everything but attention; the "
              "attention-only comparison at V3.2 dims is in the README's benchmark tables):", "",
              "| T | k | dense s | sparse s |", "|---|---|---|---|"]
    for row in s["prefill"]:
        lines.append(f"| {row['T']} | {row['k']} | {row['dense_s']:.3f} | {row['sparse_s']:.3f} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
