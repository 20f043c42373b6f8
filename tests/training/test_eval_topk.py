"""Top-k chosen at call time in evaluation: the same numbers as a model built with that
index_topk, the `dsv32 eval --topk` sweep and its table, its one-line refusals, and the eval
flags generated from `EvalConfig`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dsv32 import AttentionOptions, DSV32ForCausalLM
from dsv32.cli import _apply_config, build_parser, config_from_args, main
from dsv32.tokenizer import ByteTokenizer
from dsv32.training.commands import EvalConfig, _record_topk
from dsv32.training.dsa import selection_report
from dsv32.training.evaluate import lm_eval, retrieval_eval
from tests.conftest import randomize_, tiny_model
from tests.training.helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _evaluate(model: DSV32ForCausalLM, attention: AttentionOptions) -> dict:
    """Everything `dsv32 eval` measures for one attention setting, on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 256, (3, 40), generator=gen)
    report = selection_report(model, held_out[:2], attention=attention)
    rows = retrieval_eval(model, ByteTokenizer(), tasks=["passkey"], lengths=[230], depths=[0.0, 1.0],
                          examples_per_cell=2, attention=attention, batch_size=2)
    with torch.no_grad():
        logits = model(held_out, attention=attention).logits
    return {"lm": lm_eval(model, held_out, attention=attention, batch_size=2), "rows": rows,
            "recall": report.recall(attention.topk or model.config.index_topk), "indices": report.indices,
            "logits": logits}


@pytest.mark.parametrize("k", [3, 9])
def test_runtime_topk_evaluation_equals_a_model_built_with_that_k(k):
    """Loss, retrieval rows, selections, recall and logits at AttentionOptions(topk=k) are
    exactly those of a model built with index_topk=k from the same weights."""
    model = randomize_(tiny_model("byte", seed=3), seed=3).eval()            # index_topk 6
    built = DSV32ForCausalLM(model.config.replace(index_topk=k), init=False).eval()
    built.load_state_dict(model.state_dict())
    at_call = _evaluate(model, AttentionOptions(sparse=True, topk=k))
    at_build = _evaluate(built, AttentionOptions(sparse=True))
    assert at_call["lm"] == at_build["lm"] and at_call["rows"] == at_build["rows"]
    assert at_call["recall"] == at_build["recall"]
    assert at_call["indices"].keys() == at_build["indices"].keys()
    for layer, idx in at_call["indices"].items():
        assert idx.shape[-1] == k and torch.equal(idx, at_build["indices"][layer])
    torch.testing.assert_close(at_call["logits"], at_build["logits"], atol=0, rtol=0)
    # ... and k matters: the model's own k gives other numbers.
    own = _evaluate(model, AttentionOptions(sparse=True))
    assert own["lm"]["lm_loss"] != at_call["lm"]["lm_loss"]


def test_sparsify_topk_records_k_on_the_same_model():
    """`sparsify --topk K` keeps the model object and its weights; every layer then runs at K,
    exactly as AttentionOptions(topk=K) did before."""
    model = tiny_model(seed=2).eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids, attention=AttentionOptions(topk=4)).logits
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    _record_topk(model, 4)
    assert model.config.index_topk == 4
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--topk must be an integer >= 1, got 0"):
        _record_topk(model, 0)


def _eval_args(corpus: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "tiny", "--corpus", str(corpus), "--seq-len", "64", "--val-fraction", "0.2",
            "--lengths", "220,240", "--depths", "0,1", "--tasks", "passkey", "--examples-per-cell", "1",
            "--eval-sequences", "2", "--batch-size", "2", *extra]


