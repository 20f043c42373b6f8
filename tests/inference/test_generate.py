"""Generation over the latent cache: equal to full recomputation and to transformers' greedy
generate; chunked prefill; decode = forward; recorded log-probs, kept sets and routing; cache
sizes; bad input."""

from __future__ import annotations

import pytest
import torch

import dsv32
from dsv32 import AttentionOptions, Records
from dsv32.inference import LatentCache, StaticLatentCache, generate
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("decode", seed=11).eval()


def greedy_by_recomputation(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("cache", ["static", "growing"])
def test_greedy_cached_equals_recomputation(model, cache):
    res = generate(model, PROMPTS, max_new_tokens=14, temperature=0, stop_tokens=[], cache=cache)
    assert res.tokens.shape == (3, 14) and res.finish_reason == ["length"] * 3
    for i, p in enumerate(PROMPTS):
        assert res.tokens[i].tolist() == greedy_by_recomputation(model, p, 14)


def test_greedy_equals_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path)
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = generate(model, PROMPTS, max_new_tokens=14, temperature=0, stop_tokens=[])
    for i, p in enumerate(PROMPTS):
        out = hf.generate(torch.tensor([p]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                          pad_token_id=model.config.pad_token_id)
        assert out[0, len(p):].tolist() == ours.tokens[i].tolist(), i
    assert len(PROMPTS[0]) + 14 > model.config.index_topk          # selection mattered


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_prefill_equals_one_shot(model, chunk):
    ids = torch.tensor([PROMPTS[0]])
    one, chunked = StaticLatentCache(model.config, 1, 32), LatentCache(model.config)
    with torch.no_grad():
        full = model(ids, cache=one).logits[:, -1]
        for c0 in range(0, ids.shape[1], chunk):
            last = model(ids[:, c0:c0 + chunk], cache=chunked).logits[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)
    assert one.length == chunked.length == ids.shape[1]


@pytest.mark.parametrize("attention", [None, AttentionOptions(sparse=False, form="absorbed")],
                         ids=["sparse", "dense-absorbed"])
def test_continuation_after_cached_prefix_and_decode_equal_forward(model, attention):
    """Prefill a prefix, then feed the rest one token at a time: every logit equals the
    full forward pass at the same position (left-padded batch, positions by real tokens)."""
    ids, mask = dsv32.inference.left_pad(PROMPTS, model.config.pad_token_id)
    opts = {} if attention is None else {"attention": attention}
    with torch.no_grad():
        full = model(ids, attention_mask=mask, **opts).logits
        cache = StaticLatentCache(model.config, 3, 16)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache, **opts).logits]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache, **opts).logits)
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc[mask], full[mask], atol=1e-5, rtol=0)


def test_recorded_logprobs_kept_sets_and_routing_replay(model):
    res = generate(model, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=30, top_p=0.8, seed=3,
                   record_routing=True, stop_tokens=[1])
    seq = res.sequences()
    full_mask = torch.cat((res.prompt_mask, res.completion_mask), dim=1)
    P = res.prompt_ids.shape[1]
    with torch.no_grad():
        free = model(seq, attention_mask=full_mask, records=Records(record_routing=True))
        replayed = model(seq, attention_mask=full_mask, records=Records(replay_routing=res.routing))
    kept = res.kept_padded()
    for out in (free, replayed):
        scaled = out.logits[:, P - 1:-1] / 0.7
        full_lp = torch.log_softmax(scaled, -1).gather(-1, res.tokens[..., None]).squeeze(-1)
        # -1 padding goes to an extra column V (scattering it onto id 0 would race with a real 0).
        V = scaled.shape[-1]
        keep = torch.zeros(*kept.shape[:-1], V + 1, dtype=torch.bool).scatter_(
            -1, torch.where(kept < 0, V, kept), True)[..., :V]
        trunc_lp = torch.log_softmax(scaled.masked_fill(~keep, float("-inf")), -1)
        trunc_lp = trunc_lp.gather(-1, res.tokens[..., None]).squeeze(-1)
        m = res.completion_mask
        torch.testing.assert_close(full_lp[m], res.logprobs_full[m], atol=1e-4, rtol=0)
        torch.testing.assert_close(trunc_lp[m], res.logprobs[m], atol=1e-4, rtol=0)
    # Every kept set is a top-k/top-p prefix: at most 30 tokens, and the sampled token is in it.
    assert kept.shape[-1] <= 30
    assert ((kept == res.tokens[..., None]).any(-1) | ~res.completion_mask).all()
    # Recorded expert ids are the ones a full forward pass chooses (the last token is unrecorded: -1).
    for layer, r in res.routing.items():
        assert r.shape == (3, seq.shape[1], model.config.num_experts_per_tok)
        assert (r[:, -1] == -1).all()
        real = full_mask.clone()
        real[:, -1] = False
        assert torch.equal(r[real].sort(-1).values, free.routing[layer][real].sort(-1).values)


