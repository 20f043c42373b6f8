"""Replaying selected key slots (`Records.replay_indices`, GRPO's keep selection): the layers,
main and MTP alike, attend to exactly the slots given; rows of -1 select afresh; recordings are
int32; a malformed replay is refused naming the layer."""

from __future__ import annotations

import pytest
import torch

from dsv32 import AttentionOptions, Records
from tests.conftest import tiny_model

MTP = 3                     # tiny_config has 3 main layers: the MTP layer is layer 3


def model_and_batch(T=14):
    model = tiny_model("tiny", seed=3, num_nextn_predict_layers=1).eval()     # top-6 of up to 14 keys
    ids = torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :2] = 0
    return model, ids, mask


def run(model, ids, mask, replay=None, topk=None):
    return model(ids, attention_mask=mask, attention=AttentionOptions(topk=topk), compute_mtp=True,
                 records=Records(record_indices=True, replay_indices=replay))


@torch.no_grad()
def test_replaying_a_recording_reproduces_it_in_main_and_mtp_layers():
    model, ids, mask = model_and_batch()
    fresh = run(model, ids, mask)
    assert sorted(fresh.indices) == [0, 1, 2, MTP]
    assert all(idx.dtype == torch.int32 for idx in fresh.indices.values())
    again = run(model, ids, mask, replay=fresh.indices)
    torch.testing.assert_close(again.logits, fresh.logits, atol=0, rtol=0)
    torch.testing.assert_close(again.mtp_logits[0], fresh.mtp_logits[0], atol=0, rtol=0)


@torch.no_grad()
def test_the_replayed_slots_are_the_ones_attended_to():
    """A top-3 run's selections replayed into a top-6 forward give the top-3 run's outputs: the
    layers attend to what is given, not to their own top-k -- the MTP layer included."""
    model, ids, mask = model_and_batch()
    small = run(model, ids, mask, topk=3)
    big = run(model, ids, mask)
    assert (big.logits - small.logits).abs().max() > 1e-4
    replayed = run(model, ids, mask, replay=small.indices)
    real = mask.bool()
    torch.testing.assert_close(replayed.logits[real], small.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(replayed.mtp_logits[0], small.mtp_logits[0], atol=1e-5, rtol=0)
    # Only the MTP layer replayed: the main logits are the top-6 ones, the MTP logits move.
    mtp_only = run(model, ids, mask, replay={MTP: small.indices[MTP]})
    torch.testing.assert_close(mtp_only.logits, big.logits, atol=0, rtol=0)
    assert (mtp_only.mtp_logits[0] - big.mtp_logits[0]).abs().max() > 1e-4


@torch.no_grad()
def test_rows_of_minus_one_select_afresh():
    model, ids, mask = model_and_batch()
    fresh = run(model, ids, mask)
    small = run(model, ids, mask, topk=3)
    T = ids.shape[1]
    half = {layer: torch.where(torch.arange(T)[None, :, None] < T // 2, -1, idx)
            for layer, idx in small.indices.items() if layer < MTP}
    mixed = run(model, ids, mask, replay=half)
    for layer in half:
        width = small.indices[layer].shape[-1]
        got, mine = mixed.indices[layer], fresh.indices[layer]
        assert torch.equal(got[:, : T // 2, : mine.shape[-1]], mine[:, : T // 2])     # fresh top-6
        assert torch.equal(got[:, T // 2:, :width], small.indices[layer][:, T // 2:])  # replayed top-3
        assert (got[:, T // 2:, width:] == -1).all()


@pytest.mark.parametrize("bad, what", [
    (lambda idx: idx[:, :-1], r"shape \(B=2, T=14, K >= 1\)"),
    (lambda idx: idx.float(), "torch.float32"),
    (lambda idx: idx[..., 0], "shape"),
    (lambda idx: idx.bool(), "torch.bool"),
])
def test_a_malformed_replay_is_refused_naming_the_layer(bad, what):
    model, ids, mask = model_and_batch()
    with torch.no_grad():
        idx = run(model, ids, mask).indices[1]
        with pytest.raises(ValueError, match=rf"replay_indices\[1\] must be an integer tensor.*{what}"):
            run(model, ids, mask, replay={1: bad(idx)})
