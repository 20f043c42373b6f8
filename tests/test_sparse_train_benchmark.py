"""benchmarks/sparse_train.py at tiny sizes (seconds): the LM table (dense and sparse steps
alternating), the selection table (ordered and unordered) and the attention crossover table."""

from __future__ import annotations

import re

from benchmarks import sparse_train


def test_tables_at_tiny_sizes(capsys, keep_threads):
    sparse_train.main(["--lengths", "96", "--selection-lengths", "96", "--heads", "4",
                       "--crossover-lengths", "96", "--k", "16", "--reps", "1"])
    out = capsys.readouterr().out
    assert "|  T | dense ms | sparse ms | sparse / dense |" in out
    assert re.search(r"\| 96 \| +\d+ \| +\d+ \| +\d+\.\d\dx \|", out)
    assert "|  T | per layer ms | 4 layers ms | unordered, per layer ms | unordered, 4 layers ms |" in out
    assert re.search(r"\| 4 \| \d+ / \d+ / \d+ \((masked|gather); rule: (masked|gather)\) \|", out)
