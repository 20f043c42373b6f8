"""Bad input, across every verb and the Python API (issue 13): each case asserts the exit code
(2 for a user error, 1 for a runtime failure), ONE line on stderr naming the field, flag or
file, no traceback, and that nothing already saved (a checkpoint folder, a run folder) changed.

The CLI runs in-process (`cli.main(argv)`); the shared files are made once per module."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv32
from dsv32.checkpoint import CheckpointError
from dsv32.cli import main
from tests.conftest import tiny_model

TRAIN = ["--seq-len", "32", "--task-fraction", "0", "--batch-size", "1", "--grad-accum", "1", "--eval-every", "0",
         "--no-progress"]
SFT = ["--task", "arithmetic", "--task-options", '{"digits": 1}', "--train-size", "8", "--eval-size", "2",
       "--steps", "1"]


# ------------------------------------------------------------------ shared files
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    corpus = root / "corpus"
    corpus.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(8):
        (corpus / f"d{i}.txt").write_text(" ".join(words[(i * j) % 8] for j in range(200)) + "\n")
    ckpt = root / "ckpt"                                  # a good checkpoint over the byte vocabulary
    tiny_model(seed=0, vocab_size=259).save_pretrained(ckpt)
    run = root / "run"                                    # a run folder with checkpoint 1
    assert main(["pretrain", "--model", "tiny", "--corpus", str(corpus), "--steps", "1", "--out", str(run),
                 *TRAIN]) == 0
    small_vocab = root / "small_vocab"                    # 97 ids: the byte tokenizer does not fit
    tiny_model(seed=0).save_pretrained(small_vocab)
    a_file = root / "a_file.txt"
    a_file.write_text("not a folder\n")
    configs = root / "configs"
    configs.mkdir()
    good = tiny_model(seed=0).config.to_hf_config()
    for name, content in {
        "only_type": {"model_type": "deepseek_v32"},
        "no_hidden": {k: v for k, v in good.items() if k != "hidden_size"},
        "list": [1, 2],
        "bad_group": {**good, "n_group": 3},
        "llama": {**good, "model_type": "llama"},
        "str_size": {**good, "hidden_size": "big"},
        "options_list": ["model", "tiny"],
        "unknown_option": {"model": "tiny", "bogus_option": 1},
    }.items():
        (configs / f"{name}.json").write_text(json.dumps(content))
    (configs / "broken.json").write_text('{"hidden_size": 64,')
    return {"root": root, "corpus": corpus, "ckpt": ckpt, "run": run, "small_vocab": small_vocab,
            "a_file": a_file, "configs": configs}


def _digests(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dsv32: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _fill(text: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ the CLI cases
# (id, argv with {placeholders} for the shared files, exit code, words the one line must hold)
CASES = [
    # configs: --model cfg.json, info, --config files
    ("info-config-only-model-type", ["info", "{configs}/only_type.json"], 2, ["missing required field", "hidden_size"]),
    ("info-config-no-hidden-size", ["info", "{configs}/no_hidden.json"], 2, ["no_hidden.json", "hidden_size"]),
    ("info-config-is-a-list", ["info", "{configs}/list.json"], 2, ["list.json", "JSON object"]),
    ("info-config-broken-json", ["info", "{configs}/broken.json"], 2, ["broken.json", "not valid JSON"]),
    ("info-config-bad-n-group", ["info", "{configs}/bad_group.json"], 2, ["n_group"]),
    ("info-config-wrong-model-type", ["info", "{configs}/llama.json"], 2, ["llama.json", "model_type", "'llama'"]),
    ("info-config-string-size", ["info", "{configs}/str_size.json"], 2, ["hidden_size", "big"]),
    ("info-unknown-preset", ["info", "v9"], 2, ["unknown preset", "v9"]),
    ("info-config-missing-file", ["info", "{root}/nowhere/config.json"], 2, ["config.json"]),
    ("pretrain-config-only-model-type", ["pretrain", "--model", "{configs}/only_type.json", "--out", "{root}/p1"],
     2, ["only_type.json", "missing required field"]),
    ("pretrain-config-is-a-list", ["pretrain", "--model", "{configs}/list.json", "--out", "{root}/p2"], 2,
     ["JSON object"]),
    ("options-file-not-a-table", ["generate", "--config", "{configs}/options_list.json"], 2, ["options_list.json"]),
    ("options-file-unknown-option", ["generate", "--config", "{configs}/unknown_option.json"], 2, ["bogus_option"]),
    ("options-file-missing", ["generate", "--config", "{root}/missing.json"], 2, ["missing.json", "does not exist"]),
    ("options-file-broken", ["generate", "--config", "{configs}/broken.json"], 2, ["broken.json", "not valid JSON"]),
    # checkpoints
    ("generate-folder-without-checkpoint", ["generate", "--model", "{corpus}", "--prompt", "a"], 2,
     ["corpus", "neither a checkpoint folder"]),
    ("generate-unknown-model", ["generate", "--model", "nosuchmodel", "--prompt", "a"], 2,
     ["nosuchmodel", "preset"]),
    ("generate-verify-a-preset", ["generate", "--model", "tiny", "--prompt", "a", "--verify"], 2,
     ["--verify", "preset"]),
    ("sparsify-init-missing", ["sparsify", "--stage", "warmup", "--init", "{root}/nothing", "--out", "{root}/s1",
                               *TRAIN], 2, ["--init", "nothing"]),
    ("eval-model-missing", ["eval", "--model", "{root}/nothing"], 2, ["--model", "nothing"]),
    ("convert-source-without-config", ["convert", "{corpus}", "{root}/c1"], 2, ["config.json"]),
    ("convert-onto-itself", ["convert", "{ckpt}", "{ckpt}"], 2, ["destination must differ"]),
    ("pretrain-resume-nothing", ["pretrain", "--model", "tiny", "--corpus", "{corpus}", "--out", "{root}/empty_run",
                                 "--resume", *TRAIN], 2, ["nothing to resume"]),
    ("pretrain-over-a-run", ["pretrain", "--model", "tiny", "--corpus", "{corpus}", "--out", "{run}", *TRAIN], 2,
     ["already holds checkpoints", "--resume"]),
    ("pretrain-resume-other-settings", ["pretrain", "--model", "tiny", "--corpus", "{corpus}", "--out", "{run}",
                                        "--resume", "--lr", "0.5", *TRAIN], 2, ["other settings", "lr"]),
    # prompts and tokenizers
    ("generate-empty-prompt", ["generate", "--model", "{ckpt}", "--prompt", ""], 2, ["prompt 0 is empty"]),
    ("generate-tokenizer-too-big", ["generate", "--model", "{small_vocab}", "--prompt", "a"], 2,
     ["tokenizer byte has ids up to 258", "vocab_size 97"]),
    ("generate-tokenizer-missing", ["generate", "--model", "{ckpt}", "--prompt", "a", "--tokenizer",
                                    "{root}/tok.json"], 2, ["tok.json"]),
    ("generate-too-long", ["generate", "--model", "{ckpt}", "--prompt", "a", "--max-new-tokens", "100000"], 2,
     ["max_new_tokens"]),
    ("generate-zero-new-tokens", ["generate", "--model", "{ckpt}", "--prompt", "a", "--max-new-tokens", "0"], 2,
     ["max_new_tokens"]),
    # sampling parameters
    ("temperature-nan", ["generate", "--model", "{ckpt}", "--prompt", "a", "--temperature", "nan"], 2,
     ["temperature", "nan"]),
    ("temperature-inf", ["generate", "--model", "{ckpt}", "--prompt", "a", "--temperature", "inf"], 2,
     ["temperature"]),
    ("temperature-negative", ["generate", "--model", "{ckpt}", "--prompt", "a", "--temperature", "-1"], 2,
     ["temperature"]),
    ("temperature-not-a-number", ["generate", "--model", "{ckpt}", "--prompt", "a", "--temperature", "hot"], 2,
     ["--temperature", "hot"]),
    ("top-p-zero", ["generate", "--model", "{ckpt}", "--prompt", "a", "--top-p", "0"], 2, ["top_p"]),
    ("top-p-nan", ["generate", "--model", "{ckpt}", "--prompt", "a", "--top-p", "nan"], 2, ["top_p"]),
    ("top-k-negative", ["generate", "--model", "{ckpt}", "--prompt", "a", "--top-k", "-1"], 2, ["top_k"]),
    ("generate-dtype-int8", ["generate", "--model", "tiny", "--prompt", "a", "--dtype", "int8"], 2,
     ["--dtype", "int8"]),
    ("generate-device-cuda", ["generate", "--model", "tiny", "--prompt", "a", "--device", "cuda"], 2,
     ["--device cuda", "CUDA is not available"]),
    ("generate-device-unknown", ["generate", "--model", "tiny", "--prompt", "a", "--device", "gpu9"], 2,
     ["--device", "gpu9"]),
    ("grpo-temperature-nan", ["grpo", "--model", "tiny", "--out", "{root}/g1", "--temperature", "nan", *SFT[:6]], 2,
     ["temperature"]),
    # training flags
    ("pretrain-lr-negative", ["pretrain", "--model", "tiny", "--out", "{root}/t1", "--lr", "-1", *TRAIN], 2, ["lr"]),
    ("pretrain-lr-nan", ["pretrain", "--model", "tiny", "--out", "{root}/t2", "--lr", "nan", *TRAIN], 2, ["lr"]),
    ("pretrain-steps-zero", ["pretrain", "--model", "tiny", "--out", "{root}/t3", "--steps", "0", *TRAIN], 2,
     ["steps"]),
    ("pretrain-batch-zero", ["pretrain", "--model", "tiny", "--out", "{root}/t4", *TRAIN, "--batch-size", "0"], 2,
     ["batch_size"]),
    ("pretrain-keep-zero", ["pretrain", "--model", "tiny", "--out", "{root}/t5", "--keep", "0", *TRAIN], 2,
     ["keep"]),
    ("pretrain-warmup-negative", ["pretrain", "--model", "tiny", "--out", "{root}/t6", "--warmup-steps", "-1",
                                  *TRAIN], 2, ["warmup_steps"]),
    ("pretrain-stop-at-zero", ["pretrain", "--model", "tiny", "--corpus", "{corpus}", "--out", "{root}/t7",
                               "--stop-at", "0", *TRAIN], 2, ["--stop-at", "0"]),
    ("pretrain-seq-len-too-long", ["pretrain", "--model", "tiny", "--out", "{root}/t8", *TRAIN, "--seq-len",
                                   "100000"], 2, ["--seq-len", "max_position_embeddings"]),
    ("pretrain-device-cuda", ["pretrain", "--model", "tiny", "--out", "{root}/t9", "--device", "cuda", *TRAIN], 2,
     ["CUDA is not available"]),
    ("pretrain-unknown-task", ["pretrain", "--model", "tiny", "--out", "{root}/t10", *TRAIN, "--tasks", "bogus"], 2,
     ["bogus"]),
    ("pretrain-corpus-missing", ["pretrain", "--model", "tiny", "--out", "{root}/t11", "--corpus",
                                 "{root}/no_corpus", *TRAIN], 2, ["no_corpus"]),
    ("pretrain-steps-not-int", ["pretrain", "--model", "tiny", "--out", "{root}/t12", "--steps", "1.5"], 2,
     ["--steps", "1.5"]),
    ("pretrain-no-out", ["pretrain", "--model", "tiny"], 2, ["--out"]),
    ("sparsify-no-init", ["sparsify", "--stage", "warmup", "--out", "{root}/s2"], 2, ["--init"]),
    ("sparsify-bad-stage", ["sparsify", "--stage", "cool", "--init", "{run}", "--out", "{root}/s3"], 2,
     ["--stage", "cool"]),
    ("unknown-flag", ["eval", "--bogus"], 2, ["--bogus"]),
    # task options
    ("sft-unknown-task", ["sft", "--model", "tiny", "--out", "{root}/f1", "--task", "bogus"], 2, ["bogus"]),
    ("sft-task-options-not-object", ["sft", "--model", "tiny", "--out", "{root}/f2", "--task-options", "[1]"], 2,
     ["--task-options"]),
    ("sft-task-options-broken", ["sft", "--model", "tiny", "--out", "{root}/f3", "--task-options", "{digits"], 2,
     ["--task-options", "JSON"]),
    ("sft-train-size-negative", ["sft", "--model", "tiny", "--out", "{root}/f4", "--train-size", "-1"], 2,
     ["--train-size"]),
    ("sft-dataset-missing", ["sft", "--model", "tiny", "--out", "{root}/f5", "--dataset", "{root}/d.jsonl"], 2,
     ["d.jsonl"]),
    ("sft-no-model", ["sft", "--out", "{root}/f6"], 2, ["--model"]),
    ("grpo-group-size-one", ["grpo", "--model", "tiny", "--out", "{root}/g2", "--group-size", "1", *SFT[:6]], 2,
     ["group_size"]),
    ("grpo-eval-without-held-out", ["grpo", "--model", "tiny", "--out", "{root}/g3", "--eval-every", "1",
                                    "--eval-size", "0", "--task-options", '{"digits": 1}', "--train-size", "4"], 2,
     ["--eval-every"]),
    # rewards
    ("grpo-reward-no-colon", ["grpo", "--model", "tiny", "--out", "{root}/r1", "--reward", "nocolon", *SFT[:6]], 2,
     ["reward", "nocolon"]),
    ("grpo-reward-missing-module", ["grpo", "--model", "tiny", "--out", "{root}/r2", "--reward",
                                    "no_such_module_x:score", *SFT[:6]], 2, ["no_such_module_x"]),
    ("grpo-reward-not-callable", ["grpo", "--model", "tiny", "--out", "{root}/r3", "--reward", "math:pi", *SFT[:6]],
     2, ["math:pi", "callable"]),
    ("grpo-reward-unknown-task", ["grpo", "--model", "tiny", "--out", "{root}/r4", "--reward", "task:bogus",
                                  *SFT[:6]], 2, ["bogus"]),
    # output paths
    ("pretrain-out-is-a-file", ["pretrain", "--model", "tiny", "--out", "{a_file}", *TRAIN], 2,
     ["--out", "a_file.txt", "is a file"]),
    ("sft-out-under-a-file", ["sft", "--model", "tiny", "--out", "{a_file}/sub", *SFT], 2, ["a_file.txt", "is a file"]),
    ("convert-dst-is-a-file", ["convert", "{ckpt}", "{a_file}"], 2, ["a_file.txt", "is a file"]),
    ("eval-out-is-a-file", ["eval", "--model", "{ckpt}", "--out", "{a_file}"], 2, ["a_file.txt"]),
    ("demo-out-is-a-file", ["demo", "--out", "{a_file}", "--quick"], 2, ["a_file.txt"]),
    # convert flags
    ("convert-max-shard-size-zero", ["convert", "{ckpt}", "{root}/c2", "--max-shard-size", "0"], 2,
     ["--max-shard-size", "0"]),
    ("convert-max-shard-size-words", ["convert", "{ckpt}", "{root}/c3", "--max-shard-size", "big"], 2,
     ["--max-shard-size", "big"]),
    ("convert-dtype-int8", ["convert", "{ckpt}", "{root}/c4", "--dtype", "int8"], 2, ["--dtype", "int8"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(case, files, capsys):
    _, argv, code, words = case
    argv = [_fill(a, files) for a in argv]
    before = _digests(files["ckpt"], files["run"])
    assert main(argv) == code
    line = _error_line(capsys)
    for word in words:
        assert _fill(word, files) in line, (word, line)
    assert _digests(files["ckpt"], files["run"]) == before          # nothing saved was touched


# ------------------------------------------------------------------ cases that need their own files
def test_corrupt_checkpoint_files(files, tmp_path, capsys):
    bad = _copy(files["ckpt"], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["generate", "--model", str(bad), "--prompt", "a"]) == 2
    line = _error_line(capsys)
    assert "model.safetensors" in line and "truncated" in line
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(files["ckpt"] / "config.json", pickled)
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    assert main(["generate", "--model", str(pickled), "--prompt", "a"]) == 2
    assert "pytorch_model.bin" in _error_line(capsys)


def test_nan_weights_named_before_sampling(files, tmp_path, capsys):
    bad = _copy(files["ckpt"], tmp_path / "nan")
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = float("inf")
    save_file(tensors, str(bad / "model.safetensors"))
    assert main(["generate", "--model", str(bad), "--prompt", "a"]) == 2
    line = _error_line(capsys)
    assert "lm_head.weight" in line and str(bad) in line


def test_crafted_dcp_metadata_on_resume_is_refused_and_never_runs(files, tmp_path, capsys):
    run = _copy(files["run"], tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    dcp = run / "checkpoints" / "checkpoint-00000001" / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps(Payload()))
    before = _digests(run)
    assert main(["pretrain", "--model", "tiny", "--corpus", str(files["corpus"]), "--out", str(run), "--resume",
                 "--steps", "2", *TRAIN]) == 2
    line = _error_line(capsys)
    assert ".metadata" in line and "system" in line and not marker.exists()
    assert _digests(run) == before


def test_read_only_output_folder(files, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:     # root ignores mode bits; answer as the kernel would for anyone else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: real(p, mode, **kw) and not (
            mode & os.W_OK and not os.stat(p).st_mode & stat.S_IWUSR))
    try:
        assert main(["sft", "--model", "tiny", "--out", str(locked / "run"), *SFT]) == 2
        assert f"{locked} is not writable" in _error_line(capsys)
        assert main(["convert", str(files["ckpt"]), str(locked / "c")]) == 2
        assert "not writable" in _error_line(capsys)
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def _disk_fills_after(monkeypatch, calls: int) -> None:
    """safetensors' writes succeed `calls` times, then fail as a full disk does."""
    from dsv32.checkpoint import hf
    real, count = hf.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", save_file)


