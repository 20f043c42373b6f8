"""group_advantages: hand-computed values, std scaling, degenerate groups, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from dsv32.rl.advantages import group_advantages


def test_centred_without_std_by_default():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv, metrics = group_advantages(rewards)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]))
    assert metrics["zero_std_frac"].item() == 0.0
    # population stds 0.5 and sqrt(0.5)
    torch.testing.assert_close(metrics["reward_std"], torch.tensor((0.5 + 0.5 ** 0.5) / 2))


def test_scale_by_population_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv, _ = group_advantages(rewards, scale_by_std=True, eps=1e-8)
    s = 0.5 ** 0.5
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, -1.0, 1.0], [1 / s, -1 / s, 0.0, 0.0]]))
    # unit mean square per group: the reason for the population std
    torch.testing.assert_close(adv.pow(2).mean(dim=1), torch.ones(2))


def test_constant_group_gives_zero_and_stays_finite():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 0.0]])
    adv, metrics = group_advantages(rewards, scale_by_std=True)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv[0], torch.zeros(3), atol=1e-5, rtol=0)
    assert metrics["zero_std_frac"].item() == 0.5


def test_int_rewards_give_float32_advantages():
    adv, metrics = group_advantages(torch.tensor([[1, 0, 2], [5, 0, 1]]))
    torch.testing.assert_close(adv, torch.tensor([[0.0, -1.0, 1.0], [3.0, -2.0, -1.0]]))
    assert adv.dtype == torch.float32
    assert metrics["zero_std_frac"].item() == 0.0


def test_group_of_one_is_rejected():
    with pytest.raises(ValueError, match="G must be >= 2.*G=1"):
        group_advantages(torch.zeros(4, 1))


def test_bad_shapes_and_eps():
    with pytest.raises(ValueError, match="N_prompts, G"):
        group_advantages(torch.zeros(6))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2, 2), eps=0.0)
