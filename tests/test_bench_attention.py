"""benchmarks/bench_attention.py at a tiny size (seconds): --sparse-only --cpu-time prints both
matmul peaks and one sparse row, and a bad --repeats is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sparse_only_cpu_time_prints_the_peaks_and_a_row():
    proc = _run("--T", "128", "--heads", "4", "--topk", "64", "--hidden", "64", "--sparse-only", "--cpu-time")
    assert proc.returncode == 0, proc.stderr
    assert "1 threads, thread CPU time" in proc.stdout and "torch.mm (MKL)" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|   128 |   4 |   64 |")]
    assert len(rows) == 1 and "dense" not in proc.stdout


def test_bad_repeats_is_one_clear_error():
    proc = _run("--repeats", "0")
    assert proc.returncode != 0 and "--repeats must be >= 1, got 0" in proc.stderr
