"""token_logprobs / token_entropy: the kept-set renormalisation against a manual computation,
the compact and boolean kept forms against each other, the chunked autograd path against the
plain reference (values and gradients), and the chunked path's memory claim."""

from __future__ import annotations

import math

import pytest
import torch

from dsv32.rl.logprobs import kept_ids_to_mask, token_entropy, token_logprobs

B, T, V, K = 2, 3, 7, 4


def make_inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=dtype)
    # Kept ids in arbitrary order, -1 padded; (1, 2) is an empty set (a padding position).
    ids = torch.tensor([
        [[3, 0, -1, -1], [6, 5, 4, 1], [2, -1, -1, -1]],
        [[0, 1, 2, 3], [-1, 4, -1, 5], [-1, -1, -1, -1]],
    ])
    targets = torch.tensor([[0, 4, 2], [3, 5, 6]])       # every target inside its kept set
    return logits, targets, ids


def test_plain_logprobs_without_mask():
    logits, targets, _ = make_inputs()
    want = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), want)
    torch.testing.assert_close(token_logprobs(logits, targets, chunk_size=4), want)


def test_kept_logprobs_equal_manual_renormalisation():
    logits, targets, ids = make_inputs()
    got = token_logprobs(logits, targets, ids)
    for b in range(B):
        for t in range(T):
            kept = [v for v in ids[b, t].tolist() if v >= 0] or list(range(V))   # empty -> full vocab
            p = logits[b, t].exp()
            want = math.log(p[targets[b, t]] / p[kept].sum())
            assert got[b, t].item() == pytest.approx(want, abs=1e-12)


def test_kept_ids_to_mask_with_token_zero_and_padding():
    # Padding must not clobber a genuine id 0 (a naive clamp(-1 -> 0) scatter would race).
    mask = kept_ids_to_mask(torch.tensor([[-1, 0, -1, 2], [-1, -1, -1, -1]]), 4)
    assert mask.tolist() == [[True, False, True, False], [False, False, False, False]]


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
def test_compact_and_boolean_forms_agree(chunk_size):
    logits, targets, ids = make_inputs()
    mask = kept_ids_to_mask(ids, V)
    compact = token_logprobs(logits, targets, ids, chunk_size=chunk_size)
    torch.testing.assert_close(token_logprobs(logits, targets, mask, chunk_size=chunk_size), compact)
    torch.testing.assert_close(token_logprobs(logits, targets, ids.int(), chunk_size=chunk_size), compact)
    torch.testing.assert_close(token_entropy(logits, mask, chunk_size=chunk_size), token_entropy(logits, ids))


def test_target_outside_kept_set_has_zero_probability():
    logits, targets, ids = make_inputs()
    targets = targets.clone()
    targets[0, 0] = 5                                     # kept set there is {0, 3}
    for chunk in (None, 2):
        lp = token_logprobs(logits, targets, ids, chunk_size=chunk)
        assert lp[0, 0].item() == -math.inf and torch.isfinite(lp.flatten()[1:]).all()


@pytest.mark.parametrize("form", ["none", "bool", "compact"])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_path_matches_reference_values_and_gradients(form, chunk_size):
    logits, targets, ids = make_inputs()
    targets = targets.clone()
    targets[0, 0] = 5                                     # also a target outside its kept set
    kept = {"none": None, "bool": kept_ids_to_mask(ids, V), "compact": ids}[form]
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    results = []
    for chunk in (None, chunk_size):
        x = logits.clone().requires_grad_()
        lp = token_logprobs(x, targets, kept, chunk_size=chunk)
        (torch.where(torch.isfinite(lp), lp, 0) * weights).sum().backward()
        results.append((lp.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_chunked_gradcheck():
    logits, targets, ids = make_inputs()
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, targets, ids, chunk_size=2), (x,))


def test_chunked_path_keeps_no_float_copy_of_the_logits():
    # The claim behind chunk_size: autograd holds the logits by reference and (N,)-sized lse,
    # never a (B, T, V) float temporary. The reference path, for contrast, does.
    Bb, Tt, Vv = 2, 8, 50
    logits = torch.randn(Bb, Tt, Vv, requires_grad=True)
    targets = torch.randint(0, Vv, (Bb, Tt))
    ids = torch.randint(0, Vv, (Bb, Tt, 5))

    def big_float_saves(chunk_size):
        saved = []

        def pack(t):
            if t.is_floating_point() and t.numel() >= Bb * Tt * Vv and t.data_ptr() != logits.data_ptr():
                saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_logprobs(logits, targets, ids, chunk_size=chunk_size).sum().backward()
        return saved

    assert big_float_saves(chunk_size=4) == []
    assert big_float_saves(chunk_size=None) != []


def test_low_precision_logits_get_low_precision_gradient():
    logits, targets, ids = make_inputs(dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, targets, ids, chunk_size=3)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp, token_logprobs(logits.float(), targets, ids))


def test_inputs_are_not_modified():
    logits, targets, ids = make_inputs(dtype=torch.float32)
    before = logits.clone()
    x = logits.requires_grad_()
    token_logprobs(x, targets, ids, chunk_size=2).sum().backward()
    token_entropy(logits, ids, chunk_size=2)
    assert torch.equal(logits.detach(), before)


def test_entropy_full_and_kept():
    logits, _, ids = make_inputs()
    p = logits.softmax(-1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1))
    got = token_entropy(logits, ids, chunk_size=2)
    mask = kept_ids_to_mask(ids, V)
    mask |= ~mask.any(-1, keepdim=True)
    q = torch.where(mask, p, 0) / torch.where(mask, p, 0).sum(-1, keepdim=True)
    want = -(q * torch.where(mask, q.log(), 0)).sum(-1)
    torch.testing.assert_close(got, want)
    # uniform logits over K kept tokens -> log K
    flat = torch.zeros(1, 1, V)
    assert token_entropy(flat, ids[:1, 1:2]).item() == pytest.approx(math.log(4))
    assert not token_entropy(logits.requires_grad_()).requires_grad


def test_bad_inputs():
    logits, targets, ids = make_inputs()
    with pytest.raises(TypeError, match="kept"):
        token_logprobs(logits, targets, ids.float())
    with pytest.raises(ValueError, match="boolean kept mask"):
        token_logprobs(logits, targets, torch.ones(B, T, V + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="compact kept ids"):
        token_logprobs(logits, targets, ids[:, :2])
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)
