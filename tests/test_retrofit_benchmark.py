"""benchmarks/dsa_retrofit.py `quality --quick`: the retrieval study on a dense Llama-architecture
model, retrofitted, end to end at tiny sizes (seconds): it prints the table, the comparison with
the issue's targets and the step times. The `speed` part is not run here (it times long caches)."""

from __future__ import annotations

import json

from benchmarks import dsa_retrofit


def test_quality_quick_prints_the_table_targets_and_step_times(capsys, tmp_path, keep_threads):
    dsa_retrofit.main(["quality", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| stage | T | k | accuracy | answer NLL | needle selected (per layer) | recall of dense mass |" in out
    for stage in ("| dense | 64 | dense |", "| sparse, untrained indexer (control) | 64 | 8 (T/8) |",
                  "| sparse, after sparse training | 64 | 4 (T/16) |"):
        assert stage in out
    assert "sparse, after sparse training, k=8 (T/8): vs dense" in out
    assert out.count("[targets: within 2 points") == 2                  # against dense and dense continued
    assert "| dense, continued as long as sparse training | 64 | dense |" in out
    assert "median trainer step: dense" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sizes"]["family"] == "llama" and result["sizes"]["kv_heads"] == 2
    assert len(result["rows"]) == 2 + 2 + 3 * 2 * 2                  # dense, dense continued, 3 sparse stages
