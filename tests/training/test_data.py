"""Corpus reading, packing (exact coverage, EOS separators), determinism and exact resume."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsv32.tokenizer import ByteTokenizer
from dsv32.training.data import (Document, JsonlSequences, PackedSequences, read_documents, read_jsonl_examples,
                                 split_documents, stdlib_documents)

TOK = ByteTokenizer()


def _docs(n: int = 7) -> list[Document]:
    return [Document(f"doc{i}", f"document {i}: " + "é☃x" * i) for i in range(n)]


def _epoch_stream(packer: PackedSequences, doc_ids: list[list[int]], epoch: int) -> list[int]:
    """What epoch `epoch` must consist of: every document once, in that epoch's order."""
    return [t for i in packer.epoch_order(epoch) for t in doc_ids[i]]


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("seq_len", [2, 5, 16, 300])
def test_packing_covers_each_epoch_exactly_once(seq_len, add_bos):
    docs = _docs()
    packer = PackedSequences(docs, TOK, seq_len, seed=3, add_bos=add_bos)
    doc_ids = [TOK.encode(d.text, add_bos=add_bos, add_eos=True) for d in docs]
    epochs = 3
    total = epochs * packer.epoch_tokens
    stream: list[int] = []
    while len(stream) < total:
        seq = next(packer)
        assert seq.shape == (seq_len,) and seq.dtype == torch.int64
        stream += seq.tolist()
    expected = sum((_epoch_stream(packer, doc_ids, e) for e in range(epochs)), [])
    assert stream[:total] == expected
    # Each epoch is the documents separated by EOS, each exactly once.
    first = stream[:packer.epoch_tokens]
    assert first.count(TOK.eos_id) == len(docs)
    texts = TOK.decode(first, skip_special=False).split("<|eos|>")[:-1]
    if add_bos:
        assert all(t.startswith("<|bos|>") for t in texts)
        texts = [t[len("<|bos|>"):] for t in texts]
    assert sorted(texts) == sorted(d.text for d in docs)
    assert packer.epoch_order(0) != packer.epoch_order(1)  # reshuffled per epoch


def test_unshuffled_order_and_batches():
    docs = _docs(3)
    packer = PackedSequences(docs, TOK, 4, shuffle=False)
    assert packer.epoch_order(0) == packer.epoch_order(5) == [0, 1, 2]
    batch = packer.next_batch(3)
    assert batch.shape == (3, 4)
    assert batch.flatten().tolist() == TOK.encode(docs[0].text, add_eos=True)[:12]