def test_replayed_routing_is_used_where_routing_would_change(model):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        rec = model(ids, records=Records(record_routing=True))
        model.model.layers[1].mlp.gate.e_score_correction_bias += torch.linspace(-1, 1, 8)   # perturb routing
        try:
            moved = model(ids, records=Records(record_routing=True))
            kept = model(ids, records=Records(replay_routing=rec.routing))
        finally:
            model.model.layers[1].mlp.gate.e_score_correction_bias -= torch.linspace(-1, 1, 8)
    assert not torch.equal(moved.routing[1], rec.routing[1])
    torch.testing.assert_close(kept.logits, rec.logits, atol=0, rtol=0)


def test_seeds_make_samples_independent_of_the_batch(model):
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=[7, 8, 9], stop_tokens=[])
    b = generate(model, PROMPTS[1:2], max_new_tokens=8, temperature=1.0, seed=[8], stop_tokens=[])
    c = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=[7, 8, 9], stop_tokens=[])
    assert a.tokens[1].tolist() == b.tokens[0].tolist()
    assert torch.equal(a.tokens, c.tokens)



@pytest.mark.parametrize("cache", ["static", "growing"])
def test_shared_prompts_prefilled_once_equal_separate_rows(model, cache):
    """Rows holding the same prompt share one prefill; what each row samples and records is what
    it gets alone."""
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, stop_tokens=[], record_routing=True, cache=cache)
    both = generate(model, prompts, seed=[1, 2, 3, 4, 5], **kw)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], seed=[i + 1], **kw)
        assert both.tokens[i].tolist() == alone.tokens[0].tolist()
        torch.testing.assert_close(both.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)
        for layer, r in alone.routing.items():      # both are left-padded: compare the last columns
            assert torch.equal(both.routing[layer][i, -r.shape[1]:], r[0])


def test_stop_tokens_and_streaming(model):
    first = generate(model, PROMPTS, max_new_tokens=6, temperature=0, stop_tokens=[])
    stop = int(first.tokens[0, 2])                       # row 0 will meet this at step 2
    seen = []
    res = generate(model, PROMPTS, max_new_tokens=6, temperature=0, stop_tokens=[stop],
                   stream=lambda step, toks, fin: seen.append((step, toks.clone(), fin.clone())))
    assert res.lengths[0] == 3 and res.finish_reason[0] == "stop"
    assert (res.tokens[0, 3:] == model.config.pad_token_id).all() and (res.logprobs_full[0, 3:] == 0).all()
    assert [s for s, _, _ in seen] == list(range(len(seen))) and bool(seen[2][2][0])


@pytest.mark.parametrize("dtype,elt", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_bytes_per_token(model, dtype, elt):
    cfg = model.config
    per = (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * elt
    static = StaticLatentCache(cfg, 2, 20, dtype=dtype)
    assert static.bytes_per_token() == per
    m = model.to(dtype)
    try:
        growing = LatentCache(cfg)
        with torch.no_grad():
            m(torch.tensor([PROMPTS[0][:7]] * 2), cache=growing)
            m(torch.tensor([PROMPTS[0][:7]] * 2), cache=static)
    finally:
        model.float()
    assert growing.bytes_per_token() == per
    assert growing.nbytes() == static.nbytes() == 2 * 7 * cfg.num_hidden_layers * per


def test_fp8_cache_stores_fp8_and_reads_back_within_e4m3_precision(model):
    cfg = model.config
    fp8 = LatentCache(cfg, fp8=True)
    assert fp8.bytes_per_token() < LatentCache(cfg).bytes_per_token()
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    latent, k_index = torch.randn(2, 6, C), torch.randn(2, 6, cfg.index_head_dim)
    fp8.begin(2, 6, None)
    got_latent, got_index = fp8.update(0, latent, k_index, 0)
    stored = fp8._store[0]
    assert stored["c_kv"].dtype == stored["k_index"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(got_latent[..., cfg.kv_lora_rank:], latent[..., cfg.kv_lora_rank:])  # k_r exact
    for got, want in ((got_latent[..., : cfg.kv_lora_rank], latent[..., : cfg.kv_lora_rank]), (got_index, k_index)):
        err = (got - want).abs().amax(-1) / want.abs().amax(-1)
        assert 0 < err.max() <= 2 ** -4                  # e4m3: 3 mantissa bits, scale >= amax / 448
    res = generate(model, PROMPTS, max_new_tokens=4, temperature=0, fp8_cache=True)
    assert res.tokens.shape == (3, 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 2], [3, 500]]), "token id 500 outside the vocabulary"),
    (dict(prompts=[[1] * 100], max_new_tokens=40), "beyond max_position_embeddings=128"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(temperature=-0.1), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[]), "no prompts"),
])
def test_bad_input(model, kwargs, message):
    calls = []
    args = dict(prompts=PROMPTS, max_new_tokens=4, stream=lambda *a: calls.append(a))
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **args)
    assert calls == []