def test_eval_sweeps_topk_and_prints_one_row_per_k(corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_eval_args(corpus, "--topk", "8,32", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:3] == ["attention", "lm_loss", "perplexity"]
    assert {"indexer_recall", "accuracy", "token_accuracy", "answer_nll"} <= set(header)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")[1:]]
            for line in table[1:]}
    assert list(rows) == ["dense", "sparse k=8", "sparse k=32"]
    assert rows["dense"][header.index("indexer_recall") - 1] == "-"
    result = json.loads((out / "eval.json").read_text())
    assert result["topk"] == [8, 32] and result["index_topk"] == 16 and set(result["sparse"]) == {"8", "32"}
    for label, measured in (("dense", result["dense"]), ("sparse k=8", result["sparse"]["8"]),
                            ("sparse k=32", result["sparse"]["32"])):
        for column, cell in zip(header[1:], rows[label]):
            assert cell == "-" or float(cell) == pytest.approx(measured[column], abs=5e-5), (label, column)
    recall = {k: result["sparse"][k]["indexer_recall"] for k in ("8", "32")}
    assert 0 < recall["8"] < recall["32"] <= 1               # more keys kept, more dense mass captured
    for name in ("retrieval_dense.png", "retrieval_sparse_k8.png", "selection_sparse_k32_layer1.png"):
        assert (out / name).stat().st_size > 1000


BAD = {
    "k <= 0": (["--topk", "0"], "topk must be integers >= 1 (keys per query), got 0"),
    "k negative": (["--topk", "8,-4"], "topk must be integers >= 1 (keys per query), got -4"),
    "k beyond the sequences": (["--topk", "8,300"], "--topk 300 is larger than the longest sequence this evaluation "
                                                    "reads (240 tokens: --seq-len 64, --lengths up to 240)"),
    "k with dense only": (["--attention", "dense", "--topk", "8"], "topk must be none with attention 'dense'"),
    "no k": (["--topk", ","], "topk must be one or more k values, or none"),
    "length 0": (["--lengths", "0"], "lengths must be integers >= 1 (prompt tokens), got 0"),
    "length too short": (["--lengths", "100"], "--lengths 100 is too short for task passkey"),
    "depth 1.5": (["--depths", "0,1.5"], "depths must be in [0, 1], got 1.5"),
    "no depths": (["--depths", ""], "depths must be one or more values"),
    "attention": (["--attention", "half"], "argument --attention: invalid choice: 'half'"),
    "examples": (["--examples-per-cell", "0"], "examples_per_cell must be an integer >= 1, got 0"),
    "task": (["--tasks", "arithmetic"], "task 'arithmetic' is a reasoning task"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_eval_input_is_one_line_before_any_model(corpus, case, capsys, monkeypatch):
    import dsv32.training.commands as commands
    monkeypatch.setattr(commands, "load_model", lambda *a, **kw: pytest.fail("loaded a model for bad input"))
    extra, message = BAD[case]
    assert main(_eval_args(corpus, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv32: error: ") and "\n" not in err and message in err, err


def _eval_namespace(*argv: str):
    return _apply_config(build_parser()._subparsers._group_actions[0].choices["eval"], list(argv))


def test_eval_flags_are_the_fields_of_EvalConfig_with_help_and_defaults(tmp_path, capsys):
    args = _eval_namespace()
    assert config_from_args(args, EvalConfig) == EvalConfig()            # the flags' defaults are the fields'
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
        assert f"(default: {shown})" in text, f.name
    assert config_from_args(_eval_namespace("--topk", "64,128,64", "--lengths", "512"), EvalConfig).topk == (64, 128)
    # A config file may give the lists as comma-separated text or as JSON lists; flags win.
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"topk": [64, 256], "lengths": "512,1024", "depths": [0, 0.5], "tasks": "passkey",
                                "attention": "sparse"}))
    config = config_from_args(_eval_namespace("--config", str(path), "--attention", "both"), EvalConfig)
    assert (config.topk, config.lengths, config.depths, config.tasks, config.attention) == \
        ((64, 256), (512, 1024), (0, 0.5), ("passkey",), "both")
    repo_config = Path(__file__).resolve().parents[2] / "configs" / "eval_small.json"
    config = config_from_args(_eval_namespace("--config", str(repo_config)), EvalConfig)
    assert (config.lengths, config.topk) == ((512, 1024, 2000), (64, 128, 256))
