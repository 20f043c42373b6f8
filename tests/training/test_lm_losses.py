"""LM and MTP losses: alignment of targets, padding, and an MTP model training through them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.model import AttentionOptions
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


def test_labels_and_attention_mask_count_only_the_selected_targets():
    """SFT's loss: the mean cross-entropy over the completion targets only, as F.cross_entropy
    with ignore_index over the shifted targets computes it."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    counted = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    loss, metrics = lm_loss(logits, torch.where(counted, ids, -100), attention)
    targets = torch.where(counted & attention, ids, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), targets.reshape(-1),
                                                 ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert metrics["tokens"] == 5


def test_answer_only_labels_equal_a_hand_computed_masked_loss():
    """Labels in HF's convention: -100 positions are not trained; the loss is the mean of the
    cross-entropies of the labelled targets, written out term by term."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 3:] = ids[0, 3:]                      # answer span of row 0: positions 3..5
    labels[1, 2:4] = ids[1, 2:4]                    # row 1: positions 2..3
    loss, metrics = lm_loss(logits, labels)
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[b, t - 1, ids[b, t]] for b, t in ((0, 3), (0, 4), (0, 5), (1, 2), (1, 3))]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert metrics["tokens"] == 5
    # Labels equal to the ids train every token: the plain next-token loss.
    torch.testing.assert_close(lm_loss(logits, ids)[0], F.cross_entropy(logits[:, :-1].reshape(-1, 11),
                                                                        ids[:, 1:].reshape(-1)))


def test_an_ignored_label_gets_no_gradient():
    """No gradient reaches the logits that predict an ignored target, nor, through the model,
    the embedding of a token seen only after the last labelled target."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 5, 7, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (1, 5), generator=g)
    labels = torch.tensor([[-100, -100, ids[0, 2], -100, -100]])
    lm_loss(logits, labels)[0].backward()
    grad = logits.grad.abs().sum(-1)[0]
    assert grad[1] > 0 and grad[[0, 2, 3, 4]].eq(0).all()    # only position 1 predicts a labelled target

    model = byte_model()
    ids = torch.tensor([[10, 11, 12, 13, 250, 251]])       # 250 and 251 appear after the answer only
    labels = torch.tensor([[-100, -100, 12, 13, -100, -100]])
    out = model(ids)
    lm_loss(out.logits, labels)[0].backward()
    emb = model.model.embed_tokens.weight.grad
    assert emb[[250, 251]].abs().sum() == 0 and emb[[10, 11]].abs().sum() > 0


def test_mtp_with_labels_depth_k_predicts_label_t_plus_k_plus_1():
    ids = torch.arange(8).view(1, 8)
    labels = torch.full_like(ids, -100)
    labels[0, 5] = 5
    g = torch.Generator().manual_seed(2)
    depth1, depth2 = torch.randn(1, 7, 10, generator=g), torch.randn(1, 6, 10, generator=g)
    loss, _ = mtp_loss([depth1, depth2], labels)
    # Depth 1 at position 3 and depth 2 at position 2 predict label 5.
    expected = (F.cross_entropy(depth1[:, 3], torch.tensor([5])) + F.cross_entropy(depth2[:, 2], torch.tensor([5]))) / 2
    torch.testing.assert_close(loss, expected)


def test_language_modeling_takes_ids_labels_batches():
    model = byte_model(num_nextn_predict_layers=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 10:] = ids[:, 10:]
    result = LanguageModeling(mtp_weight=0.5)(model, (ids, labels))
    assert result.tokens == 2 * 6 and result.metrics["tokens"] == 12
    full = LanguageModeling()(model, ids)
    assert full.tokens == ids.numel()
    with torch.no_grad():
        logits = model(ids, attention=AttentionOptions(sparse=False)).logits
    torch.testing.assert_close(result.metrics["lm_loss"], lm_loss(logits, labels)[0])
