"""Keep selection (docs/math.md §10): the sampler records, for every completion token, the key
slots each sparse layer selected; the training forward replays them. With top-k below the
sequence length (selection bites), the replayed log-probs equal the sampler's at identical
weights whatever the prefill chunking, and follow the recording rather than the trainer's own
indexer."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from dsv32.cli import build_parser, config_from_args
from dsv32.rl import GRPOConfig, collect_rollout, policy_logprobs, task_examples, train_grpo
from dsv32.rl.datasets import encode_prompt
from dsv32.rl.rollout import concat_rollouts
from tests.conftest import randomize_, tiny_model
from tests.rl.helpers import TOKENIZER, arithmetic, digit_reward, tiny_policy

T = 0.9
TOPK = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model("policy", index_topk=TOPK).eval()


def _rollout(model, prefill_chunk=None, n=3, digits=1, prompt=False):
    examples = task_examples("arithmetic", n, seed=0, options={"digits": digits})
    return collect_rollout(model, TOKENIZER, examples, group_size=2, max_new_tokens=8,
                           temperature=T, seeds=list(range(2 * n)), record_selection=True,
                           record_prompt_selection=prompt, prefill_chunk=prefill_chunk)


def _gap(logp, batch):
    return (logp - batch.logp_old)[batch.completion_mask].abs()


@torch.no_grad()
def test_recorded_layout_is_compact_int32(model):
    r = _rollout(model)
    B, N = r.completion_mask.shape
    layers = model.config.num_hidden_layers
    assert sorted(r.selection) == list(range(layers))
    for s in r.selection.values():
        assert s.dtype == torch.int32 and s.shape == (B, N, TOPK)          # window = sink = 0 here
        assert (s[r.completion_mask] >= 0).all()                          # every query sees > TOPK keys
    assert r.selection_bytes == layers * TOPK * 4 * B * N


@pytest.mark.parametrize("chunk", [None, 3])
@torch.no_grad()
def test_replay_equals_the_sampler_whatever_the_prefill_chunking(model, chunk):
    r = _rollout(model, prefill_chunk=chunk)
    logp, _, _ = policy_logprobs(model, r, temperature=T, keep_selection=True)
    torch.testing.assert_close(_gap(logp, r), torch.zeros_like(_gap(logp, r)), atol=2e-5, rtol=0)


@torch.no_grad()
def test_replay_follows_the_recording_not_the_trainers_indexer():
    """The indexer's weights only choose keys: a trainer whose indexers differ from the sampler's
    selects other keys (log-probs move), and with the sampler's selection replayed it computes
    the sampler's log-probs again. Top-k is the prompt width here, so every prompt query sees
    all its keys and only the completion's selections (the ones recorded) can differ."""
    P = len(encode_prompt(TOKENIZER, arithmetic(1)[0].prompt))
    sampler = tiny_model("policy", index_topk=P).eval()
    r = _rollout(sampler)
    assert r.prompt_len == P
    trainer = tiny_model("policy", index_topk=P).eval()
    for layer in trainer.model.layers:
        randomize_(layer.self_attn.indexer, seed=7, std=0.3)
    free, _, _ = policy_logprobs(trainer, r, temperature=T, keep_selection=False)
    kept, _, _ = policy_logprobs(trainer, r, temperature=T, keep_selection=True)
    assert _gap(free, r).mean() > 0.05
    torch.testing.assert_close(_gap(kept, r), torch.zeros_like(_gap(kept, r)), atol=2e-5, rtol=0)


@torch.no_grad()
def test_prompt_replay_makes_the_forward_the_samplers_whatever_its_indexer(model):
    """Top-k below the prompt width: prompt queries select too, so a trainer with other indexers
    differs even with the completion's selection replayed -- and not once the prompt's is."""
    r = _rollout(model, prefill_chunk=5, prompt=True)
    P = r.prompt_len
    for layer, s in r.prompt_selection.items():
        assert s.dtype == torch.int32 and s.shape == (r.size, P - 1, TOPK)
        assert (s[:, TOPK:] >= 0).all()                        # every query past slot TOPK-1 chose TOPK keys
    trainer = tiny_model("policy", index_topk=TOPK).eval()
    for layer in trainer.model.layers:
        randomize_(layer.self_attn.indexer, seed=7, std=0.3)
    completion_only, _, _ = policy_logprobs(trainer, r, temperature=T, keep_selection=True)
    both, _, _ = policy_logprobs(trainer, r, temperature=T, keep_selection=True, keep_prompt_selection=True)
    assert _gap(completion_only, r).mean() > 0.05
    torch.testing.assert_close(_gap(both, r), torch.zeros_like(_gap(both, r)), atol=2e-5, rtol=0)
    assert r.selection_bytes == model.config.num_hidden_layers * TOPK * 4 * r.size * (P - 1 + r.tokens.shape[1])


