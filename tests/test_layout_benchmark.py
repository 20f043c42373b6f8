"""benchmarks/bench_layout.py at tiny sizes: both layouts timed for a one-row product (with the
read rate) and a GEMM (forward and forward + backward); a bad shape is one clear error."""

from __future__ import annotations

import pytest

from benchmarks import bench_layout


def test_tiny_run_prints_both_layouts(capsys, keep_threads):
    bench_layout.main(["--shapes", "64x32", "--rows", "1", "3", "--reps", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64x32 |")]
    assert len(lines) == 2
    assert lines[0].startswith("| 64x32 | 1 |") and "GB/s" in lines[0] and "read" in lines[0]
    assert lines[1].startswith("| 64x32 | 3 |") and "fwd+bwd" in lines[1]


@pytest.mark.parametrize("bad", [["--shapes", "64by32"], ["--shapes", "0x32"], ["--rows", "0"]])
def test_bad_arguments_are_one_clear_error(bad, capsys):
    with pytest.raises(SystemExit):
        bench_layout.main(bad)
    err = capsys.readouterr().err
    assert "shape" in err or "--rows" in err
