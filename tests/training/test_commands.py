"""The pretrain / sparsify / eval verbs, end to end at tiny sizes, and their one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import dsv32
from dsv32.cli import main
from tests.training.helpers import write_corpus

COMMON = ["--seq-len", "256", "--tasks", "passkey", "--batch-size", "2", "--val-fraction", "0.2",
          "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pre"
    assert main(["pretrain", "--model", "tiny", "--corpus", str(corpus), "--out", str(out), "--steps", "3",
                 "--save-every", "2", "--eval-every", "3", "--eval-sequences", "2", *COMMON]) == 0
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_then_warmup_then_sparse_then_eval(pretrained, corpus, tmp_path, capsys):
    assert [r["kind"] for r in _records(pretrained)] == ["train", "train", "train", "eval"]
    dsv32.load_pretrained(pretrained / "checkpoints" / "checkpoint-00000003")

    config = tmp_path / "warmup.json"               # options from a file; flags on the line win
    config.write_text(json.dumps({"stage": "warmup", "topk": 8, "steps": 5, "lr": 1e-2, "corpus": [str(corpus)]}))
    warm, sparse = tmp_path / "warm", tmp_path / "sparse"
    assert main(["sparsify", "--config", str(config), "--init", str(pretrained), "--out", str(warm),
                 "--steps", "2", *COMMON]) == 0
    records = _records(warm)
    assert len(records) == 2 and all("indexer_kl" in r for r in records)
    assert dsv32.load_pretrained(warm / "checkpoints" / "checkpoint-00000002").config.index_topk == 8

    assert main(["sparsify", "--stage", "sparse", "--init", str(warm), "--out", str(sparse), "--steps", "2",
                 "--corpus", str(corpus), "--lr", "1e-4", "--indexer-lr", "1e-3", *COMMON]) == 0
    assert all("indexer_kl_selected" in r and "lm_loss" in r for r in _records(sparse))

    report = tmp_path / "eval"
    assert main(["eval", "--model", str(sparse), "--corpus", str(corpus), "--seq-len", "256", "--val-fraction",
                 "0.2", "--lengths", "220,240", "--depths", "0,1", "--tasks", "passkey", "--examples-per-cell", "2",
                 "--eval-sequences", "2", "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "[dense] held-out loss" in printed and "[sparse k=8] held-out loss" in printed   # the recorded k
    result = json.loads((report / "eval.json").read_text())
    assert result["index_topk"] == 8
    sparse = result["sparse"]["8"]
    assert {(r["length"], r["depth"]) for r in sparse["retrieval"]} == {(220, 0), (220, 1), (240, 0), (240, 1)}
    assert 0.0 <= sparse["indexer_recall"] <= 1.0
    for name in ("retrieval_dense.png", "retrieval_sparse_k8.png", "selection_sparse_k8_layer1.png"):
        assert (report / name).stat().st_size > 1000


def test_stop_and_resume_gives_the_uninterrupted_losses(corpus, tmp_path):
    args = ["pretrain", "--model", "tiny", "--corpus", str(corpus), "--steps", "4", *COMMON]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-at", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    losses = [[r["loss"] for r in _records(tmp_path / run)] for run in ("whole", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _pretrain(corpus: Path, out: Path | None, *extra: str) -> list[str]:
    """The arguments that made `pretrained`, with `extra` appended (later flags win)."""
    return ["pretrain", "--model", "tiny", "--corpus", str(corpus), "--steps", "3", "--save-every", "2",
            "--eval-every", "3", "--eval-sequences", "2", *COMMON, *(["--out", str(out)] if out else []), *extra]


CASES = {
    "empty corpus": (lambda c, run, empty: _pretrain(empty, run.parent / "new"), "no text found in corpus path"),
    "seq-len": (lambda c, run, empty: _pretrain(c, run.parent / "new", "--seq-len", "8192"),
                "--seq-len 8192 is beyond the model's max_position_embeddings=4096"),
    "unknown task": (lambda c, run, empty: _pretrain(c, run.parent / "new", "--tasks", "passkey,nope"),
                     "unknown task 'nope'"),
    "other settings": (lambda c, run, empty: _pretrain(c, run, "--resume", "--lr", "0.5"),
                       "was made with other settings (train.lr: 0.003 vs 0.5"),
    "fresh over a run": (lambda c, run, empty: _pretrain(c, run), "already holds checkpoints"),
    "missing --out": (lambda c, run, empty: _pretrain(c, None), "--out is required"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_keeps_checkpoints(pretrained, corpus, tmp_path, capsys, case):
    build, message = CASES[case]
    (tmp_path / "empty").mkdir()
    before = _digest(pretrained / "checkpoints")
    capsys.readouterr()
    assert main(build(corpus, pretrained, tmp_path / "empty")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv32: error: ") and "\n" not in err and message in err, err
    assert _digest(pretrained / "checkpoints") == before
    dsv32.load_pretrained(pretrained / "checkpoints" / "checkpoint-00000003")


def test_sparsify_resume_with_another_topk_is_refused(pretrained, corpus, tmp_path, capsys):
    args = ["sparsify", "--stage", "warmup", "--init", str(pretrained), "--out", str(tmp_path / "w"),
            "--corpus", str(corpus), "--steps", "1", *COMMON]
    assert main([*args, "--topk", "8"]) == 0
    capsys.readouterr()
    assert main([*args, "--topk", "4", "--resume"]) == 2
    assert "another model config (index_topk: 8 vs 4" in capsys.readouterr().err


def test_pretrain_and_sparsify_on_a_jsonl_dataset(corpus, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"ids": [7, 8, 9, 10] * 8, "labels": [-100] * 28 + [7, 8, 9, 10]}) + "\n"
                            for _ in range(4)))
    out = tmp_path / "pre"
    assert main(["pretrain", "--model", "tiny", "--corpus", str(corpus), "--out", str(out), "--steps", "2",
                 "--data-jsonl", str(data), *COMMON]) == 0
    records = _records(out)
    assert [r["tokens_seen"] for r in records] == [8, 16]           # 2 rows x 4 labelled targets per step
    assert main(["sparsify", "--stage", "warmup", "--init", str(out), "--out", str(tmp_path / "warm"),
                 "--steps", "1", "--corpus", str(corpus), "--data-jsonl", str(data), *COMMON]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ids": [1, 2]}\n{"ids": [1, 2], "labels": [1]}\n')
    capsys.readouterr()
    assert main(["pretrain", "--model", "tiny", "--corpus", str(corpus), "--out", str(tmp_path / "x"),
                 "--steps", "1", "--data-jsonl", str(bad), *COMMON]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
