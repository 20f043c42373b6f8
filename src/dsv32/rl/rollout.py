"""Rollouts: G sampled completions per prompt with everything the sampler recorded, in the
layout the GRPO update consumes; and greedy accuracy for evaluation.

Shape legend: B = prompts * G sampled sequences (group g is rows g*G .. g*G+G-1), P the
left-padded prompt width, N the longest completion, K the largest kept set of one step,
k = num_experts_per_tok.

    sequences        (B, P + N)   prompt (left-padded) then completion (pad after a stop)
    attention_mask   (B, P + N)   True on real tokens: prompt tokens and completion tokens
    completion_mask  (B, N)       True on generated tokens, the stop token included
    logp_old         (B, N)       the sampler's log-prob of each drawn token, under the
                                  distribution it actually sampled from (after top-k/top-p
                                  truncation and renormalisation, at the sampling temperature)
    kept             (B, N, K)    the kept token ids of that truncation, -1 padded; None when
                                  sampling did not truncate
    routing          {layer: (B, P + N, k)} expert ids chosen while sampling (-1: unknown,
                                  route freely); None when not recorded
    selection        {layer: (B, N, K) int32} key slots each sparse layer selected for the
                                  query that predicted completion token t (slot P-1+t; -1
                                  empty, a row of -1 = every key was selected); None when not
                                  recorded, {} when no step had more keys than topk
    prompt_selection {layer: (B, P - 1, K) int32} the same for the prompt's other queries
                                  (slots 0 .. P-2); None when not recorded

Left out on purpose: asynchronous or partial rollouts (the sampler here is the policy itself,
run synchronously between updates) and dropping of failed generations (every row is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..inference import generate
from ..model import DSV32ForCausalLM
from ..tokenizer import Tokenizer
from ..tasks import Example
from .datasets import encode_prompt
from .rewards import is_correct


@dataclass
class Rollout:
    """A batch of sampled sequences (see the module docstring for shapes)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor
    logp_old: torch.Tensor
    kept: torch.Tensor | None
    routing: dict[int, torch.Tensor] | None
    group_ids: torch.Tensor               # (B,) which prompt each row answers
    examples: list[Example]               # (B,) the example of each row
    completions: list[str]                # (B,) decoded completions, special tokens removed
    finish_reason: list[str]              # (B,) "stop" | "length"
    advantages: torch.Tensor | None = None   # (B,) set by the trainer once rewards are known
    selection: dict[int, torch.Tensor] | None = None
    prompt_selection: dict[int, torch.Tensor] | None = None

    @property
    def selection_bytes(self) -> int:
        """Bytes held by `selection` and `prompt_selection` (layers x K x 4 per position)."""
        held = [*(self.selection or {}).values(), *(self.prompt_selection or {}).values()]
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]

    @property
    def tokens(self) -> torch.Tensor:
        """(B, N) completion ids."""
        return self.sequences[:, self.prompt_len:]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) completion lengths, the stop token included."""
        return self.completion_mask.sum(dim=1)

    def select(self, idx: torch.Tensor) -> "Rollout":
        """Rows `idx` (1-D int64), with completion columns no selected row reaches dropped: a
        causal forward over fewer trailing slots computes the same values for the kept ones."""
        idx = idx.to(self.sequences.device)
        mask = self.completion_mask[idx]
        n = max(int(mask.sum(dim=1).max()), 1)
        end = self.prompt_len + n
        rows = idx.tolist()
        return replace(
            self,
            sequences=self.sequences[idx, :end],
            attention_mask=self.attention_mask[idx, :end],
            completion_mask=mask[:, :n],
            logp_old=self.logp_old[idx, :n],
            kept=None if self.kept is None else self.kept[idx, :n],
            routing=None if self.routing is None else {layer: r[idx, :end] for layer, r in self.routing.items()},
            group_ids=self.group_ids[idx],
            examples=[self.examples[i] for i in rows],
            completions=[self.completions[i] for i in rows],
            finish_reason=[self.finish_reason[i] for i in rows],
            advantages=None if self.advantages is None else self.advantages[idx],
            selection=None if self.selection is None else {layer: s[idx, :n] for layer, s in self.selection.items()},
            prompt_selection=None if self.prompt_selection is None else
            {layer: s[idx] for layer, s in self.prompt_selection.items()},
        )


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """The rows of `parts` in order, as one rollout: prompts left-padded to the widest prompt,
    completions right-padded to the longest (masked out; routing -1 = route freely, kept and
    selection -1 = empty), group ids renumbered so each part's groups stay distinct. Selected
    key slots move with the left padding of their prompt."""
    P = max(r.prompt_len for r in parts)
    N = max(r.completion_mask.shape[1] for r in parts)

    def pad(t: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        """Pad dim 1 (the token axis) of a (B, L) or (B, L, k) tensor."""
        return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [left, right], value=value)

    def cat_kept() -> torch.Tensor | None:
        if any(r.kept is None for r in parts):
            return None
        K = max(r.kept.shape[2] for r in parts)
        return torch.cat([torch.nn.functional.pad(r.kept, (0, K - r.kept.shape[2], 0, N - r.kept.shape[1]),
                                                  value=-1) for r in parts])

    routing = None
    if all(r.routing is not None for r in parts):
        routing = {layer: torch.cat([pad(r.routing[layer], P - r.prompt_len, N - r.completion_mask.shape[1], -1)
                                     for r in parts])
                   for layer in parts[0].routing}
    selection = None
    if all(r.selection is not None for r in parts):
        layers = sorted({layer for r in parts for layer in r.selection})
        selection = {layer: _cat_selection([(r.selection.get(layer), P - r.prompt_len, r.size, 0) for r in parts],
                                           N, parts[0].sequences.device)
                     for layer in layers}
    prompt_selection = None
    if all(r.prompt_selection is not None for r in parts):
        layers = sorted({layer for r in parts for layer in r.prompt_selection})
        prompt_selection = {layer: _cat_selection([(r.prompt_selection.get(layer), P - r.prompt_len, r.size,
                                                    P - r.prompt_len) for r in parts], P - 1,
                                                  parts[0].sequences.device)
                            for layer in layers}
    offsets, groups = 0, []
    for r in parts:
        groups.append(r.group_ids + offsets)
        offsets += int(r.group_ids.max()) + 1 if r.size else 0
    return Rollout(
        sequences=torch.cat([pad(r.sequences, P - r.prompt_len, N - r.completion_mask.shape[1], 0) for r in parts]),
        attention_mask=torch.cat([pad(r.attention_mask, P - r.prompt_len, N - r.completion_mask.shape[1], False)
                                  for r in parts]),
        prompt_len=P,
        completion_mask=torch.cat([pad(r.completion_mask, 0, N - r.completion_mask.shape[1], False) for r in parts]),
        logp_old=torch.cat([pad(r.logp_old, 0, N - r.logp_old.shape[1], 0.0) for r in parts]),
        kept=cat_kept(),
        routing=routing,
        group_ids=torch.cat(groups),
        examples=[ex for r in parts for ex in r.examples],
        completions=[c for r in parts for c in r.completions],
        finish_reason=[f for r in parts for f in r.finish_reason],
        advantages=None if any(r.advantages is None for r in parts) else torch.cat([r.advantages for r in parts]),
        selection=selection,
        prompt_selection=prompt_selection,
    )


def _cat_selection(parts: list[tuple[torch.Tensor | None, int, int, int]], L: int, device) -> torch.Tensor:
    """(B, L, K_max) int32 from per-part (selection (b, l, K) or None = nothing recorded, slot
    shift, rows, rows to add in front): slots shifted by the left padding added to their prompt,
    -1 padded (rows in front, then behind up to L)."""
    K = max((s.shape[2] for s, _, _, _ in parts if s is not None), default=1)
    out = []
    for s, shift, rows, front in parts:
        if s is None:
            out.append(torch.full((rows, L, K), -1, dtype=torch.int32, device=device))
            continue
        s = torch.where(s >= 0, s + shift, s)
        out.append(torch.nn.functional.pad(s, (0, K - s.shape[2], front, L - front - s.shape[1]), value=-1))
    return torch.cat(out)


@torch.no_grad()
def collect_rollout(
    model: DSV32ForCausalLM,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    record_routing: bool = True,
    record_selection: bool = False,
    record_prompt_selection: bool = False,
    fp8_cache: bool = False,
    prefill_chunk: int | None = None,
    sync_ranks: bool = False,
) -> Rollout:
    """Sample `group_size` completions for each example with `dsv32.inference.generate`.

    seeds: one per row (len(examples) * group_size), so a row's sample does not depend on the
    batch it is in; None draws from the global generator. record_routing: record the experts
    chosen (needed for keep routing). record_selection: record each sparse layer's selected key
    slots for the completion (needed for keep selection); record_prompt_selection: for the
    prompt too. fp8_cache: sample over the simulated FP8 latent cache, as
    a production inference engine would (its numerics then differ from the training forward).
    prefill_chunk: prefill prompts this many tokens at a time (see `generate`).
    sync_ranks: every rank of a process group rolls out together (see `generate`).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if not examples:
        raise ValueError("no examples to roll out")
    rows = [ex for ex in examples for _ in range(group_size)]
    encoded = [encode_prompt(tokenizer, ex.prompt) for ex in examples]       # once per prompt
    ids = [p for p in encoded for _ in range(group_size)]
    was_training = model.training
    model.eval()
    try:
        res = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=None if seeds is None else list(seeds),
                       stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.pad_id, record_routing=record_routing,
                       record_indices=record_selection, record_prompt_indices=record_prompt_selection,
                       record_kept=True, fp8_cache=fp8_cache,
                       prefill_chunk=prefill_chunk, sync_ranks=sync_ranks)
    finally:
        model.train(was_training)
    mask = res.completion_mask
    return Rollout(
        sequences=res.sequences(),
        attention_mask=torch.cat((res.prompt_mask, mask), dim=1),
        prompt_len=res.prompt_ids.shape[1],
        completion_mask=mask,
        logp_old=res.logprobs.float(),
        kept=res.kept_padded(),
        routing=dict(res.routing) if record_routing else None,
        group_ids=torch.arange(len(examples)).repeat_interleave(group_size),
        examples=rows,
        completions=tokenizer.decode_batch(res.completions()),
        finish_reason=res.finish_reason,
        selection=dict(res.indices) if record_selection else None,
        prompt_selection=dict(res.prompt_indices) if record_prompt_selection else None,
    )