@pytest.mark.parametrize("chunk", [None, 2])
def test_recorded_selections_are_those_of_a_forward_over_the_sequence(model, chunk):
    """GenerationResult.indices row t: the key slots the query at slot P-1+t selected (the one
    whose logits sampled token t), int32; -1 rows where the cache held <= topk keys (every key
    selected); prompt_indices the same for slots 0 .. P-2. A forward over the whole sequence
    selects the same keys at those queries."""
    topk = model.config.index_topk
    res = generate(model, PROMPTS, max_new_tokens=6, temperature=0, stop_tokens=[], record_indices=True,
                   record_prompt_indices=True, prefill_chunk=chunk)
    P, N = res.prompt_ids.shape[1], res.tokens.shape[1]
    seq, mask = res.sequences(), torch.cat((res.prompt_mask, res.completion_mask), 1)
    with torch.no_grad():
        full = model(seq[:, :-1], attention_mask=mask[:, :-1], records=Records(record_indices=True))
    assert sorted(res.indices) == sorted(full.indices) and P > topk
    for layer, idx in res.indices.items():
        assert idx.dtype == torch.int32 and idx.shape == (3, N, topk)
        assert torch.equal(idx, full.indices[layer][:, P - 1:].to(torch.int32))
        prompt = res.prompt_indices[layer]
        assert prompt.shape == (3, P - 1, topk)
        chosen = (torch.arange(P - 1) >= topk) if chunk else torch.ones(P - 1, dtype=torch.bool)
        assert torch.equal(prompt[:, chosen], full.indices[layer][:, :P - 1][:, chosen].to(torch.int32))
        assert (prompt[:, ~chosen] == -1).all()      # chunks whose queries see <= topk keys: not recorded
    short = generate(model, [[5, 6]], max_new_tokens=4, temperature=0, stop_tokens=[], record_indices=True)
    # 2 prompt keys, top-4: the first three steps see <= 4 keys; the fourth query sees 5.
    for idx in short.indices.values():
        assert (idx[0, :3] == -1).all() and (idx[0, 3] >= 0).all()


def test_vocab_limit_samples_only_ids_the_tokenizer_has(model):
    """A tokenizer smaller than the model's padded vocabulary (Qwen: 151,665 ids, 151,936 rows):
    ids at or past vocab_limit are never drawn, greedy or sampled; a bad limit is refused."""
    V = model.config.vocab_size
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=5.0, seed=0, stop_tokens=[])
    assert (free.tokens >= 10).any()                          # unlimited, a hot sampler leaves [0, 10)
    for temperature in (0.0, 5.0):
        res = generate(model, PROMPTS, max_new_tokens=12, temperature=temperature, seed=0, stop_tokens=[],
                       vocab_limit=10)
        assert (res.tokens < 10).all() and torch.isfinite(res.logprobs).all()
    assert torch.equal(generate(model, PROMPTS, max_new_tokens=4, temperature=5.0, seed=0, stop_tokens=[],
                                vocab_limit=V).tokens, free.tokens[:, :4])
    for bad in (0, V + 1, 2.5):
        with pytest.raises(ValueError, match="vocab_limit"):
            generate(model, PROMPTS, max_new_tokens=2, vocab_limit=bad)
