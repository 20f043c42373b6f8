"""Crash safety of the training verbs: the small version of scripts/crash_test.py (each of
pretrain, sparsify, sft and grpo SIGKILLed inside a checkpoint save, resumed, and its per-step
metrics compared with an uninterrupted run), and the default checkpoint cadence that bounds what
a crash loses. The kills wait on events (the run says it is inside the save), not on time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsv32.cli import build_parser
from tests.killing import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_long_running_verbs_checkpoint_every_100_steps_by_default():
    parser = build_parser()
    for verb, flag in (("pretrain", "save_every"), ("sparsify", "save_every"), ("sft", "save_every"),
                       ("grpo", "checkpoint_every")):
        assert getattr(parser.parse_args([verb]), flag) == 100, verb


@pytest.mark.slow
def test_every_verb_killed_inside_a_save_resumes_onto_the_uninterrupted_metrics(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "crash_test.py"), "--small", "--work", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)   # a hang guard
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip("| ") for row in rows[1:]] == ["pretrain", "sparsify", "sft", "grpo"]
    for row in rows[1:]:
        assert row[3] == "1" and row[8] == "yes" and row[9].strip(" |") == "0", row   # 1 kill in a save, equal, clean
    assert "4 kills, every resumed run equals its uninterrupted run" in proc.stdout
