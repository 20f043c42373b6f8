"""Evaluation: held-out language-modelling loss and perplexity, and long-context retrieval
accuracy by prompt length and needle depth (exact match).

Exact match is decided by teacher forcing, in one forward pass per example: the model reads
`prompt + answer + EOS`, and the example counts as solved iff, at every position from the
last prompt token on, the argmax of the logits is the next reference token — every answer
token and then EOS. That is exactly the condition under which greedy decoding from the
prompt produces the answer and stops: by induction each greedy step sees the same prefix as
the teacher-forced pass. It is slightly stricter than `score_exact` on a greedy completion,
which would also forgive whitespace around the answer.

Graded metrics beside exact match: answer-token accuracy and answer NLL (they move before
exact match does), and "needle selected": for each position that predicts an answer token,
the share of the answer-bearing key positions (the needle's copy of the answer in the prompt;
for MQAR the value after the queried key) that the indexer's top-k for that query contains,
per layer (`needle_selected`; the selection is the indexer's own, as `dsa.selection_report`
computes it, so with dense attention it says what switching top-k on would keep). MQAR
(`tasks.mqar`) is scored by `mqar_eval`, with the same metrics and the indexer's recall of the
dense attention mass.

Left out: sampling-based evaluation (pass@k) and the reasoning tasks (their answers are
checked by verifiers, not by exact match against one reference).
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..model import AttentionOptions, DSV32ForCausalLM
from ..tokenizer import Tokenizer
from ..tasks import TASKS, get_task
from ..tasks.mqar import answer_accuracy, needle_positions
from ..tasks.retrieval import fit_to_tokens


@torch.no_grad()
def lm_eval(model: DSV32ForCausalLM, sequences: torch.Tensor, *, attention: AttentionOptions,
            batch_size: int = 4) -> dict[str, float]:
    """Mean next-token loss over sequences (N, T) and its perplexity exp(loss)."""
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (N, T) with T >= 2, got {tuple(sequences.shape)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, sequences.shape[0], batch_size):
        batch = sequences[i:i + batch_size].to(device)
        logits = model(batch, attention=attention).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    loss = total / count
    return {"lm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def check_retrieval_tasks(names: Sequence[str]) -> None:
    """Raise ValueError naming the first unknown or non-retrieval task in `names`."""
    for name in names:
        task = get_task(name)                # raises on an unknown name, listing the known ones
        if task.kind != "retrieval":
            raise ValueError(f"task {name!r} is a {task.kind} task; retrieval tasks are "
                             f"{[n for n, t in TASKS.items() if t.kind == 'retrieval']}")


@torch.no_grad()
def retrieval_eval(model: DSV32ForCausalLM, tokenizer: Tokenizer, *, tasks: Sequence[str],
                   lengths: Sequence[int], depths: Sequence[float], examples_per_cell: int,
                   attention: AttentionOptions, seed: int = 0, add_bos: bool = False, batch_size: int = 4,
                   task_options: Mapping[str, Mapping[str, Any]] | None = None,
                   needles: bool = False) -> list[dict[str, Any]]:
    """Exact-match accuracy of every (task, prompt length in tokens, needle depth) cell over
    `examples_per_cell` examples (each drawn from its own seeded RNG, so a cell is the same
    set whatever else is evaluated). Lengths are in `tokenizer`'s tokens, BOS not counted: with
    the byte tokenizer exact, with a subword one at most that many (`tasks.retrieval.fit_to_tokens`).
    Returns one row per cell: task, length, depth, n,
    accuracy (exact match), correct, token_accuracy and answer_nll (see `_teacher_forced`);
    with `needles`, also needle_selected (overall and per layer) at `attention.topk`."""
    check_retrieval_tasks(tasks)
    if isinstance(examples_per_cell, bool) or not isinstance(examples_per_cell, int) or examples_per_cell < 1:
        raise ValueError(f"examples_per_cell must be an integer >= 1, got {examples_per_cell!r}")
    limit = model.config.max_position_embeddings
    device = next(model.parameters()).device
    rows = []
    for name in tasks:
        task = get_task(name)
        options = dict((task_options or {}).get(name, {}))
        for length in lengths:
            for depth in depths:
                seqs, prompt_lens, spans = [], [], []
                for i in range(examples_per_cell):
                    def make(n_bytes: int, key=f"dsv32-eval/{seed}/{name}/{length}/{depth}/{i}"):
                        return task.make_example(random.Random(key), n_bytes, depth, **options)
                    ex = fit_to_tokens(make, length, lambda text: len(tokenizer.encode(text)))
                    prompt = tokenizer.encode(ex.prompt, add_bos=add_bos)
                    spans.append(_needle_span(tokenizer, ex, add_bos))
                    ids = prompt + tokenizer.encode(ex.answer, add_eos=True)
                    if len(ids) > limit:
                        raise ValueError(f"a {name} example of length {length} takes {len(ids)} tokens with its "
                                         f"answer, beyond the model's max_position_embeddings={limit}")
                    seqs.append(ids)
                    prompt_lens.append(len(prompt))
                scores = _teacher_forced(model, seqs, prompt_lens, device, attention, batch_size)
                if needles:
                    scores.update(_text_needles(model, seqs, prompt_lens, spans, device, attention))
                rows.append({"task": name, "length": length, "depth": depth, "n": examples_per_cell,
                             "accuracy": scores["correct"] / examples_per_cell, **scores})
    return rows


def _needle_span(tokenizer: Tokenizer, example, add_bos: bool) -> tuple[int, int]:
    """Token positions [start, end) of the answer's copy inside the needle statement, in the
    prompt's own tokenization. A subword tokenizer may merge the answer's first characters with
    the space before them, or its last with what follows, so the span is where the prompt's ids
    part from the ids of the text before the answer (start) and the first prompt token that is
    not inside the text up to the answer's end (end)."""
    at = example.prompt.find(example.answer, max(0, example.meta.get("needle_offset", 0)))
    if at < 0:
        raise ValueError(f"the answer of a {example.meta.get('task')} example is not in its prompt")
    full = tokenizer.encode(example.prompt, add_bos=add_bos)

    def shared(text: str) -> tuple[int, int]:
        ids = tokenizer.encode(text, add_bos=add_bos)
        n = next((i for i, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
        return n, len(ids)

    start, _ = shared(example.prompt[:at])
    end, length = shared(example.prompt[:at + len(example.answer)])
    return start, end + (end < length)          # a token straddling the answer's end belongs to it


def _text_needles(model, seqs, prompt_lens, spans, device, attention: AttentionOptions) -> dict[str, float]:
    """needle_selected over the positions predicting the answer tokens (not EOS), one example
    at a time (lengths differ)."""
    totals: dict[str, float] = {}
    for ids, P, (start, end) in zip(seqs, prompt_lens, spans):
        n_answer = len(ids) - P - 1                                  # answer tokens, without EOS
        queries = torch.arange(P - 1, P - 1 + n_answer)
        needle = torch.arange(start, end).expand(n_answer, -1)
        batch = torch.tensor([ids], device=device)
        for key, value in needle_selected(model, batch, torch.zeros_like(queries), queries, needle,
                                          attention=attention).items():
            totals[key] = totals.get(key, 0.0) + value / len(seqs)
    return totals


@torch.no_grad()
def needle_selected(model: DSV32ForCausalLM, ids: torch.Tensor, rows: torch.Tensor, queries: torch.Tensor,
                    needles: torch.Tensor, *, attention: AttentionOptions,
                    report=None) -> dict[str, float]:
    """The share of needle positions inside the indexer's top-k, per layer and averaged over
    layers ("needle_selected", "needle_selected/layer{i}").

    ids (B, T); rows, queries (M,): the sequence and position of each query that predicts an
    answer token; needles (M, P): the key positions that hold what it must retrieve (-1 =
    none). Each query counts equally: the share of its needles that its selection holds. The
    selection is `dsa.selection_report`'s at `attention.topk` (pass `report` to reuse one)."""
    from .dsa import selection_report
    if report is None:
        report = selection_report(model, ids, attention=attention)
    valid = needles >= 0
    keep = valid.any(-1)
    out: dict[str, float] = {}
    shares = []
    for layer in sorted(report.indices):
        chosen = report.indices[layer][rows, queries].to(needles.device)                      # (M, K)
        hit = (needles[:, :, None] == chosen[:, None, :]).any(-1) & valid                     # (M, P)
        share = hit.sum(-1).float()[keep] / valid.sum(-1).float()[keep]
        out[f"needle_selected/layer{layer}"] = float(share.mean()) if keep.any() else float("nan")
        shares.append(out[f"needle_selected/layer{layer}"])
    out["needle_selected"] = sum(shares) / len(shares)
    return out


@torch.no_grad()
def mqar_eval(model: DSV32ForCausalLM, ids: torch.Tensor, labels: torch.Tensor, num_pairs: int, *,
              attention: AttentionOptions, batch_size: int = 8, selection: bool = True) -> dict[str, float]:
    """MQAR scores of a fixed batch (`tasks.mqar.MQAR.batch`): answer accuracy (argmax at the
    answer positions), answer NLL and per-sequence exact match (`tasks.mqar.answer_accuracy`,
    answer-weighted over mini-batches); with `selection`, also needle_selected per layer (the
    value's context position in the top-k of its query) and the indexer's recall of the dense
    attention mass (`dsa.SelectionReport.recall`), both at `attention.topk`."""
    from .dsa import selection_report
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    answers = 0
    for i in range(0, ids.shape[0], batch_size):
        x, y = ids[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        scores = answer_accuracy(model(x, attention=attention).logits, y)
        n = scores.pop("answers")
        part = {k: v * n for k, v in scores.items()}
        if selection:
            report = selection_report(model, x, attention=attention)
            need = needle_positions(x, y, num_pairs)
            rows, pos = (need[:, 1:] >= 0).nonzero(as_tuple=True)               # answer at pos+1, query at pos
            part.update({k: v * n for k, v in needle_selected(model, x, rows, pos, need[rows, pos + 1][:, None],
                                                               attention=attention, report=report).items()})
            topk = attention.topk or model.config.index_topk
            part.update({k: v * n for k, v in report.recall(topk).items()})
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
        answers += n
    return {**{k: v / answers for k, v in sums.items()}, "answers": answers}


def _teacher_forced(model, seqs: list[list[int]], prompt_lens: list[int], device,
                    attention: AttentionOptions, batch_size: int) -> dict[str, float]:
    """Over the answer positions (answer tokens and EOS): `correct`, how many sequences have
    argmax == next token at every one; `token_accuracy`, the share of positions right; and
    `answer_nll`, the mean negative log-likelihood per position (graded signals that move
    before exact match does)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (ids, p) in enumerate(zip(seqs, prompt_lens)):
        by_shape.setdefault((len(ids), p), []).append(i)     # equal shapes batch without padding
    correct, hits, nll, positions = 0, 0, 0.0, 0
    for (L, P), members in by_shape.items():
        keep = L - P + 1                                     # positions P-1 .. L-1 (the last is unused)
        for j in range(0, len(members), batch_size):
            batch = torch.tensor([seqs[i] for i in members[j:j + batch_size]], device=device)
            logits = model(batch, attention=attention, logits_to_keep=keep).logits[:, :-1].float()
            targets = batch[:, P:]                           # (b, L - P): answer tokens, then EOS
            right = logits.argmax(-1) == targets
            correct += int(right.all(-1).sum())
            hits += int(right.sum())
            nll += float(F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
            positions += targets.numel()
    return {"correct": correct, "token_accuracy": hits / positions, "answer_nll": nll / positions}


def accuracy_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Exact-match accuracy, answer token accuracy, answer NLL and (where the rows have it)
    needle_selected, overall and per task (cells weighted by their number of examples)."""
    out: dict[str, float] = {}
    groups = {name: [r for r in rows if r["task"] == name] for name in sorted({r["task"] for r in rows})}
    for name, sel in [*groups.items(), ("", list(rows))]:
        suffix = f"/{name}" if name else ""
        n = max(1, sum(r["n"] for r in sel))
        out[f"accuracy{suffix}"] = sum(r["correct"] for r in sel) / n
        out[f"token_accuracy{suffix}"] = sum(r["token_accuracy"] * r["n"] for r in sel) / n
        out[f"answer_nll{suffix}"] = sum(r["answer_nll"] * r["n"] for r in sel) / n
        if sel and all("needle_selected" in r for r in sel):
            out[f"needle_selected{suffix}"] = sum(r["needle_selected"] * r["n"] for r in sel) / n
    return out
