"""`decode_layout`: linear weights re-laid column-major in place for batch-1 decode. Values,
shapes and parameter objects stay; logits, generation and save/load round trips are unchanged;
per-head-viewed and tied weights keep their layout."""

from __future__ import annotations

import torch
from torch import nn

from dsv32.checkpoint import load_pretrained, save_pretrained
from dsv32.inference import decode_layout, generate
from dsv32.inference.layout import is_column_major
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23]]


def linear_weights(model):
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_relays_in_place_keeping_values_and_parameters():
    model = tiny_model("decode", seed=3).eval()
    before = {name: (w, w.detach().clone()) for name, w in linear_weights(model).items()}
    params = list(model.parameters())
    assert decode_layout(model) is model
    assert list(model.parameters()) == params                     # same objects, same order
    relaid = 0
    for name, (w, old) in before.items():
        assert linear_weights(model)[name] is w and torch.equal(w, old)
        if name.endswith("kv_b_proj"):
            assert w.is_contiguous()                              # read through per-head views
        else:
            assert is_column_major(w) and not w.is_contiguous(), name
            relaid += 1
    assert relaid >= 8 * model.config.num_hidden_layers
    storage = {name: w.data_ptr() for name, w in linear_weights(model).items()}
    decode_layout(model)                                          # idempotent: nothing re-copied
    assert {name: w.data_ptr() for name, w in linear_weights(model).items()} == storage


def test_tied_head_keeps_the_embedding_layout():
    model = tiny_model("decode", seed=3, tie_word_embeddings=True).eval()
    decode_layout(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_contiguous()


def test_logits_and_sparse_generation_unchanged():
    model = tiny_model("decode", seed=11).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want = model(ids).logits
    res_want = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_tokens=[], record_indices=True)
    decode_layout(model)
    with torch.no_grad():
        got = model(ids).logits
    res_got = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_tokens=[], record_indices=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(res_got.tokens, res_want.tokens)
    torch.testing.assert_close(res_got.logprobs, res_want.logprobs, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(res_got.indices[k], res_want.indices[k]) for k in res_want.indices)


def test_save_and_load_round_trip(tmp_path):
    model = decode_layout(tiny_model("decode", seed=5).eval())
    save_pretrained(model, tmp_path / "hf")                       # safetensors wants contiguous tensors
    loaded = load_pretrained(tmp_path / "hf")
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "state.pt")                      # a plain state_dict keeps the strides
    fresh = tiny_model("decode", seed=6).eval()
    decode_layout(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))      # copies into the column-major storage
    assert is_column_major(fresh.model.layers[0].self_attn.indexer.wq_b.weight)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_training_step_after_relayout_matches():
    """Gradients of a re-laid model equal the row-major model's; they take the weight's layout."""
    a, b = tiny_model("decode", seed=7), tiny_model("decode", seed=7)
    decode_layout(b)
    ids = torch.tensor([list(range(3, 30))])
    for m in (a, b):
        m(ids).logits.logsumexp(-1).mean().backward()
    wa, wb = a.model.layers[1].self_attn.q_b_proj.weight, b.model.layers[1].self_attn.q_b_proj.weight
    assert is_column_major(wb.grad)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(wb.grad, wa.grad, rtol=1e-4, atol=1e-6)


def test_retrofitted_dense_model_generates_the_same():
    """The CLI applies the layout to every model it loads, the DSA-retrofitted dense (GQA) ones too."""
    from dsv32 import AttentionOptions
    from tests.model.test_gqa_sparse import retrofitted
    model, opts = retrofitted(seed=7), AttentionOptions(topk=4)
    want = generate(model, PROMPTS, max_new_tokens=6, temperature=0, attention=opts, stop_tokens=[])
    decode_layout(model)
    embedding = model.model.embed_tokens.weight
    assert all(is_column_major(w) for w in linear_weights(model).values() if w is not embedding)
    got = generate(model, PROMPTS, max_new_tokens=6, temperature=0, attention=opts, stop_tokens=[])
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
