"""Does DSA keep retrieval? Train a small dense model on MQAR (`tasks.mqar`) until it
retrieves, convert it with the two DSA stages, and score every stage at several top-k.

    study = RecallStudy(StudySizes(seq_len=256, num_pairs=16))
    result = study.run()                    # dict: stages, the table rows, step times
    print(format_table(result))

Two model families (`StudySizes.family`): "mla", dsv32's own model (MLA, its indexer built in
from the start and idle while attention is dense), and "llama", a dense grouped-query model of
the Llama architecture (`model.gqa.GQAForCausalLM`) trained with no indexer at all, which gets
one attached after dense training (`checkpoint.hf_dense.attach_indexer`: the retrofit of a
checkpoint people already have). Everything after that is the same for both.

Stages, each through the shared `Trainer`:

1. dense: `LanguageModeling` with dense attention on answer-only MQAR batches, through the
   `curriculum` of (T, N) stages (2 pairs at T=32 first; the next stage once held-out accuracy
   on the current one reaches `stage_target`), until the held-out answer accuracy at the final
   (T, N) reaches `target` (checked every `check_every` steps) or `dense_steps` run out;
2. control: that model with sparse attention and its untrained indexer — what top-k keeps
   by luck (for "llama", the indexer as `attach_indexer` starts it, a low-rank copy of one kv
   group's attention);
3. warm-up: `dsa.IndexerWarmup` (main model frozen, indexer KL to the dense attention);
4. sparse: `dsa.SparseTraining` at k = T/8 (LM loss on the answers for the main model, KL on
   the selected set for the indexer);
5. with `continue_dense` (on by default), the equal-training baseline: the dense model trained `sparse_steps`
   more steps dense, on the same batches and learning rate as stage 4 (stage 4 trains the main
   model too, so its loss is compared with this one as well as with the model it started from).

Each is scored on one fixed held-out batch (`evaluate.mqar_eval`) at k = T/8, T/16, T/32
(top-k chosen at call time, `AttentionOptions.topk`): answer accuracy, answer NLL, needle
selected (the queried value's context position inside the query's top-k, per layer) and the
indexer's recall of the dense attention mass; and once more at 2T (same pairs, k the same
fractions of 2T). `by_distance` bins answer accuracy by how far back the needle is, for the
heatmaps. Step times are the mean trainer step of each stage and a timed forward+backward of
the same batch with dense and with sparse attention.

Left out: text retrieval tasks (the demo and `dsv32 eval` score those) and MoE (a dense MLP
model learns MQAR fastest; the conversion does not depend on the MLP).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..model import AttentionOptions, DSV32ForCausalLM
from ..model.gqa import GQAForCausalLM
from ..model.gqa_config import DenseConfig, IndexerSpec
from ..tasks.mqar import MQAR, MQARSequences, needle_positions
from .dsa import IndexerWarmup, SparseTraining
from .evaluate import mqar_eval
from .losses import IGNORE_INDEX
from .objectives import LanguageModeling
from .trainer import Trainer, TrainConfig

DENSE = AttentionOptions(sparse=False)
FAMILIES = ("mla", "llama")
CONTINUED = "dense, continued as long as sparse training"


@dataclass(frozen=True)
class StudySizes:
    seq_len: int = 1024
    num_pairs: int = 64
    vocab_size: int = 136           # 67 keys, 68 values: room for 64 pairs and the random filler
    power_a: float = 0.01
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    batch_size: int = 2             # sequences of the final T per step; curriculum stages keep the tokens
    lr: float = 1e-3
    dense_steps: int = 6000
    target: float = 0.95
    check_every: int = 100
    # (T, N) stages before the final (seq_len, num_pairs); () trains on the final task from the start
    curriculum: tuple[tuple[int, int], ...] = ((32, 2), (64, 4), (128, 8), (256, 16), (512, 32))
    stage_target: float = 0.9
    warmup_steps: int = 60
    warmup_lr: float = 3e-3
    sparse_steps: int = 60
    sparse_lr: float = 3e-4
    eval_examples: int = 32
    fractions: tuple[int, ...] = (8, 16, 32)        # k = T / fraction
    seed: int = 0
    show_answers: bool = False      # MQAR's show_answers: True lets later queries see earlier answers
    family: str = "mla"             # "mla" (DSV32ForCausalLM) or "llama" (GQAForCausalLM, indexer retrofitted)
    kv_heads: int | None = None     # "llama": key/value heads (None = heads); must divide heads
    continue_dense: bool = True     # also train the dense model sparse_steps more steps, dense (stage 5)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        kv = self.heads if self.kv_heads is None else self.kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.heads % kv:
            raise ValueError(f"kv_heads must be a positive int dividing heads={self.heads}, got {self.kv_heads!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")

    def task(self, seq_len: int | None = None, num_pairs: int | None = None) -> MQAR:
        return MQAR(vocab_size=self.vocab_size, num_pairs=num_pairs or self.num_pairs, seq_len=seq_len or self.seq_len,
                    power_a=self.power_a, show_answers=self.show_answers)

    def stages(self) -> tuple[tuple[int, int], ...]:
        """The dense stage's curriculum, ending at (seq_len, num_pairs)."""
        return tuple(tuple(stage) for stage in self.curriculum) + ((self.seq_len, self.num_pairs),)

    def model_config(self) -> ModelConfig:
        """`layers` MLA layers with dense MLPs, a 4-head indexer, index_topk = T/8."""
        h = self.hidden
        return ModelConfig(
            vocab_size=self.vocab_size, hidden_size=h, intermediate_size=2 * h, moe_intermediate_size=h // 2,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, q_lora_rank=h // 2, kv_lora_rank=h // 2,
            qk_nope_head_dim=h // self.heads, qk_rope_head_dim=16, v_head_dim=h // self.heads, index_n_heads=4,
            index_head_dim=32, index_topk=self.seq_len // self.fractions[0], n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=self.layers,
            max_position_embeddings=max(4 * self.seq_len, 4096), rope_theta=10000.0, dtype="float32")

    def dense_config(self) -> DenseConfig:
        """The "llama" family's model: `layers` Llama blocks, `heads` query / `kv_heads` kv heads
        of hidden / heads dims, SwiGLU width 2 * hidden, untied embeddings; no indexer."""
        h = self.hidden
        return DenseConfig(model_type="llama", vocab_size=self.vocab_size, hidden_size=h, intermediate_size=2 * h,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads if self.kv_heads is None else self.kv_heads,
                           head_dim=h // self.heads, max_position_embeddings=max(4 * self.seq_len, 4096),
                           rope_theta=10000.0)

    def indexer_spec(self) -> IndexerSpec:
        """The indexer the "llama" model gets: sized to it (`IndexerSpec.for_model`), k = T/8."""
        return IndexerSpec.for_model(self.dense_config(), topk=self.seq_len // self.fractions[0])

    def build(self) -> nn.Module:
        """The dense model of `family`, initialised from `seed`."""
        if self.family == "llama":
            model = GQAForCausalLM(self.dense_config(), init=False)
        else:
            model = DSV32ForCausalLM(self.model_config(), init=False)
        model.init_weights(seed=self.seed)
        return model

    def retrofit(self, model: nn.Module) -> nn.Module:
        """The trained dense model with an indexer: "mla" has one already (the model itself);
        "llama" gets a copy with one attached (`attach_indexer`)."""
        if self.family == "mla":
            return model
        from ..checkpoint.hf_dense import attach_indexer
        return attach_indexer(model, self.indexer_spec())


def by_distance(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, num_pairs: int, *,
                attention: AttentionOptions, bins: int = 5, batch_size: int = 8) -> list[dict[str, Any]]:
    """Answer accuracy binned by the needle's distance back from its query, as a share of the
    length: rows {"length", "depth" (bin centre, 0 = needle just before the query), "n",
    "accuracy"} for `plots.plot_retrieval_heatmap`."""
    T = ids.shape[1]
    right_all, dist_all = [], []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            x, y = ids[i:i + batch_size], labels[i:i + batch_size]
            pred = model(x, attention=attention).logits[:, :-1].argmax(-1)
            need = needle_positions(x, y, num_pairs)[:, 1:]
            counted = y[:, 1:] != IGNORE_INDEX
            query = torch.arange(T - 1).expand_as(need)
            right_all.append((pred == y[:, 1:])[counted])
            dist_all.append((query - need)[counted].float() / T)
    right, dist = torch.cat(right_all), torch.cat(dist_all)
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for b in range(bins):
        inside = (dist >= edges[b]) & ((dist < edges[b + 1]) if b < bins - 1 else (dist <= 1))
        n = int(inside.sum())
        rows.append({"task": "mqar", "length": T, "depth": round(float(edges[b] + edges[b + 1]) / 2, 3), "n": n,
                     "accuracy": float(right[inside].float().mean()) if n else 0.0,
                     "token_accuracy": float(right[inside].float().mean()) if n else 0.0, "correct": 0})
    return rows


def _median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class RecallStudy:
    sizes: StudySizes
    progress: bool = False
    log: Any = print
    result: dict[str, Any] = field(default_factory=dict)

    def _config(self, steps: int, lr: float, overrides: dict[str, float] | None = None) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=self.sizes.batch_size, lr=lr,
                           warmup_steps=max(1, min(30, steps // 10)), weight_decay=0.0, log_every=1, seed=self.sizes.seed, progress=self.progress,
                           lr_overrides=overrides or {})

    def _train(self, model, objective, steps: int, lr: float, stop=None,
               overrides: dict[str, float] | None = None, data: MQARSequences | None = None) -> list[dict[str, Any]]:
        data = data or MQARSequences(self.sizes.task(), seed=self.sizes.seed)
        return Trainer(model, objective, data, self._config(steps, lr, overrides), None).fit(stop=stop)

    def evaluate(self, model: nn.Module, label: str, attention_for_k) -> list[dict[str, Any]]:
        """Rows {stage, length, k, accuracy, answer_nll, needle_selected, indexer_recall} at T and 2T."""
        s = self.sizes
        rows = []
        model.eval()
        for length, (ids, labels) in self.held_out.items():
            for fraction in ([None] if attention_for_k is None else s.fractions):
                k = None if fraction is None else length // fraction
                attention = DENSE if k is None else attention_for_k(k)
                scores = mqar_eval(model, ids, labels, s.num_pairs, attention=attention, selection=k is not None)
                rows.append({"stage": label, "length": length, "k": k, **scores})
                self.log(f"  {label:<36} T={length:<5} k={k if k else '-':<5} accuracy {scores['accuracy']:.3f} "
                         f"NLL {scores['answer_nll']:.3f} needle {scores.get('needle_selected', float('nan')):.3f} "
                         f"recall {scores.get('indexer_recall', float('nan')):.3f}")
        return rows

    def run(self) -> dict[str, Any]:
        s = self.sizes
        torch.manual_seed(s.seed)
        self.held_out = {n: s.task(n).batch(torch.Generator().manual_seed(10_000 + s.seed), s.eval_examples)
                         for n in (s.seq_len, 2 * s.seq_len)}
        data = MQARSequences(s.task(), seed=s.seed, stages=s.stages())
        # one held-out batch per stage (the last is the final task's, as scored below)
        checks = [s.task(t, n).batch(torch.Generator().manual_seed(20_000 + s.seed + i), s.eval_examples)
                  for i, (t, n) in enumerate(s.stages()[:-1])] + [self.held_out[s.seq_len]]
        model = s.build()
        curve: list[tuple[int, int, int, float]] = []            # (step, stage T, stage N, held-out accuracy)

        def reached(record: dict[str, Any]) -> bool:
            if record["step"] % s.check_every:
                return False
            task, (ids, labels) = data.current, checks[data.stage]
            acc = mqar_eval(model, ids, labels, task.num_pairs, attention=DENSE, selection=False)["accuracy"]
            curve.append((record["step"], task.seq_len, task.num_pairs, acc))
            self.log(f"  dense step {record['step']} (T={task.seq_len}, {task.num_pairs} pairs): "
                     f"loss {record['loss']:.3f}, held-out accuracy {acc:.3f}")
            if data.last_stage:
                return acc >= s.target
            if acc >= s.stage_target:
                data.advance()
            return False

        start = time.perf_counter()
        dense_hist = self._train(model, LanguageModeling(), s.dense_steps, s.lr, stop=reached, data=data)
        seconds = {"dense": time.perf_counter() - start}
        sparse_at = lambda k: AttentionOptions(sparse=True, topk=k)          # noqa: E731
        rows = self.evaluate(model, "dense", None)
        self.models = {"dense": model}
        if s.continue_dense:
            longer = copy.deepcopy(model)
            start = time.perf_counter()
            self._train(longer, LanguageModeling(), s.sparse_steps, s.sparse_lr)
            seconds["dense_continued"] = time.perf_counter() - start
            rows += self.evaluate(longer, CONTINUED, None)
            self.models["dense_continued"] = longer
        converted = s.retrofit(model)
        rows += self.evaluate(converted, "sparse, untrained indexer (control)", sparse_at)

        warm = copy.deepcopy(converted)
        start = time.perf_counter()
        warm_hist = self._train(warm, IndexerWarmup(), s.warmup_steps, s.warmup_lr)
        seconds["warmup"] = time.perf_counter() - start
        rows += self.evaluate(warm, "sparse, after warm-up", sparse_at)

        sparse = copy.deepcopy(warm)
        start = time.perf_counter()
        sparse_hist = self._train(sparse, SparseTraining(), s.sparse_steps, s.sparse_lr,
                                  overrides={".indexer.": s.warmup_lr})
        seconds["sparse"] = time.perf_counter() - start
        rows += self.evaluate(sparse, "sparse, after sparse training", sparse_at)

        self.models.update(control=converted, warm=warm, sparse=sparse)
        self.result = {"sizes": asdict(s), "rows": rows, "dense_curve": curve, "dense_steps_run": len(dense_hist),
                       "dense_final_stage": data.last_stage,
                       "seconds": seconds, "step_s": {
                           "dense_train": statistics.median(r["step_s"] for r in dense_hist),
                           "warmup_train": statistics.median(r["step_s"] for r in warm_hist),
                           "sparse_train": statistics.median(r["step_s"] for r in sparse_hist)},
                       "fwd_bwd_s": self.time_forward_backward(sparse)}
        return self.result

    def time_forward_backward(self, model: nn.Module) -> dict[str, float]:
        """Median seconds of one forward+backward of the LM loss on a training batch, dense and
        sparse (k = T/8), same weights."""
        s = self.sizes
        batch = MQARSequences(s.task(), seed=s.seed + 1).next_batch(s.batch_size)
        model.train()
        out = {}
        k = s.seq_len // s.fractions[0]
        for name, attention in (("dense", DENSE), ("sparse", AttentionOptions(sparse=True, topk=k))):
            objective = LanguageModeling(attention=attention)

            def step():
                objective(model, batch).loss.backward()
                model.zero_grad(set_to_none=True)
            step()                                                                # warm up
            out[name] = _median_seconds(step)
        return out


def format_table(result: dict[str, Any]) -> str:
    """The study's rows as a Markdown table (one line per stage, length and k; needle selected
    layer by layer: an induction head needs the needle in its last layer, while the first
    layer attends to the previous token)."""
    lines = ["| stage | T | k | accuracy | answer NLL | needle selected (per layer) | recall of dense mass |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        k = "dense" if r["k"] is None else f"{r['k']} (T/{r['length'] // r['k']})"
        layers = sorted((key for key in r if key.startswith("needle_selected/layer")), key=lambda x: int(x[21:]))
        needle = " / ".join(f"{r[key]:.3f}" for key in layers) if layers else "-"
        recall = f"{r['indexer_recall']:.3f}" if "indexer_recall" in r else "-"
        lines.append(f"| {r['stage']} | {r['length']} | {k} | {r['accuracy']:.3f} | {r['answer_nll']:.3f} | "
                     f"{needle} | {recall} |")
    return "\n".join(lines)


def format_step_times(result: dict[str, Any]) -> str:
    """One line: the median trainer step of each stage and one timed forward+backward, dense and
    sparse at k = T/8, and each stage's seconds."""
    st, fb = result["step_s"], result["fwd_bwd_s"]
    return (f"median trainer step: dense {st['dense_train']:.3f} s, warm-up {st['warmup_train']:.3f} s, sparse "
            f"{st['sparse_train']:.3f} s (with the indexer KL); forward+backward of one batch: dense "
            f"{fb['dense']:.4f} s, sparse k=T/8 {fb['sparse']:.4f} s; stage seconds "
            f"{({k: round(v, 1) for k, v in result['seconds'].items()})}")
