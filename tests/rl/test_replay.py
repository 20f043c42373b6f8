"""The training forward replays the sampler's records: with the kept set, pi_theta equals the
recorded pi_old at identical weights (ratio 1), and measurably not without it; with the
recorded routing, training log-probs equal the sampler's even after the router moved."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsv32 import Records
from dsv32.rl import collect_rollout, grpo_loss, policy_logprobs
from dsv32.rl.replay import _prefix_groups
from tests.conftest import tiny_model
from tests.rl.helpers import TOKENIZER, arithmetic, tiny_policy

T = 0.9


@pytest.fixture(scope="module")
def model():
    return tiny_policy()


@pytest.fixture(scope="module")
def rollout(model):
    return collect_rollout(model, TOKENIZER, arithmetic(4), group_size=4, max_new_tokens=10, temperature=T,
                           top_k=20, top_p=0.8, seeds=list(range(16)))


def _gap(logp, batch):
    return (logp - batch.logp_old)[batch.completion_mask]


def test_rollout_layout(rollout):
    B, N = rollout.completion_mask.shape
    assert B == 16 and rollout.sequences.shape == (B, rollout.prompt_len + N)
    assert rollout.kept.shape[:2] == (B, N) and rollout.kept.dtype == torch.int64
    assert torch.equal(rollout.group_ids, torch.arange(4).repeat_interleave(4))
    assert all(r.shape == (B, rollout.prompt_len + N, 2) for r in rollout.routing.values())
    # The kept set is a real truncation here (top-k 20 of 259, then top-p): the test below bites.
    assert (rollout.kept[rollout.completion_mask] >= 0).sum(-1).float().mean() < 20


@torch.no_grad()
def test_keep_sampling_mask_gives_ratio_one_at_identical_weights(model, rollout):
    logp, _, _ = policy_logprobs(model, rollout, temperature=T)
    torch.testing.assert_close(_gap(logp, rollout), torch.zeros_like(_gap(logp, rollout)), atol=2e-5, rtol=0)
    _, m = grpo_loss(logp, rollout.logp_old, torch.randn(16), rollout.completion_mask)
    assert abs(float(m["ratio_max"]) - 1) < 2e-5 and abs(float(m["ratio_min"]) - 1) < 2e-5


@torch.no_grad()
def test_without_sampling_mask_the_ratio_is_the_kept_mass_below_one(model, rollout):
    logp, _, kept = policy_logprobs(model, rollout, temperature=T, keep_sampling_mask=False)
    assert kept is None
    gap = _gap(logp, rollout)
    # pi_theta over the full vocabulary vs pi_old over the kept set: r = p(y) / p(kept set) <= 1.
    assert (gap <= 1e-5).all()
    assert gap.mean() < -0.05 and gap.min() < -0.3


@torch.no_grad()
def test_keep_routing_equals_sampler_where_routing_would_change(model, rollout):
    moe = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    shift = torch.linspace(-0.3, 0.3, moe[0].num_experts)
    for gate in moe:                     # the router bias moves between sampling and training
        gate.e_score_correction_bias += shift
    try:
        kept, _, _ = policy_logprobs(model, rollout, temperature=T, keep_routing=True)
        free, _, _ = policy_logprobs(model, rollout, temperature=T, keep_routing=False)
        end = rollout.sequences.shape[1] - 1
        moved = model(rollout.sequences[:, :end], attention_mask=rollout.attention_mask[:, :end],
                      records=Records(record_routing=True)).routing
    finally:
        for gate in moe:
            gate.e_score_correction_bias -= shift
    valid = rollout.attention_mask[:, :end]
    changed = [(moved[i][valid] != rollout.routing[i][:, :end][valid]).any(-1).float().mean() for i in moved]
    assert max(changed) > 0.1                                 # routing would have changed
    assert _gap(kept, rollout).abs().max() < 2e-5             # ... but replay trains the sampled experts
    assert _gap(free, rollout).abs().max() > 1e-2


def test_bad_calls(model, rollout):
    unrouted = collect_rollout(model, TOKENIZER, arithmetic(1), group_size=2, max_new_tokens=2, seeds=[0, 1],
                               record_routing=False)
    with pytest.raises(ValueError, match="keep_routing"):
        policy_logprobs(model, unrouted, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        policy_logprobs(model, rollout, temperature=0.0)


@torch.no_grad()
def test_select_drops_unreached_columns_and_keeps_values(model, rollout):
    shortest = rollout.lengths.argsort()[:3]
    part = rollout.select(shortest)
    assert part.completion_mask.shape[1] == int(rollout.lengths[shortest].max())
    full, _, _ = policy_logprobs(model, rollout, temperature=T)
    sub, _, _ = policy_logprobs(model, part, temperature=T)
    torch.testing.assert_close(sub[part.completion_mask], full[shortest, :sub.shape[1]][part.completion_mask],
                               atol=2e-5, rtol=0)


def _shared_and_whole(model, batch, **switches):
    """(log-probs, gradients) of the prompt-shared pass and of the whole-row pass."""
    out = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        logp, _, _ = policy_logprobs(model, batch, temperature=T, share_prefix=share, **switches)
        (logp.masked_fill(~batch.completion_mask, 0) * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
        out.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.zero_grad(set_to_none=True)
    return out


def _assert_same(shared, whole, mask):
    (a, ga), (b, gb) = shared, whole
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=0)
    assert ga.keys() == gb.keys() and len(ga) > 20
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5 * float(gb[name].abs().max()) + 1e-9, rtol=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_shared_prompt_pass_equals_the_whole_row_pass(sparse):
    """Each prompt held by G rows runs once and hands its latent rows to the completions: the
    log-probs and every parameter's gradient are the whole-row pass's. Sparse: top-k 4, below
    every length, with the completion's and the prompt's recorded selections replayed."""
    model = tiny_model("policy", index_topk=4) if sparse else tiny_policy()
    batch = collect_rollout(model, TOKENIZER, arithmetic(3), group_size=4, max_new_tokens=6, temperature=T,
                            top_p=0.9, seeds=list(range(12)), record_selection=sparse,
                            record_prompt_selection=sparse)
    switches = dict(keep_selection=sparse, keep_prompt_selection=sparse)
    end = batch.sequences.shape[1] - 1
    routing = {layer: r[:, :end] for layer, r in batch.routing.items()}
    first, owner = _prefix_groups(batch.sequences[:, :end], batch.attention_mask[:, :end], routing, None,
                                  batch.prompt_len - 1)
    assert len(first) == 3 and torch.equal(owner[first], torch.arange(3))     # one pass per prompt
    if sparse:        # the prompt's replayed key slots are the group's too, until one row's differ
        layer = next(iter(batch.prompt_selection))
        prompt_selection = {**batch.prompt_selection, layer: batch.prompt_selection[layer].clone()}
        indices = {layer: torch.cat((s, batch.selection[layer][:, :1]), 1) for layer, s in prompt_selection.items()}
        assert len(_prefix_groups(batch.sequences, batch.attention_mask, routing, indices, batch.prompt_len - 1)[0]) == 3
        prompt_selection[layer][7, -1, 0] = -1
        indices = {layer: torch.cat((s, batch.selection[layer][:, :1]), 1) for layer, s in prompt_selection.items()}
        first, owner = _prefix_groups(batch.sequences, batch.attention_mask, routing, indices, batch.prompt_len - 1)
        assert len(first) == 4 and (owner == owner[7]).sum() == 1
    model.train()
    _assert_same(*_shared_and_whole(model, batch, **switches), batch.completion_mask)


def test_rows_whose_prompt_records_differ_are_not_shared(model, rollout):
    """A row whose replayed prompt routing differs from its group's computes another prefix: it
    gets its own prefix pass, and the values stay the whole-row pass's."""
    batch = rollout.select(torch.arange(8))
    layer = next(iter(batch.routing))
    routing = dict(batch.routing)
    routing[layer] = routing[layer].clone()
    routing[layer][5, batch.prompt_len - 2] = routing[layer][5, batch.prompt_len - 2].flip(0)  # same experts, other order
    routing[layer][6, batch.prompt_len - 3] = (routing[layer][6, batch.prompt_len - 3] + 1) % 8  # other experts
    batch = replace(batch, routing=routing)
    end = batch.sequences.shape[1] - 1
    first, owner = _prefix_groups(batch.sequences[:, :end], batch.attention_mask[:, :end],
                                  {k: r[:, :end] for k, r in routing.items()}, None, batch.prompt_len - 1)
    assert len(first) == 4 and len(set(owner[4:].tolist())) == 3
    model.train()
    try:
        _assert_same(*_shared_and_whole(model, batch), batch.completion_mask)
    finally:
        model.eval()
