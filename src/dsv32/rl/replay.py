"""The training forward pass of GRPO: log-probs of the sampled completions under a model,
replaying what the sampler recorded (docs/math.md §10, "keep routing", "keep sampling mask" and
"keep selection").

Shapes as in `dsv32.rl.rollout`: B sequences, P prompt width, N completion width, V vocabulary.

    input      sequences[:, :P+N-1]      the last token is only ever a target
    logits     the last N positions      position P-1+t predicts completion token t
    log-prob   token_logprobs(logits / T, completion, kept)      (B, N)

keep_routing: the MoE layers use the expert ids recorded while sampling (`routing=`), the gate
    weights being recomputed on those experts, so a routing decision that would flip between the
    sampler and the trainer (numerics of a different engine, a router or bias that moved since
    sampling, a policy several updates ahead) does not change which sub-network is trained.
    Positions the sampler never routed (-1, the final token) route freely.
keep_selection: each sparse layer attends, at the query that predicts completion token t, to
    the key slots the sampler's indexer selected there (`Records.replay_indices`), instead of
    its own top-k. DSA's selection is the attention analogue of a routing decision: index scores
    near the top-k boundary rank differently under the sampler's chunked, cached numerics and
    the training forward's one-shot ones (or after an update), and one key in or out moves the
    token's log-prob (benchmarks/keep_selection.py: over the FP8 sampler cache 37% of the
    completion's selections differ, and replaying them takes the mean |log pi_theta - log pi_old|
    at identical weights from 9.4e-3 to 2.0e-3; with equal numerics none differ, since ties
    are broken by key slot in every path). Positions with nothing recorded (-1 rows: steps where the cache held
    at most topk keys, so every key was selected) select afresh, which selects the same.
keep_prompt_selection: the prompt's queries replay theirs too. Off by default: they select
    afresh, from the same prompt and weights, and ties are broken by key slot in every path, so
    with the sampler's numerics equal to the trainer's their selection differs only where float
    noise reorders two scores closer than its size (benchmarks/keep_selection.py: none of 1280
    in fp32); recording them costs layers x K x 4 bytes per prompt token of every sample, usually
    far more than the completion. A sampler with other numerics (the FP8 cache) flips many of
    them, and then only this makes the forward the sampler's.
keep_sampling_mask: log-probs are renormalised over the kept set of the sampler's top-k/top-p
    truncation at each position, at the sampling temperature, so pi_theta shares the action
    space of the distribution the tokens were drawn from.

The reference policy goes through the same function with the same switches: with both on, all
three policies (pi_old, pi_theta, pi_ref) are compared on one action space and one expert path,
and the KL measures only what the parameters changed.

What pi_old is when keep_sampling_mask is OFF. pi_old stays the sampler's own log-prob of the
drawn token under the truncated distribution it actually sampled from: that is the behaviour
policy of the data, and only it makes r = pi_theta / pi_old an importance weight for these
samples. pi_theta is then a full-vocabulary probability, so even with identical weights
r = p_full(y) / p_kept(y) = (probability mass of the kept set) <= 1 — the action-space
mismatch the stabiliser removes, visible as a ratio below 1 before any update, spurious
low-side clipping and a positive off-policy statistic. Swapping in the untruncated log-prob as
pi_old would hide that mismatch by comparing with a policy that did not generate the data.

Shared prompts (share_prefix, on by default). A GRPO batch holds each prompt G times, and the
prompt is most of a sequence when answers are short (35 of 42 slots in benchmarks/grpo_vs_trl.py).
Slots 0 .. P-2 of rows with the same prompt, mask and replayed records there compute the same
values (the forward is causal), so the pass runs each distinct prefix once, keeps its latent
rows in a growing `LatentCache`, copies them to the rows that hold the prefix and runs the last
prompt slot and the completions over them, as decoding continues a prefill. Values and
gradients are those of the whole-row pass to float rounding (tests/rl/test_replay.py); the
reference pass and each update cost about P + G N token-forwards per group instead of
G (P + N - 1).

Left out on purpose: fusing the LM head with the log-prob (the vocabulary here is small; the
chunked log-prob path bounds the float temporaries for large ones).
"""

