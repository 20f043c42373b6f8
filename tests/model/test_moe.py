"""DeepSeekMoE routing: group-limited selection against a direct computation, routing record and
replay, the sequence-wise balance loss."""

from __future__ import annotations

import itertools

import torch

from dsv32 import DSV32ForCausalLM, Records
from dsv32.model.moe import MoE, sequence_balance_loss
from tests.conftest import randomize_, tiny_config, tiny_model


def brute_force_route(s, bias, n_group, topk_group, top_k):
    """Enumerate kept-group combinations explicitly (tiny sizes only)."""
    E = s.shape[-1]
    per = E // n_group
    ids = []
    for row, srow in zip(s + bias, s):
        groups = row.view(n_group, per)
        gscore = groups.topk(2, dim=-1).values.sum(-1)
        best = max(itertools.combinations(range(n_group), topk_group),
                   key=lambda c: sorted((float(gscore[g]) for g in c), reverse=True))
        allowed = torch.full_like(row, float("-inf"))
        for g in best:
            allowed[g * per:(g + 1) * per] = row[g * per:(g + 1) * per]
        ids.append(sorted(allowed.topk(top_k).indices.tolist()))
    return ids


def test_group_limited_selection_matches_direct_computation():
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = randomize_(MoE(cfg), seed=1)
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        weights, ids, s = moe.gate(x)
    expected = brute_force_route(s, moe.gate.e_score_correction_bias, 4, 2, 3)
    assert [sorted(r) for r in ids.tolist()] == expected
    w = s.gather(1, ids)
    torch.testing.assert_close(weights, w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_bias_steers_selection_but_not_weights():
    cfg = tiny_config()
    moe = randomize_(MoE(cfg), seed=2)
    x = torch.randn(30, cfg.hidden_size)
    moe.gate.e_score_correction_bias.zero_()
    moe.gate.e_score_correction_bias[5] = 10.0         # expert 5 always wins selection
    with torch.no_grad():
        weights, ids, s = moe.gate(x)
    assert (ids == 5).any(-1).all()
    w = s.gather(1, ids)
    torch.testing.assert_close(weights, w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_record_and_replay_routing():
    model = tiny_model(seed=4, num_hidden_layers=3).eval()
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        rec = model(ids, records=Records(record_routing=True))
        assert set(rec.routing) == {1, 2}              # layer 0 is dense
        replayed = model(ids, records=Records(replay_routing=rec.routing))
        torch.testing.assert_close(replayed.logits, rec.logits, atol=0, rtol=0)
        # Replaying other experts changes the output: the ids are really used.
        other = {k: (v + 1) % 8 for k, v in rec.routing.items()}
        assert (model(ids, records=Records(replay_routing=other)).logits - rec.logits).abs().max() > 1e-4


def test_replayed_routing_shape_is_checked():
    model = DSV32ForCausalLM(tiny_config())
    ids = torch.randint(3, 97, (1, 5))
    try:
        model(ids, records=Records(replay_routing={1: torch.zeros(1, 5, 3, dtype=torch.long)}))
    except ValueError as e:
        assert "replayed routing" in str(e)
    else:
        raise AssertionError("a wrong routing shape must raise")


def test_sequence_balance_loss_is_one_when_uniform():
    B, T, E, k = 2, 8, 4, 2
    s = torch.full((B, T, E), 0.5)
    ids = torch.tensor([[0, 1], [2, 3]] * (T // 2)).expand(B, T, k)
    # f_i = E/(kT) * count_i = 1 for every expert, P_i = 1/E -> sum f P = 1
    assert float(sequence_balance_loss(s, ids, k)) == 1.0


def test_expert_load_counts_real_tokens_only():
    model = DSV32ForCausalLM(tiny_config())
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    out = model(ids, attention_mask=mask)
    for load in out.expert_load.values():
        assert int(load.sum()) == 10 * model.config.num_experts_per_tok


def test_mtp_layers_record_balance_and_replay_like_main_layers():
    """The MTP layer's router is recorded, balanced and replayed through the same `Records` as
    the main layers (it used to get a private context whose records were dropped)."""
    from dsv32.training.optim import update_router_bias
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = randomize_(DSV32ForCausalLM(cfg), seed=7)
    mtp_idx = cfg.num_hidden_layers
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    rec = model(ids, records=Records(record_routing=True, balance_alpha=0.1), compute_mtp=True)
    assert set(rec.routing) == set(rec.expert_load) == set(rec.records.balance_loss) == {1, 2, mtp_idx}
    assert rec.routing[mtp_idx].shape == (2, 11, cfg.num_experts_per_tok)   # the MTP layer sees 11 positions
    assert int(rec.expert_load[mtp_idx].sum()) == 2 * 11 * cfg.num_experts_per_tok

    # The balance loss reaches the MTP router's weights.
    rec.aux_loss.backward()
    assert model.mtp[0].mlp.gate.weight.grad.abs().sum() > 0

    # The router-bias update moves the MTP router too.
    bias = model.mtp[0].mlp.gate.e_score_correction_bias
    before = bias.clone()
    update_router_bias(model, rec.expert_load, 1e-2)
    torch.testing.assert_close((bias - before).abs(), torch.full_like(bias, 1e-2))

    # Replay covers the MTP layer: recorded ids reproduce its logits, other ids change only them.
    with torch.no_grad():
        first = model(ids, records=Records(record_routing=True), compute_mtp=True)
        again = model(ids, records=Records(replay_routing=first.routing), compute_mtp=True)
        torch.testing.assert_close(again.mtp_logits[0], first.mtp_logits[0], atol=0, rtol=0)
        other = dict(first.routing)
        other[mtp_idx] = (other[mtp_idx] + 1) % cfg.n_routed_experts
        moved = model(ids, records=Records(replay_routing=other), compute_mtp=True)
    torch.testing.assert_close(moved.logits, first.logits, atol=0, rtol=0)
    assert (moved.mtp_logits[0] - first.mtp_logits[0]).abs().max() > 1e-4


def test_grouped_experts_equal_the_per_expert_loop():
    """The padded batched-matmul dispatch (taken while the padding at most doubles the rows and
    stays under `_LOOP_CALL_ROWS` rows per expert) gives the per-expert loop's output and gradients; a
    skewed load (padding that costs more than the loop's calls) takes the loop."""
    from dsv32.model import moe
    cfg = tiny_config()
    experts = randomize_(MoE(cfg), seed=5).experts
    E, k, N = cfg.n_routed_experts, cfg.num_experts_per_tok, 200
    gen = torch.Generator().manual_seed(0)
    balanced = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    skewed = balanced.clone()
    skewed[:, 0] = 0                                          # expert 0 in every row: 200 x 8 - 400 > 64 x 8
    ran = []
    for name in ("grouped", "looped"):
        real = getattr(experts, name)
        setattr(experts, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    for ids, grouped in ((balanced, True), (skewed, False)):
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, minlength=E)
        padded = int(counts.max()) * E
        assert (padded <= 2 * flat.numel() and padded - flat.numel() <= moe._LOOP_CALL_ROWS * E) == grouped
        x = torch.randn(N, cfg.hidden_size, generator=gen)
        w = torch.rand(N, k, generator=gen)
        grads = []
        for run in ("forward", "looped"):
            xi = x.clone().requires_grad_()
            experts.zero_grad(set_to_none=True)
            order = flat.argsort(stable=True)
            y = experts(xi, ids, w) if run == "forward" else experts.looped(xi, order, counts.tolist(), k, w)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads.append((y.detach(), xi.grad, *(p.grad for p in experts.parameters())))
        assert ran[-2:] == ["grouped" if grouped else "looped", "looped"]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
