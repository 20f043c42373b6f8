"""benchmarks/dsa_retrieval.py at tiny sizes (seconds): the curriculum flag parses, the study runs
every stage, and the table, the target line, the step times and the heatmaps come out."""

from __future__ import annotations

import json

import pytest

from benchmarks import dsa_retrieval


def test_quick_run_prints_the_table_targets_and_writes_heatmaps(capsys, tmp_path, keep_threads):
    dsa_retrieval.main(["--quick", "--seq-len", "64", "--num-pairs", "4", "--curriculum", "32:2", "--dense-steps", "4",
                        "--warmup-steps", "1", "--sparse-steps", "1", "--eval-examples", "4", "--threads", "1",
                        "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "curriculum [(32, 2)]" in out
    for row in ("| dense | 64 | dense |", "| sparse, untrained indexer (control) | 64 | 8 (T/8) |",
                "| sparse, after sparse training | 128 | 4 (T/32) |",
                "| dense, continued as long as sparse training | 64 | dense |"):
        assert row in out
    assert "target within 2" in out and "median trainer step: dense" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sizes"]["curriculum"] == [[32, 2]] and result["dense_steps_run"] == 4
    assert {p.name for p in tmp_path.glob("mqar_*.png")} == {"mqar_dense.png", "mqar_control.png", "mqar_sparse.png"}


def test_bad_curriculum_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        dsa_retrieval.main(["--curriculum", "32-2"])
    assert "expected T:N,T:N,... or 'none', got '32-2'" in capsys.readouterr().err