from __future__ import annotations

import torch

from ..inference.cache import LatentCache
from ..model import DSV32ForCausalLM, Records
from .logprobs import token_logprobs
from .rollout import Rollout

_LOGPROB_CHUNK_BYTES = 64 * 2**20   # float32 (C, V) temporaries of the chunked log-prob path


def policy_logprobs(
    model: DSV32ForCausalLM,
    batch: Rollout,
    *,
    temperature: float,
    keep_routing: bool = True,
    keep_sampling_mask: bool = True,
    keep_selection: bool = False,
    keep_prompt_selection: bool = False,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log pi(completion tokens) under `model`, replaying the sampler's records as switched.

    temperature: the sampling temperature (> 0); logits are divided by it, as the sampler did.
    share_prefix: run a prompt held by several rows once (see the module docstring); False
    runs every row whole (the reference the shared pass is tested against).
    Returns (logp (B, N) float32, differentiable when grad is enabled; the tempered logits
    (B, N, V) for diagnostics; the kept ids used (B, N, K) or None).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for policy log-probs (greedy decoding has no policy "
                         f"to optimise), got {temperature}")
    if keep_routing and batch.routing is None:
        raise ValueError("keep_routing=True needs the routing recorded at sampling "
                         "(collect_rollout(..., record_routing=True))")
    if keep_selection and batch.selection is None:
        raise ValueError("keep_selection=True needs the selection recorded at sampling "
                         "(collect_rollout(..., record_selection=True))")
    if keep_prompt_selection and batch.prompt_selection is None:
        raise ValueError("keep_prompt_selection=True needs the prompt's selection recorded at sampling "
                         "(collect_rollout(..., record_prompt_selection=True))")
    P = batch.prompt_len
    N = batch.completion_mask.shape[1]
    end = P + N - 1
    routing = None
    if keep_routing:
        routing = {layer: r[:, :end] for layer, r in batch.routing.items()}
    indices = None
    if keep_selection or keep_prompt_selection:
        completion = batch.selection if keep_selection else {}
        prompt = batch.prompt_selection if keep_prompt_selection else {}
        indices = {layer: _replay_rows(completion.get(layer), prompt.get(layer), batch.size, P, N)
                   for layer in sorted({*completion, *prompt})}
    ids, mask = batch.sequences[:, :end], batch.attention_mask[:, :end]
    if share_prefix and P > 1 and _can_share(model):
        logits = _prefix_shared_logits(model, ids, mask, routing, indices, P, N)
    else:
        logits = model(ids, attention_mask=mask, records=Records(replay_routing=routing, replay_indices=indices),
                       logits_to_keep=N).logits
    logits = logits.float() / temperature                                    # (B, N, V)
    kept = batch.kept if keep_sampling_mask else None
    chunk = max(1, _LOGPROB_CHUNK_BYTES // (4 * logits.shape[-1]))
    logp = token_logprobs(logits, batch.tokens, kept, chunk_size=chunk)     # (B, N)
    return logp, logits, kept


def _replay_rows(completion: torch.Tensor | None, prompt: torch.Tensor | None, B: int, P: int,
                 N: int) -> torch.Tensor:
    """The (B, P-1+N, K) replay over every query of the forward from the prompt's (B, P-1, K)
    (slots 0 .. P-2) and the completion's (B, >= N, K) selections (slots P-1 ..); a part not
    given is -1 (select afresh)."""
    given = [t for t in (prompt, completion) if t is not None]
    K = max(t.shape[-1] for t in given)

    def part(t: torch.Tensor | None, rows: int) -> torch.Tensor:
        if t is None:
            return torch.full((B, rows, K), -1, dtype=torch.int32, device=given[0].device)
        return torch.nn.functional.pad(t[:, :rows], (0, K - t.shape[-1]), value=-1)

    return torch.cat((part(prompt, P - 1), part(completion, N)), dim=1)


def _can_share(model: DSV32ForCausalLM) -> bool:
    """The shared pass hands the prompt's latent rows to the completion through a growing
    `LatentCache`; a model with its own cache layout, or one that recomputes blocks in the
    backward (which a cache write would repeat), runs every row whole. So does a model sharded
    with FSDP2: there the shared pass (two forwards of its blocks feeding one backward) crashed
    the process (SIGSEGV in the backward, torch 2.13, gloo, tests/training/test_distributed.py;
    the cause inside torch was not traced)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):          # distributed.shard_model always shards the root
        return False
    return not hasattr(model, "new_cache") and not (model.activation_checkpointing and torch.is_grad_enabled())


def _prefix_groups(ids: torch.Tensor, mask: torch.Tensor, routing: dict[int, torch.Tensor] | None,
                   indices: dict[int, torch.Tensor] | None, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose first L input slots are the same computation: equal tokens and mask, and equal
    replayed routing and key slots there. Returns (first (U,) one row of each distinct prefix,
    owner (B,) which of them each row holds). Replayed key slots (layers x K per slot, large at
    scale) refine the grouping one layer at a time, so no more than one layer's copy is made."""
    B = ids.shape[0]
    parts = [ids[:, :L], mask[:, :L].long()]
    parts += [t[:, :L].reshape(B, -1).long() for _, t in sorted((routing or {}).items())]
    distinct, owner = torch.unique(torch.cat(parts, dim=1), dim=0, return_inverse=True)
    for _, t in sorted((indices or {}).items()):
        rows = t[:, :L].reshape(B, -1)
        distinct, owner = torch.unique(torch.cat((owner[:, None].to(rows.dtype), rows), dim=1), dim=0,
                                       return_inverse=True)
    first = torch.full((distinct.shape[0],), B, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, owner, torch.arange(B, device=ids.device), reduce="amin")
    return first, owner


def _prefix_shared_logits(model: DSV32ForCausalLM, ids: torch.Tensor, mask: torch.Tensor,
                          routing: dict[int, torch.Tensor] | None, indices: dict[int, torch.Tensor] | None,
                          P: int, N: int) -> torch.Tensor:
    """The logits (B, N, V) of the last N slots of `ids` (B, P + N - 1), computing each distinct
    prefix (slots 0 .. P-2) once: a forward over the U prefixes fills a latent cache, whose rows
    are then copied to their B owners (a differentiable index, so each prefix's gradient is the
    sum over the rows that hold it), and a second forward runs slots P-1 .. over them, exactly
    as a decode continues a prefill. Always these two forward calls, whatever U: under FSDP
    every rank must make the same calls."""

    def cols(records: dict[int, torch.Tensor] | None, rows, sl: slice) -> dict[int, torch.Tensor] | None:
        return None if records is None else {layer: t[rows, sl] for layer, t in records.items()}

    L = P - 1
    first, owner = _prefix_groups(ids, mask, routing, indices, L)
    cache = LatentCache(model.config)
    # The prefix pass's own logits are never read: keep one slot's.
    model(ids[first, :L], attention_mask=mask[first, :L], cache=cache, logits_to_keep=1,
          records=Records(replay_routing=cols(routing, first, slice(0, L)),
                          replay_indices=cols(indices, first, slice(0, L))))
    cache.select_rows(owner)
    every = slice(None)
    return model(ids[:, L:], attention_mask=mask[:, L:], cache=cache,
                 records=Records(replay_routing=cols(routing, every, slice(L, None)),
                                 replay_indices=cols(indices, every, slice(L, None)))).logits   # (B, N, V)
