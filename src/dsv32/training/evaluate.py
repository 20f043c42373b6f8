"""Evaluation: held-out language-modelling loss and perplexity, and long-context retrieval
accuracy by prompt length and needle depth (exact match).

Exact match is decided by teacher forcing, in one forward pass per example: the model reads
`prompt + answer + EOS`, and the example counts as solved iff, at every position from the
last prompt token on, the argmax of the logits is the next reference token — every answer
token and then EOS. That is exactly the condition under which greedy decoding from the
prompt produces the answer and stops: by induction each greedy step sees the same prefix as
the teacher-forced pass. It is slightly stricter than `score_exact` on a greedy completion,
which would also forgive whitespace around the answer.

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
                   task_options: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Exact-match accuracy of every (task, prompt length in tokens, needle depth) cell over
    `examples_per_cell` examples (each drawn from its own seeded RNG, so a cell is the same
    set whatever else is evaluated). Returns one row per cell: task, length, depth, n,
    accuracy (exact match), correct, token_accuracy and answer_nll (see `_teacher_forced`)."""
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
                seqs, prompt_lens = [], []
                for i in range(examples_per_cell):
                    rng = random.Random(f"dsv32-eval/{seed}/{name}/{length}/{depth}/{i}")
                    ex = task.make_example(rng, length, depth, **options)
                    prompt = tokenizer.encode(ex.prompt, add_bos=add_bos)
                    ids = prompt + tokenizer.encode(ex.answer, add_eos=True)
                    if len(ids) > limit:
                        raise ValueError(f"a {name} example of length {length} takes {len(ids)} tokens with its "
                                         f"answer, beyond the model's max_position_embeddings={limit}")
                    seqs.append(ids)
                    prompt_lens.append(len(prompt))
                scores = _teacher_forced(model, seqs, prompt_lens, device, attention, batch_size)
                rows.append({"task": name, "length": length, "depth": depth, "n": examples_per_cell,
                             "accuracy": scores["correct"] / examples_per_cell, **scores})
    return rows


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
    """Exact-match accuracy, answer token accuracy and answer NLL, overall and per task
    (cells weighted by their number of examples)."""
    out: dict[str, float] = {}
    groups = {name: [r for r in rows if r["task"] == name] for name in sorted({r["task"] for r in rows})}
    for name, sel in [*groups.items(), ("", list(rows))]:
        suffix = f"/{name}" if name else ""
        n = max(1, sum(r["n"] for r in sel))
        out[f"accuracy{suffix}"] = sum(r["correct"] for r in sel) / n
        out[f"token_accuracy{suffix}"] = sum(r["token_accuracy"] * r["n"] for r in sel) / n
        out[f"answer_nll{suffix}"] = sum(r["answer_nll"] * r["n"] for r in sel) / n
    return out
