"""The training verbs read text with the model's own tokenizer: a tiny Qwen3 checkpoint whose
folder holds a tokenizer.json of its own vocabulary (a character BPE, not bytes) goes through
`sparsify --stage warmup` -> `eval` -> `generate`; the data source, the held-out text and the
retrieval tasks are tokenized by that tokenizer, every checkpoint carries it, and a tokenizer
with ids beyond the model's vocabulary is one error naming both."""

from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import pytest
import torch

from dsv32.cli import main
from dsv32.tasks import MixedSequences, get_task
from dsv32.tasks.retrieval import fit_to_tokens
from dsv32.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from dsv32.training import commands
from dsv32.training.data import PackedSequences
from dsv32.training.evaluate import _needle_span
from tests.conftest import randomize_
from tests.training.helpers import documents, write_corpus

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
VOCAB = 260
COMMON = ["--seq-len", "256", "--tasks", "passkey", "--batch-size", "2", "--val-fraction", "0.2",
          "--log-every", "1", "--no-progress"]


def _train_bpe(folder: Path, vocab_size: int) -> Path:
    """A BPE over characters (spaces as '▁'), trained on the test corpus and passkey prompts; an
    unknown character is <unk>. Saved as folder/tokenizer.json with a tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = [d.text for d in documents(40, 150)]
    texts += [get_task("passkey").make_example(random.Random(i), 400, 0.5).text for i in range(20)]
    rust = Tokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>", "<pad>"],
                                  show_progress=False)
    rust.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    rust.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": "<pad>"}\n')
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """A tiny Qwen3 checkpoint (written by transformers) with a tokenizer of its own vocabulary."""
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "qwen3"
    randomize_(transformers.Qwen3ForCausalLM(cfg), seed=1, std=0.1).save_pretrained(path)
    _train_bpe(path, VOCAB)           # as large as the model's vocabulary, as for Llama-3
    return path


class _Spy:
    """Records what the verbs hand to the real Trainer and retrieval_eval (which still run)."""

    def __init__(self, monkeypatch):
        self.data, self.eval_tokenizers = [], []
        real_trainer, real_eval = commands.Trainer, commands.retrieval_eval

        def trainer(model, objective, data, *args, **kwargs):
            self.data.append(data)
            return real_trainer(model, objective, data, *args, **kwargs)

        def retrieval_eval(model, tokenizer, **kwargs):
            self.eval_tokenizers.append(tokenizer)
            return real_eval(model, tokenizer, **kwargs)

        monkeypatch.setattr(commands, "Trainer", trainer)
        monkeypatch.setattr(commands, "retrieval_eval", retrieval_eval)


def test_warmup_eval_generate_with_the_model_tokenizer(qwen3, tmp_path, capsys, monkeypatch):
    spy = _Spy(monkeypatch)
    tok = load_tokenizer(qwen3)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == VOCAB
    corpus = write_corpus(tmp_path / "corpus")
    warm = tmp_path / "warm"
    assert main(["sparsify", "--stage", "warmup", "--init", str(qwen3), "--out", str(warm), "--topk", "16",
                 "--steps", "2", "--corpus", str(corpus), "--lr", "1e-2", "--eval-every", "2",
                 "--eval-sequences", "2", *COMMON]) == 0
    data = spy.data[0]
    assert isinstance(data.tokenizer, HFTokenizer) and data.tokenizer.path == qwen3 / "tokenizer.json"
    # The ids the run trains on are the tokenizer's: every training document decodes back to its text.
    texts = {p.read_text() for p in corpus.glob("*.txt")}
    assert data.corpus._docs and all(tok.decode(ids.tolist()) in texts for ids in data.corpus._docs)
    assert max(int(ids.max()) for ids in data.corpus._docs) < tok.vocab_size

    ckpt = warm / "checkpoints" / "checkpoint-00000002"
    for name in ("tokenizer.json", "tokenizer_config.json"):      # the tokenizer travels with the checkpoint
        assert filecmp.cmp(ckpt / name, qwen3 / name, shallow=False)
        assert name in (ckpt / "checksums.sha256").read_text()

    assert main(["eval", "--model", str(warm), "--corpus", str(corpus), "--seq-len", "256", "--val-fraction", "0.2",
                 "--lengths", "230", "--depths", "0,1", "--tasks", "passkey", "--examples-per-cell", "1",
                 "--eval-sequences", "2"]) == 0
    assert "[sparse k=16] held-out loss" in capsys.readouterr().out
    assert spy.eval_tokenizers and all(t.path == ckpt / "tokenizer.json" for t in spy.eval_tokenizers)

    assert main(["generate", "--model", str(warm), "--prompt", "the pass key", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the pass key") and "\ufffd" not in out


def test_a_tokenizer_beyond_the_vocabulary_is_one_error(qwen3, tmp_path, capsys):
    big = _train_bpe(tmp_path / "big", 400)
    corpus = write_corpus(tmp_path / "corpus")
    assert load_tokenizer(big).vocab_size > VOCAB
    runs = [["sparsify", "--stage", "warmup", "--init", str(qwen3), "--out", str(tmp_path / "w"), "--steps", "1",
             "--corpus", str(corpus), *COMMON],
            ["eval", "--model", str(qwen3), "--corpus", str(corpus), "--lengths", "230", "--seq-len", "256",
             "--tasks", "passkey"],
            ["generate", "--model", str(qwen3), "--prompt", "a"]]
    for argv in runs:
        assert main([*argv, "--tokenizer", str(big)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert str(big) in err and f"vocab_size {VOCAB}" in err and str(qwen3) in err, err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_retrieval_needle_span_with_a_subword_tokenizer(qwen3):
    """The needle's answer tokens are found in the prompt's own tokenization, whatever the
    tokenizer merges across the space before the number."""
    tok = load_tokenizer(qwen3)
    for i in range(5):
        ex = get_task("passkey").make_example(random.Random(i), 300, 0.5)
        start, end = _needle_span(tok, ex, add_bos=False)
        ids = tok.encode(ex.prompt)
        assert tok.decode(ids[start:end]).strip().rstrip(".") == ex.answer
        at = ex.prompt.find(ex.answer, ex.meta["needle_offset"])              # bytes: positions are offsets
        assert _needle_span(ByteTokenizer(), ex, add_bos=True) == (1 + at, 1 + at + len(ex.answer))


def test_retrieval_examples_are_sized_in_the_tokenizer_tokens(qwen3):
    """Prompt lengths are the tokenizer's tokens: with this BPE (about 2 bytes a token) a
    600-token passkey prompt has about 1200 bytes, and lands within a few tokens of 600; with
    the byte tokenizer the example is exactly the one made at that many bytes."""
    tok = load_tokenizer(qwen3)
    count = lambda text: len(tok.encode(text))               # noqa: E731
    for name in ("passkey", "multikey_niah", "variable_tracking"):
        for i in range(3):
            def make(n, i=i):
                return get_task(name).make_example(random.Random(i), n, 0.5)
            ex = fit_to_tokens(make, 600, count)
            assert 590 <= count(ex.prompt) <= 600 and len(ex.prompt) > 800, (name, i)
            assert fit_to_tokens(make, 600, lambda text: len(text.encode())) == make(600)

    rows = MixedSequences(PackedSequences(documents(40, 150), tok, 512), tok, task_fraction=1.0,
                          tasks=["passkey"], task_loss="answer").next_batch(4)
    for ids, labels in zip(rows.ids, rows.labels):
        prompt = int((labels == -100).sum())                   # the prompt is the untrained prefix
        assert 512 - 1 - 32 - 10 <= prompt <= 512 - 1 - 32     # fills the row but for EOS and answer room
        assert int(ids.max()) < tok.vocab_size


def test_pretrain_takes_the_tokenizer_beside_its_config(tmp_path):
    """`pretrain --model folder/model.json` reads text with folder/tokenizer.json and its
    checkpoints carry it; `--tokenizer byte` overrides it (and then none is copied)."""
    from dsv32.config import ModelConfig
    folder = tmp_path / "cfg"
    _train_bpe(folder, 259)                                    # the tiny preset's vocabulary size
    (folder / "model.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_config()))
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--steps", "1", "--corpus", str(corpus), "--seq-len", "256", "--tasks", "passkey", "--batch-size", "1",
              "--val-fraction", "0.2", "--no-progress"]
    assert main(["pretrain", "--model", str(folder / "model.json"), "--out", str(tmp_path / "a"), *common]) == 0
    assert filecmp.cmp(tmp_path / "a/checkpoints/checkpoint-00000001/tokenizer.json", folder / "tokenizer.json",
                       shallow=False)
    assert main(["pretrain", "--model", str(folder / "model.json"), "--out", str(tmp_path / "b"),
                 "--tokenizer", "byte", *common]) == 0
    assert not (tmp_path / "b/checkpoints/checkpoint-00000001/tokenizer.json").exists()
