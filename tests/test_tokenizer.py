"""The byte tokenizer and the Hugging Face tokenizer.json adapter share one protocol."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from dsv32 import ModelConfig
from dsv32.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

TEXTS = ["hello world", "naïve café — 東京 🚀", "", "line one\nline two\ttab"]


def test_byte_ids_match_tiny_preset():
    tok = ByteTokenizer()
    cfg = ModelConfig.preset("tiny")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (
        cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    assert isinstance(tok, Tokenizer)


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_split_multibyte_sequence_is_replaced_not_raised():
    tok = ByteTokenizer()
    ids = tok.encode("é🚀")  # 2 + 4 bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids[:4]) == "é\ufffd"
    # Joining the pieces at the id level restores the text: decoding is per run of bytes.
    assert tok.decode(ids[:3] + ids[3:]) == "é🚀"


def test_specials_skipped_or_rendered_and_never_injected():
    tok = ByteTokenizer()
    ids = tok.encode("hi", add_bos=True, add_eos=True) + [tok.pad_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|bos|>hi<|eos|><|pad|>"
    assert tok.eos_id not in tok.encode("<|eos|>")


def test_byte_batch_helpers():
    tok = ByteTokenizer()
    batch = tok.encode_batch(TEXTS, add_eos=True)
    assert [b[-1] for b in batch] == [tok.eos_id] * len(TEXTS)
    assert tok.decode_batch(batch) == TEXTS


def test_byte_bad_inputs():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([259])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")


def _train_bpe(folder, specials=("<s>", "</s>", "<pad>")):
    """A byte-level BPE trained on a few strings, saved as folder/tokenizer.json."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rust.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path = folder / "tokenizer.json"
    rust.save(str(path))
    return path


def test_hf_adapter_round_trip_and_specials(tmp_path):
    path = _train_bpe(tmp_path)
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert load_tokenizer(path).vocab_size == tok.vocab_size <= 320
    for text in TEXTS + ["unseen words: zebra ☃"]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.eos_id not in ids[1:-1]
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    assert tok.decode(tok.encode("hi", add_eos=True), skip_special=False) == "hi</s>"
    assert tok.decode_batch(tok.encode_batch(TEXTS)) == TEXTS


def test_hf_special_tokens_from_config_and_arguments(tmp_path):
    _train_bpe(tmp_path, specials=("[A]", "[B]", "[C]"))
    with pytest.raises(ValueError, match="no recognisable EOS.*eos_token="):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, eos_token="[B]")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, 1)  # PAD falls back to EOS
    with pytest.raises(ValueError, match="add_bos=True.*no BOS"):
        tok.encode("x", add_bos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "[A]"}, "eos_token": "[C]", "pad_token": "[B]"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 1)
    with pytest.raises(ValueError, match="eos_token='nope' is not in the vocabulary"):
        load_tokenizer(tmp_path, eos_token="nope")


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="neither 'byte' nor"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="must be a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="allowed: bos_token, eos_token, pad_token"):
        load_tokenizer(tmp_path, eos="x")
    with pytest.raises(ValueError, match="fixed special tokens"):
        load_tokenizer("byte", eos_token="x")