@torch.no_grad()
def greedy_accuracy(model: DSV32ForCausalLM, tokenizer: Tokenizer, examples: Sequence[Example], *,
                    max_new_tokens: int, batch_size: int = 64, rank: int = 0, world_size: int = 1) -> float:
    """Fraction of `examples` the model solves with greedy decoding (see `rewards.is_correct`).
    With world_size > 1, every rank of the process group calls this together and evaluates
    its share of the examples; the fraction is over all of them."""
    if not examples:
        raise ValueError("no examples to evaluate")
    mine = examples[rank::world_size]
    correct = 0
    # Every rank runs the same number of batches (an FSDP forward needs all ranks).
    batches = -(-len(examples[0::world_size]) // batch_size)
    for b in range(batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size] or examples[:1]   # a filler batch
        roll = collect_rollout(model, tokenizer, chunk, group_size=1, max_new_tokens=max_new_tokens,
                               temperature=0.0, record_routing=False, sync_ranks=world_size > 1)
        if mine[b * batch_size:(b + 1) * batch_size]:
            correct += sum(is_correct(ex, c) for ex, c in zip(chunk, roll.completions))
    if world_size > 1:
        total = torch.tensor([float(correct)])
        torch.distributed.all_reduce(total)
        correct = int(total)
    return correct / len(examples)
