"""Integrity of what dsv32 writes (issue 13): a sha256 manifest beside every checkpoint's files,
`verify=True` / `--verify` naming the corrupt file, NaN/inf weights refused at load, file modes
that follow the umask (safetensors alone writes 0600), and `convert` progress per tensor."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv32
from dsv32.checkpoint import CheckpointError, convert_checkpoint
from dsv32.checkpoint.integrity import MANIFEST_NAME, read_manifest, verify_checksums
from dsv32.cli import main as cli
from tests.conftest import tiny_model


def _flip_a_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01                 # inside the last tensor's data: safetensors itself notices nothing
    path.write_bytes(bytes(data))


def test_save_writes_a_manifest_that_verifies(tmp_path):
    model = tiny_model(seed=0)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    entries = read_manifest(tmp_path / "m")
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and set(entries) == {*shards, "config.json", "model.safetensors.index.json"}
    for name, digest in entries.items():   # the `sha256sum -c` format: real digests of the files
        assert hashlib.sha256((tmp_path / "m" / name).read_bytes()).hexdigest() == digest
    assert verify_checksums(tmp_path / "m") == sorted(entries)
    dsv32.load_pretrained(tmp_path / "m", verify=True)


def test_a_flipped_bit_loads_silently_without_verify_and_is_named_with_it(tmp_path, capsys):
    tiny_model(seed=0).save_pretrained(tmp_path / "m")
    _flip_a_data_byte(tmp_path / "m" / "model.safetensors")
    dsv32.load_pretrained(tmp_path / "m")                       # what issue 13 found: not a word
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its sha256 differs"):
        dsv32.load_pretrained(tmp_path / "m", verify=True)
    assert cli(["generate", "--model", str(tmp_path / "m"), "--prompt", "a", "--verify"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err and err.count("\n") == 1
    assert cli(["convert", str(tmp_path / "m"), str(tmp_path / "out"), "--verify"]) == 2
    assert "model.safetensors is corrupt" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_verify_without_a_manifest_says_so(tmp_path):
    tiny_model(seed=0).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST_NAME}"):
        dsv32.load_pretrained(tmp_path / "m", verify=True)


def test_nan_weights_are_refused_at_load_naming_tensor_and_file(tmp_path, capsys):
    # Issue 13: a checkpoint with NaN weights failed deep inside sampling (multinomial).
    tiny_model(seed=0, vocab_size=259).save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' in .*model\.safetensors holds NaN or inf"):
        dsv32.load_pretrained(tmp_path / "m")
    assert cli(["generate", "--model", str(tmp_path / "m"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "model.norm.weight" in err and "NaN" in err and err.count("\n") == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        tiny_model(seed=0).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", MANIFEST_NAME):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o666 & ~umask, name


def test_convert_reports_progress_per_tensor(tmp_path, capsys):
    model = tiny_model(seed=0)
    model.save_pretrained(tmp_path / "m")
    seen = []
    convert_checkpoint(tmp_path / "m", tmp_path / "c", dtype="bf16", verify=True,
                       progress=lambda done, total, key, file: seen.append((done, total, file)))
    n = len(load_file(tmp_path / "m" / "model.safetensors"))
    assert [s[0] for s in seen] == list(range(1, n + 1)) and {s[1] for s in seen} == {n}
    verify_checksums(tmp_path / "c")
    assert cli(["convert", str(tmp_path / "m"), str(tmp_path / "c2")]) == 0
    err = capsys.readouterr().err
    assert f"tensor {n}/{n}" in err and "model.safetensors" in err
    loaded = dsv32.load_pretrained(tmp_path / "c2", verify=True)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_training_checkpoints_carry_checksums_of_every_file(tmp_path):
    from dsv32.training.checkpointing import STATE_NAME, CheckpointFolder
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters())
    path = CheckpointFolder(tmp_path).save(2, {"model": model, "reference": tiny_model(seed=1)}, opt, {"step": 2},
                                           settings={})
    assert set(verify_checksums(path)) == {"config.json", "model.safetensors", STATE_NAME}
    assert set(verify_checksums(path / "reference")) == {"config.json", "model.safetensors"}
    _flip_a_data_byte(path / STATE_NAME)
    with pytest.raises(CheckpointError, match=STATE_NAME):
        verify_checksums(path)


def test_nan_logits_are_named_where_they_are_sampled():
    from dsv32.inference.sampling import SamplingParams, sample_next
    logits = torch.zeros(2, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="logits hold NaN or inf"):
        sample_next(logits, SamplingParams(temperature=1.0))
    assert sample_next(torch.zeros(2, 5), SamplingParams(temperature=1.0)).tokens.shape == (2,)