def test_disk_full_during_a_checkpoint_exits_1_naming_the_intact_one(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _disk_fills_after(monkeypatch, 1)
    assert main(["pretrain", "--model", "tiny", "--corpus", str(files["corpus"]), "--out", str(out), "--steps", "3",
                 "--save-every", "1", *TRAIN]) == 1
    line = _error_line(capsys)
    intact = out / "checkpoints" / "checkpoint-00000001"
    assert "out of disk space" in line and f"checkpoint {intact} is intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000001"]   # no half-written one
    dsv32.load_pretrained(intact, verify=True)


def test_disk_full_during_convert_leaves_the_destination_as_it_was(files, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "dst"
    assert main(["convert", str(files["ckpt"]), str(dst), "--max-shard-size", "100KB"]) == 0
    before = _digests(dst)
    capsys.readouterr()
    _disk_fills_after(monkeypatch, 0)
    assert main(["convert", str(files["ckpt"]), str(dst), "--dtype", "bf16"]) == 1
    assert f"out of disk space writing {dst}" in _error_line(capsys)
    assert _digests(dst) == before and [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_divergence_is_one_line_exit_1(files, tmp_path, capsys):
    # Issue 13: --lr 1e6 printed a good message inside a traceback.
    out = tmp_path / "run"
    assert main(["pretrain", "--model", "tiny", "--corpus", str(files["corpus"]), "--out", str(out), "--steps", "6",
                 "--lr", "1e6", "--warmup-steps", "0", "--grad-clip", "0", *TRAIN]) == 1
    line = _error_line(capsys)
    assert "loss is" in line and "learning rate" in line and "no checkpoint was written" in line


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="temperature"):
        main(["generate", "--model", "tiny", "--prompt", "a", "--temperature", "nan", "--debug"])


def test_a_typo_key_in_a_config_is_a_one_line_warning(files, tmp_path, capsys):
    import warnings

    from dsv32.cli_support import format_warning
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**tiny_model().config.to_hf_config(), "hiden_size": 9}))
    with pytest.warns(UserWarning, match=r"unknown key 'hiden_size' .*did you mean 'hidden_size'") as record:
        assert main(["info", str(path)]) == 0
    assert len(record) == 1
    text = format_warning(record[0].message, record[0].category, record[0].filename, record[0].lineno)
    assert text.startswith("dsv32: warning: ") and text.count("\n") == 1 and str(path) in text
    assert warnings.formatwarning is not format_warning          # main() put the usual one back


