"""LM and MTP losses: alignment of targets, padding, and an MTP model training through them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.training.losses import lm_loss, mtp_loss
from dsv32.training.objectives import LanguageModeling
from tests.training.helpers import byte_model


def _one_hot_logits(targets: torch.Tensor, V: int) -> torch.Tensor:
    return F.one_hot(targets, V).float() * 50.0


def test_lm_loss_predicts_the_next_token_and_skips_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    perfect = torch.cat((_one_hot_logits(ids[:, 1:], 10), torch.zeros(2, 1, 10)), dim=1)
    loss, metrics = lm_loss(perfect, ids)
    assert loss < 1e-6 and metrics["tokens"] == 6
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    loss, metrics = lm_loss(logits, ids, mask)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 10), ids[:, 1:].reshape(-1), reduction="none").view(2, 3)
    keep = torch.tensor([[False, True, True], [True, True, True]])
    torch.testing.assert_close(loss, ce[keep].mean())
    assert metrics["tokens"] == 5


def test_mtp_loss_depth_k_predicts_token_i_plus_k_plus_1():
    ids = torch.arange(8).view(1, 8)
    depth1 = _one_hot_logits(torch.cat((ids[:, 2:], ids[:, :1]), 1), 10)      # (1, 7, V), last row unused
    depth2 = _one_hot_logits(torch.cat((ids[:, 3:], ids[:, :1]), 1), 10)      # (1, 6, V)
    loss, _ = mtp_loss([depth1, depth2], ids)
    assert loss < 1e-6
    assert mtp_loss([depth1[:, :, torch.randperm(10)]], ids)[0] > 1.0


def test_language_modeling_with_mtp_and_balance_loss_reaches_every_trained_parameter():
    model = byte_model(num_nextn_predict_layers=1)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    result = LanguageModeling(balance_alpha=1e-2, mtp_weight=0.3)(model, ids)
    assert {"lm_loss", "mtp_loss", "balance_loss"} <= set(result.metrics)
    result.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".indexer." not in name), name


def test_loss_mask_counts_only_the_selected_targets():
    """SFT's loss: the mean cross-entropy over the completion targets only, as F.cross_entropy
    with ignore_index over the shifted targets computes it."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    counted = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    loss, metrics = lm_loss(logits, ids, attention, loss_mask=counted)
    targets = torch.where(counted & attention, ids, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), targets.reshape(-1),
                                                 ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert metrics["tokens"] == 5
