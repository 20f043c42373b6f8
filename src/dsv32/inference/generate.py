"""Batched generation over the latent cache, recording what RL needs.

Prompts of different lengths are left-padded into one batch; a padded slot is a key no query
may see, and RoPE positions count real tokens only, so a prompt generates the same
continuation alone or in a batch. Prefill fills the cache (optionally in chunks); each decode
step runs one token per row in absorbed mode, where the indexer scores the whole cache and
the attention gathers only the top-k latent rows (O(k) main-attention work per token).

Per generated token the result holds the token id, its log-probability under the distribution
sampled from and under the untruncated one, the kept set of the truncation, and (optionally)
the MoE expert ids chosen in every layer — for the prompt too, since replaying routing in
training covers the whole sequence — and (optionally) the key slots each sparse layer selected
for the query that predicted the token (int32: layers x K x 4 bytes per generated token; see
`GenerationResult.indices`), and on request for the other prompt tokens. A row that meets a
stop token stops; later slots hold `pad_id` with log-probabilities 0 and do not count.

Input is validated before any work (empty prompt, ids outside the vocabulary, a length beyond
max_position_embeddings, bad sampling parameters), so a bad call leaves nothing half-written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..model import AttentionOptions, DSV32ForCausalLM, Records
from .cache import LatentCache, StaticLatentCache
from .sampling import SamplingParams, row_uniforms, sample_next

StreamCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class GenerationResult:
    prompt_ids: torch.Tensor            # (B, P) left-padded prompts
    prompt_mask: torch.Tensor           # (B, P) bool, True = real token
    tokens: torch.Tensor                # (B, N) generated ids, pad_id after a row stopped
    logprobs: torch.Tensor              # (B, N) under the sampled (truncated, renormalised) distribution
    logprobs_full: torch.Tensor         # (B, N) under the untruncated distribution
    lengths: torch.Tensor               # (B,) generated tokens per row, the stop token included
    finish_reason: list[str]            # "stop" | "length"
    kept: list[torch.Tensor | None] = field(default_factory=list)   # per step: (B, K_max) or None
    routing: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, P + N, top_k)
    # layer -> (B, N, K) int32: row t holds the key slots selected by the query at slot P-1+t,
    # whose logits sampled token t (the last prompt token, then each fed-back token); -1 = empty,
    # and a row of -1 where every key was selected (the cache held <= topk keys: nothing to keep).
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> (B, P - 1, K) int32: the same for the prompt's other queries (slots 0 .. P-2).
    prompt_indices: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def completion_mask(self) -> torch.Tensor:
        """(B, N) bool, True for generated tokens (the stop token included)."""
        N = self.tokens.shape[1]
        return torch.arange(N)[None, :] < self.lengths[:, None]

    def sequences(self) -> torch.Tensor:
        """(B, P + N): prompt (left-padded) followed by the generated tokens."""
        return torch.cat((self.prompt_ids, self.tokens), dim=1)

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]

    def kept_padded(self) -> torch.Tensor | None:
        """(B, N, K) kept ids over all steps, -1 padded; None if no step truncated."""
        if not self.kept or all(k is None for k in self.kept):
            return None
        V_pad = max(k.shape[1] for k in self.kept if k is not None)
        rows = []
        for step, k in enumerate(self.kept):
            if k is None:
                raise ValueError("kept sets are missing for some steps")
            rows.append(torch.nn.functional.pad(k, (0, V_pad - k.shape[1]), value=-1))
        return torch.stack(rows, dim=1)


def _validate(model: DSV32ForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    cfg = model.config
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(p) + max_new_tokens}, beyond max_position_embeddings={cfg.max_position_embeddings}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = True
    return ids, mask


def _row_seeds(seed: int | Sequence[int] | None, B: int, device) -> torch.Tensor | None:
    """One int64 seed per row (Python ints wrapped to 64 bits), or None."""
    if seed is None:
        return None
    seeds = [int(seed) * 1_000_003 + i for i in range(B)] if isinstance(seed, int) else list(seed)
    if len(seeds) != B:
        raise ValueError(f"seed list has {len(seeds)} entries for {B} prompts")
    wrapped = [(int(s) + 2**63) % 2**64 - 2**63 for s in seeds]
    return torch.tensor(wrapped, dtype=torch.long, device=device)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_done(done: bool, sync_ranks: bool) -> bool:
    if not sync_ranks or _world() == 1:
        return done
    flag = torch.tensor([int(done)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


@torch.no_grad()
def generate(
    model: DSV32ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int | None = None,
    stream: StreamCallback | None = None,
    record_routing: bool = False,
    record_indices: bool = False,
    record_prompt_indices: bool = False,
    record_kept: bool = True,
    cache: str = "static",
    fp8_cache: bool = False,
    prefill_chunk: int | None = None,
    attention: AttentionOptions | None = None,
    sync_ranks: bool = False,
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt (lists of token ids).

    seed: one int (row i gets its own random stream from it, so a prompt's sample does not
    depend on its batch) or one seed per prompt. stop_tokens: default the config's eos_token_id.
    stream(step, tokens (B,), finished (B,)) is called after every step. cache: "static"
    (preallocated) or "growing". prefill_chunk: prefill the prompt this many tokens at a time.
    record_indices: record each sparse layer's selected key slots for every generated token
    (`GenerationResult.indices`; what GRPO's keep selection replays); record_prompt_indices:
    also for the other prompt tokens (`GenerationResult.prompt_indices`).
    sync_ranks: every rank of a process group calls this together (an FSDP-sharded model needs
    all ranks in each forward pass): prompts are padded to the longest on any rank and the
    loop stops only when every rank's rows have stopped.
    vocab_limit: sample only ids below it (a tokenizer smaller than the model's padded
    vocabulary, as Qwen's 151,665 ids in 151,936 rows); None = every row of the LM head.
    """
    params = SamplingParams(temperature, top_k, top_p)
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int)
                                    or not 1 <= vocab_limit <= model.config.vocab_size):
        raise ValueError(f"vocab_limit must be an int in [1, vocab_size={model.config.vocab_size}], "
                         f"got {vocab_limit!r}")
    _validate(model, prompts, max_new_tokens)
    cfg = model.config
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if stop_tokens is None:
        eos = cfg.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else
                                             (stop_tokens[0] if stop_tokens else 0))
    device = model.lm_head.weight.device
    B = len(prompts)
    seeds = _row_seeds(seed, B, device)
    ids, mask = left_pad(prompts, pad, device)
    if sync_ranks and _world() > 1:
        longest = torch.tensor([ids.shape[1]])
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        extra = int(longest) - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (extra, 0), value=pad)
        mask = torch.nn.functional.pad(mask, (extra, 0), value=False)
    P = ids.shape[1]
    if hasattr(model, "new_cache"):          # a model with its own cache layout (dense GQA, model/gqa.py)
        kv = model.new_cache(B, P + max_new_tokens, kind=cache, fp8=fp8_cache)
    elif cache == "static":
        kv = StaticLatentCache(cfg, B, P + max_new_tokens, dtype=model.lm_head.weight.dtype, device=device,
                               fp8=fp8_cache)
    elif cache == "growing":
        kv = LatentCache(cfg, fp8=fp8_cache)
    else:
        raise ValueError(f"cache must be 'static' or 'growing', got {cache!r}")
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    start = time.perf_counter()
    routing: dict[int, list[torch.Tensor]] = {}
    # A step's selection is worth keeping only where the cache holds more keys than topk: with
    # fewer, every query selects all the keys it may see, in any forward.
    opts = attention or model.attention
    topk = cfg.index_topk if opts.topk is None else opts.topk
    selected: list[tuple[int, dict[int, torch.Tensor]]] = []      # (step, {layer: (B, 1, K)})
    prompt_selected: list[tuple[int, dict[int, torch.Tensor]]] = []   # (first slot, {layer: (B, chunk, K)})
    # A prompt shared by several rows (GRPO's G samples of one prompt) is prefilled once; its
    # cache rows, last logits, routing and selections are then copied to every row that holds it.
    first: dict[tuple[int, ...], int] = {}
    owner = [first.setdefault(tuple(int(t) for t in p), len(first)) for p in prompts]
    shared = len(first) < B
    unique = torch.tensor([owner.index(u) for u in range(len(first))], device=device) if shared else None
    chunk = prefill_chunk or P
    logits = None
    for c0 in range(0, P, chunk):
        last = c0 + chunk >= P
        keep = opts.sparse and min(c0 + chunk, P) > topk and (record_prompt_indices or (record_indices and last))
        part_ids, part_mask = ids[:, c0:c0 + chunk], mask[:, c0:c0 + chunk]
        if shared:
            part_ids, part_mask = part_ids[unique], part_mask[unique]
        out = model(part_ids, attention_mask=part_mask, cache=kv, attention=attention,
                    records=Records(record_routing=record_routing, record_indices=keep), logits_to_keep=1)
        logits = out.logits[:, -1]
        for layer, r in out.routing.items():
            routing.setdefault(layer, []).append(r)
        if keep and record_prompt_indices:
            prompt_selected.append((c0, out.indices))
        if keep and record_indices and last:
            selected.append((0, {layer: idx[:, -1:] for layer, idx in out.indices.items()}))
    if shared:
        rows = torch.tensor(owner, device=device)
        kv.select_rows(rows)
        logits = logits[rows]
        routing = {layer: [r[rows] for r in parts] for layer, parts in routing.items()}
        prompt_selected = [(c0, {layer: idx[rows] for layer, idx in parts.items()}) for c0, parts in prompt_selected]
        selected = [(row, {layer: idx[rows] for layer, idx in parts.items()}) for row, parts in selected]

    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    logprobs_full = torch.zeros(B, max_new_tokens, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    kept: list[torch.Tensor | None] = []
    # Every step's per-row draw in one call (the values sample_next would make step by step).
    draws = None if seeds is None or params.greedy else row_uniforms(seeds, torch.arange(max_new_tokens, device=device))
    for step in range(max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")     # ids the tokenizer cannot decode
        s = sample_next(logits, params, uniforms=None if draws is None else draws[:, step])
        live = ~finished
        tokens[:, step] = torch.where(live, s.tokens, pad)
        logprobs[:, step] = torch.where(live, s.logprob, 0.0)
        logprobs_full[:, step] = torch.where(live, s.logprob_full, 0.0)
        if record_kept:
            kept.append(None if s.kept is None else torch.where(live[:, None], s.kept, -1))
        lengths += live.long()
        finished |= live & torch.isin(s.tokens, stop)
        if stream is not None:
            stream(step, tokens[:, step], finished.clone())
        if _all_done(bool(finished.all()), sync_ranks) or step == max_new_tokens - 1:
            break
        keep = record_indices and opts.sparse and P + step + 1 > topk
        out = model(tokens[:, step:step + 1], attention_mask=live[:, None], cache=kv, attention=attention,
                    records=Records(record_routing=record_routing, record_indices=keep))
        logits = out.logits[:, -1]
        for layer, r in out.routing.items():
            routing.setdefault(layer, []).append(r)
        if keep:
            selected.append((step + 1, out.indices))

    n = int(lengths.max())
    reasons = ["stop" if f else "length" for f in finished.tolist()]
    result = GenerationResult(
        prompt_ids=ids, prompt_mask=mask, tokens=tokens[:, :n], logprobs=logprobs[:, :n],
        logprobs_full=logprobs_full[:, :n], lengths=lengths, finish_reason=reasons, kept=kept[:n],
        seconds=time.perf_counter() - start)
    if record_routing:
        # The last sampled token is never fed back, so its routing is unknown: -1 marks it, and a
        # replaying forward pass routes that position freely (no later position depends on it).
        for layer, parts in routing.items():
            r = torch.cat(parts, dim=1)
            missing = P + n - r.shape[1]
            result.routing[layer] = torch.nn.functional.pad(r, (0, 0, 0, missing), value=-1)
    result.indices = _stack_indices(selected, B, n, device)
    result.prompt_indices = _stack_indices(prompt_selected, B, P - 1, device)
    return result


def _stack_indices(selected: list[tuple[int, dict[int, torch.Tensor]]], B: int, n: int,
                   device) -> dict[int, torch.Tensor]:
    """{layer: (B, n, K_max) int32} from blocks (first row, {layer: (B, rows, K_block)}); rows
    past n are dropped, rows not given (and slots past a block's width) are -1."""
    out: dict[int, torch.Tensor] = {}
    for layer in (selected[0][1] if selected else {}):
        K = max(parts[layer].shape[-1] for _, parts in selected)
        idx = torch.full((B, n, K), -1, dtype=torch.int32, device=device)
        for row, parts in selected:
            block = parts[layer][:, : max(0, n - row)]
            idx[:, row: row + block.shape[1], : block.shape[-1]] = block
        out[layer] = idx
    return out
