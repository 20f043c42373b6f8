"""DSA retrofit of a dense Hugging Face checkpoint (a tiny Qwen3 written by transformers) through
the existing verbs: `sparsify --stage warmup` attaches and trains the indexers only, `--stage
sparse` trains all, resume checks the dense config, `eval` reports both modes, and the result
is HF layout + indexer tensors + `dsa_retrofit` that transformers still loads as the dense model;
`generate` runs it. Plus the GQA form the DSA losses read (`mqa_form`) against the grouped scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv32.checkpoint.hf_dense import load_dense
from dsv32.cli import main
from dsv32.inference.generate import generate
from tests.model.test_gqa_sparse import retrofitted
from tests.training.helpers import hf_dense_checkpoint, write_corpus

transformers = pytest.importorskip("transformers")
COMMON = ["--seq-len", "256", "--tasks", "passkey", "--batch-size", "2", "--val-fraction", "0.2",
          "--log-every", "1", "--no-progress"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return hf_dense_checkpoint(tmp_path_factory.mktemp("hf") / "qwen3", "Qwen3", tie_word_embeddings=True)


def test_warmup_sparse_eval_generate(qwen3, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    warm, sparse = tmp_path / "warm", tmp_path / "sparse"
    assert main(["sparsify", "--stage", "warmup", "--init", str(qwen3), "--out", str(warm), "--topk", "16",
                 "--steps", "2", "--corpus", str(corpus), "--lr", "1e-2", *COMMON]) == 0
    assert all("indexer_kl" in r for r in _records(warm))
    ckpt = warm / "checkpoints" / "checkpoint-00000002"
    before, after = load_dense(qwen3, indexer=None), load_dense(ckpt)
    for name, p in before.state_dict().items():                   # warm-up leaves the dense model alone
        assert torch.equal(p, after.state_dict()[name]), name
    assert after.config.indexer.topk == 16

    assert main(["sparsify", "--stage", "sparse", "--init", str(warm), "--out", str(sparse), "--steps", "2",
                 "--corpus", str(corpus), "--lr", "1e-4", "--indexer-lr", "1e-3", *COMMON]) == 0
    assert all("indexer_kl_selected" in r and "lm_loss" in r for r in _records(sparse))
    assert main(["sparsify", "--stage", "sparse", "--init", str(warm), "--out", str(sparse), "--steps", "3",
                 "--corpus", str(corpus), "--lr", "1e-4", "--indexer-lr", "1e-3", "--resume", *COMMON]) == 0
    assert len(_records(sparse)) == 3

    final = sparse / "checkpoints" / "checkpoint-00000003"
    saved = json.loads((final / "config.json").read_text())
    original = json.loads((qwen3 / "config.json").read_text())
    assert saved.pop("dsa_retrofit")["topk"] == 16
    saved.pop("dtype"), original.pop("dtype")
    assert saved == original
    ours = load_dense(final).eval()
    hf = transformers.Qwen3ForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(0, 260, (1, 30), generator=torch.Generator().manual_seed(0))
    from dsv32 import AttentionOptions
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention=AttentionOptions(sparse=False)).logits, hf(ids).logits,
                                   atol=1e-4, rtol=0)

    report = tmp_path / "eval"
    assert main(["eval", "--model", str(sparse), "--corpus", str(corpus), "--seq-len", "256", "--val-fraction", "0.2",
                 "--lengths", "230", "--depths", "0,1", "--tasks", "passkey", "--examples-per-cell", "1",
                 "--eval-sequences", "2", "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "[dense] held-out loss" in out and "[sparse k=16] held-out loss" in out
    result = json.loads((report / "eval.json").read_text())
    assert result["index_topk"] == 16 and 0.0 <= result["sparse"]["16"]["indexer_recall"] <= 1.0

    res = generate(ours, [[5, 6, 7] * 8], max_new_tokens=4, temperature=0.0, stop_tokens=[])
    assert res.tokens.shape == (1, 4)
    assert main(["generate", "--model", str(final), "--prompt", "abc" * 10, "--max-new-tokens", "3",
                 "--temperature", "0", "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out.startswith("abc" * 10)


def test_mqa_form_gives_the_grouped_scores():
    model = retrofitted(seed=2)
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 7, 32)
    cos, sin = model.rotary(torch.arange(7).expand(2, 7))
    q, kv = attn.mqa_form(x, cos, sin)
    q_g, k_g, _ = attn.project(x, cos, sin)
    R = attn.n_heads // attn.n_groups
    grouped = torch.einsum("bthd,bshd->bths", q_g, k_g.repeat_interleave(R, dim=2))
    torch.testing.assert_close(torch.einsum("bthc,bsc->bths", q, kv), grouped, atol=1e-5, rtol=1e-5)