def test_determinism_by_seed():
    docs = _docs()
    a, b, c = (PackedSequences(docs, TOK, 8, seed=s) for s in (1, 1, 2))
    runs = [x.next_batch(40) for x in (a, b, c)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@given(seq_len=st.integers(2, 40), before=st.integers(0, 30), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_resume_yields_identical_remaining_stream(seq_len, before, seed):
    docs = _docs(5)
    original = PackedSequences(docs, TOK, seq_len, seed=seed)
    for _ in range(before):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    rest = original.next_batch(25)
    resumed = PackedSequences(docs, TOK, seq_len, seed=seed)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(25), rest)
    assert resumed.state_dict() == original.state_dict()


def test_resume_refuses_other_corpus_or_settings():
    docs = _docs()
    state = PackedSequences(docs, TOK, 8, seed=1).state_dict()
    assert set(state) == {"epoch", "position", "seed", "seq_len", "shuffle", "add_bos", "fingerprint"}
    with pytest.raises(ValueError, match="fingerprint"):
        PackedSequences(docs[:-1], TOK, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1 but this sampler has seed=2"):
        PackedSequences(docs, TOK, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="state must have keys"):
        PackedSequences(docs, TOK, 8, seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="position"):
        PackedSequences(docs, TOK, 8, seed=1).load_state_dict({**state, "position": 10**9})


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        PackedSequences(_docs(), TOK, 1)
    with pytest.raises(ValueError, match="documents is empty"):
        PackedSequences([], TOK, 8)
    with pytest.raises(ValueError, match="batch_size"):
        PackedSequences(_docs(), TOK, 8).next_batch(0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_documents(_docs(), 1.0)


def test_read_documents_walks_sorted_and_skips_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta\n")
    (tmp_path / "a.txt").write_text("alpha ☃\n")
    (tmp_path / "b" / "c.md").write_text("gamma\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "nul.txt").write_bytes(b"text\x00with nul")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden\n")
    docs = read_documents(tmp_path)
    assert [d.text for d in docs] == ["alpha ☃\n", "gamma\n", "zeta\n"]
    assert [d.text for d in read_documents(tmp_path, extensions=["md"])] == ["gamma\n"]
    assert [d.text for d in read_documents([tmp_path / "b" / "z.txt", tmp_path / "a.txt"])] == ["zeta\n", "alpha ☃\n"]


def test_read_documents_byte_cap_cuts_at_line_break(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "b.txt").write_text("four\n")
    assert [d.text for d in read_documents(tmp_path, max_bytes=10)] == ["one\ntwo\n"]
    (tmp_path / "c.txt").write_text("☃☃☃")
    assert read_documents(tmp_path / "c.txt", max_bytes=5)[0].text == "☃"


def test_empty_corpus_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"no text found in corpus path.*{tmp_path.name}"):
        read_documents(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"\x00")
    (tmp_path / "y.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        read_documents(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "nope")
    with pytest.raises(ValueError, match="max_bytes"):
        read_documents(tmp_path, max_bytes=0)


def test_stdlib_corpus_is_capped_python_source():
    docs = stdlib_documents(max_bytes=50_000)
    assert sum(len(d.text.encode()) for d in docs) <= 50_000
    assert all(d.source.endswith(".py") and "site-packages" not in d.source for d in docs)
    assert docs == stdlib_documents(max_bytes=50_000)


def test_split_by_document_hash():
    docs = [Document(f"d{i}", f"text number {i}") for i in range(400)]
    train, val = split_documents(docs, 0.25)
    assert len(train) + len(val) == 400 and 60 < len(val) < 140
    # Membership depends on the text only: not on order, and not on the other documents.
    train2, val2 = split_documents(list(reversed(docs))[:200], 0.25)
    assert set(d.text for d in val2) == set(d.text for d in val if d in docs[200:])
    assert split_documents(docs, 0.25, salt="other")[1] != val


# ----------------------------------------------------------------------------- JSONL (ids, labels)
def test_jsonl_examples_become_padded_labelled_batches_and_resume(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"ids": [1, 2, 3], "labels": [-100, 2, 3]}\n\n{"ids": [4, 5]}\n{"ids": [6, 7, 8, 9]}\n')
    data = JsonlSequences(path, seq_len=5, pad_id=0, shuffle=False)
    ids, labels = data.next_batch(2)
    assert ids.tolist() == [[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]]
    assert labels.tolist() == [[-100, 2, 3, -100, -100], [4, 5, -100, -100, -100]]   # no label: all trained
    state = json.loads(json.dumps(data.state_dict()))
    after = data.next_batch(3)
    again = JsonlSequences(path, seq_len=5, pad_id=0, shuffle=False)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(3), after))
    assert after.ids[1].tolist() == [1, 2, 3, 0, 0]                                   # the next epoch


@pytest.mark.parametrize("line,message", [
    ("not json", "not JSON"),
    ('{"ids": [1, 2], "labels": [2]}', "'labels' has 1 entries but 'ids' has 2"),
    ('{"ids": [1, -2]}', "'ids' must be a non-empty list of integers >= 0"),
    ('{"ids": [1, 2], "labels": [-5, 2]}', "-100"),
    ('{"tokens": [1]}', 'expected an object with "ids"'),
    ('{"ids": [1], "label": [1]}', "unknown keys"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ids": [1, 2]}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2") + ".*" + re.escape(message)):
        read_jsonl_examples(path)


def test_jsonl_refuses_an_example_longer_than_seq_len(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"ids": [1, 2, 3, 4]}\n')
    with pytest.raises(ValueError, match="example 1 has 4 tokens, more than seq_len=3"):
        JsonlSequences(path, seq_len=3, pad_id=0)