# ------------------------------------------------------------------ the Python API
def _api_cases(files):
    from dsv32 import ModelConfig
    from dsv32.checkpoint.hf import parse_size
    from dsv32.cli import load_model
    from dsv32.inference import generate
    from dsv32.inference.sampling import SamplingParams
    from dsv32.rl.grpo import GRPOConfig
    from dsv32.training.checkpointing import CheckpointFolder
    from dsv32.training.trainer import TrainConfig
    return {
        "config-list": (lambda: ModelConfig.from_hf_config([1]), ValueError, "JSON object"),
        "config-missing-sizes": (lambda: ModelConfig.from_hf_config({"vocab_size": 10}), ValueError, "hidden_size"),
        "load-missing": (lambda: dsv32.load_pretrained(files["root"] / "none"), CheckpointError, "config.json"),
        "load-verify-no-manifest": (lambda: dsv32.load_pretrained(files["corpus"], verify=True), CheckpointError,
                                    "config.json"),
        "sampling-temperature-nan": (lambda: SamplingParams(temperature=math.nan), ValueError, "temperature"),
        "sampling-top-p": (lambda: SamplingParams(top_p=2.0), ValueError, "top_p"),
        "generate-empty-prompt": (lambda: generate(tiny_model(), [[]], max_new_tokens=2), ValueError, "prompt 0"),
        "generate-token-outside-vocab": (lambda: generate(tiny_model(), [[500]], max_new_tokens=2), ValueError,
                                         "500"),
        "train-config-lr-nan": (lambda: TrainConfig(lr=math.nan), ValueError, "lr"),
        "grpo-config-group-size": (lambda: GRPOConfig(group_size=1), ValueError, "group_size"),
        "shard-size-zero": (lambda: parse_size("0"), ValueError, "shard size"),
        "checkpoint-keep-zero": (lambda: CheckpointFolder(files["root"], keep=0), ValueError, "keep"),
        "load-model-dtype": (lambda: load_model("tiny", dtype="int8"), ValueError, "--dtype"),
    }


API_IDS = ["config-list", "config-missing-sizes", "load-missing", "load-verify-no-manifest",
           "sampling-temperature-nan", "sampling-top-p", "generate-empty-prompt", "generate-token-outside-vocab",
           "train-config-lr-nan", "grpo-config-group-size", "shard-size-zero", "checkpoint-keep-zero",
           "load-model-dtype"]


@pytest.mark.parametrize("name", API_IDS)
def test_python_api_bad_input(name, files):
    call, kind, words = _api_cases(files)[name]
    with pytest.raises(Exception) as e:
        call()
    assert isinstance(e.value, kind), e.value
    assert words in str(e.value) and "\n" not in str(e.value)