@torch.no_grad()
def test_concatenated_rollouts_shift_selected_slots_with_the_prompt_padding(model):
    """Rollouts with different prompt widths (as gathered across ranks) keep their replay exact."""
    a, b = _rollout(model, n=2, digits=2, prompt=True), _rollout(model, n=2, digits=1, prompt=True)
    assert a.prompt_len > b.prompt_len
    both = concat_rollouts([a, b])
    logp, _, _ = policy_logprobs(model, both, temperature=T, keep_selection=True, keep_prompt_selection=True)
    torch.testing.assert_close(_gap(logp, both), torch.zeros_like(_gap(logp, both)), atol=2e-5, rtol=0)
    shift = a.prompt_len - b.prompt_len
    for layer, s in b.selection.items():
        moved = both.selection[layer][a.size:, :s.shape[1], :s.shape[2]]
        assert torch.equal(moved, torch.where(s >= 0, s + shift, s))
    for layer, s in b.prompt_selection.items():
        moved = both.prompt_selection[layer][a.size:]
        assert (moved[:, :shift] == -1).all()
        assert torch.equal(moved[:, shift:, :s.shape[2]], torch.where(s >= 0, s + shift, s))
    assert both.select(torch.tensor([0, 5])).prompt_selection[0].shape[:2] == (2, both.prompt_len - 1)


def test_keep_selection_needs_a_recording(model):
    r = collect_rollout(model, TOKENIZER, arithmetic(1), group_size=2, max_new_tokens=2, temperature=T,
                        seeds=[0, 1])
    assert r.selection is None
    with pytest.raises(ValueError, match="record_selection=True"):
        policy_logprobs(model, r, temperature=T, keep_selection=True)
    with pytest.raises(ValueError, match="record_prompt_selection=True"):
        policy_logprobs(model, r, temperature=T, keep_prompt_selection=True)


@torch.no_grad()
def test_nothing_is_recorded_where_every_key_is_selected():
    dense = tiny_policy()                                   # top-128: every key of these short sequences
    r = collect_rollout(dense, TOKENIZER, arithmetic(1), group_size=2, max_new_tokens=4, temperature=T,
                        seeds=[0, 1], record_selection=True)
    assert r.selection == {} and r.selection_bytes == 0
    logp, _, _ = policy_logprobs(dense, r, temperature=T, keep_selection=True)
    torch.testing.assert_close(_gap(logp, r), torch.zeros_like(_gap(logp, r)), atol=2e-5, rtol=0)


def test_grpo_logs_what_keep_selection_costs_and_trains_on_the_sampled_path(model):
    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, temperature=T, beta=0.0,
                        kl_estimator="none", seed=3)
    on = train_grpo(copy.deepcopy(model), TOKENIZER, arithmetic(2), config, reward_fns=digit_reward,
                    show_progress=False)[0]
    layers = model.config.num_hidden_layers
    assert on["selection_bytes_per_token"] == layers * TOPK * 4
    # 4 rows x N positions (N: the longest completion, >= the mean length)
    assert on["selection_bytes"] >= layers * TOPK * 4 * 4 * on["response_length"]
    assert on["selection_bytes"] % (layers * TOPK * 4 * 4) == 0
    assert on["mismatch"] < 1e-5
    off = train_grpo(copy.deepcopy(model), TOKENIZER, arithmetic(2), replace(config, keep_selection=False),
                     reward_fns=digit_reward, show_progress=False)[0]
    assert "selection_bytes" not in off


def test_the_command_line_switches_keep_selection():
    parser = build_parser()
    default = config_from_args(parser.parse_args(["grpo"]), GRPOConfig)
    assert default.keep_selection and not default.keep_prompt_selection
    args = parser.parse_args(["grpo", "--no-keep-selection", "--keep-prompt-selection"])
    config = config_from_args(args, GRPOConfig)
    assert not config.keep_selection and config.keep_prompt_selection
    with pytest.raises(ValueError, match="keep_selection"):
        GRPOConfig(keep_selection="yes")
