"""The GPU benchmark's own code at tiny shapes: its index pattern, its workloads (the same
Triton entry points, under the interpreter on CPU) and its FLOP counts. Timing needs CUDA and
is not covered; without CUDA the script must refuse with a clear message.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_env import DEVICE   # first: picks the Triton interpreter without a GPU

pytest.importorskip("triton", reason="triton is not installed (pip install dsv32[gpu])")

from benchmarks import bench_gpu as bench  # noqa: E402

TINY = bench.Shapes(heads=3, c=28, dv=20, topk=8, d_qk=24, d_v=16, h_i=4, d_i=16, dtype=torch.float32)


def test_spread_indices_are_causal_distinct_and_as_many_as_allowed():
    idx = bench.spread_indices(40, 8, 0, "cpu")
    assert idx.dtype == torch.int32
    for t in range(40):
        chosen = idx[t][idx[t] >= 0]
        assert len(chosen) == min(8, t + 1) == len(set(chosen.tolist()))
        assert chosen.max() <= t
    torch.testing.assert_close(bench.spread_indices(1, 8, 39, "cpu")[0], idx[39])


@pytest.mark.parametrize("backward", [False, True])
def test_prefill_workloads(backward):
    run, flops = bench.sparse_prefill(40, TINY, DEVICE, backward)
    outs = run()
    assert all(torch.isfinite(o).all() for o in (outs if backward else (outs,)))
    assert flops == 2 * 40 * 8 * 3 * ((4 * 28 + 3 * 20) if backward else (28 + 20))
    run, flops = bench.dense_prefill(40, TINY, DEVICE, backward)
    run()
    assert flops == 2 * 3 * (40 * 40 / 2) * ((4 * 24 + 3 * 16) if backward else (24 + 16))


def test_decode_and_indexer_workloads():
    run, flops = bench.sparse_decode(30, 2, TINY, DEVICE)
    assert run().shape == (2, 1, 3, 20) and flops == 2 * 2 * 8 * 3 * 48
    run, flops = bench.dense_decode(30, 2, TINY, DEVICE)
    assert run().shape == (2, 3, 1, 24) and flops == 2 * 2 * 3 * 30 * 40
    run, flops = bench.indexer(30, 30, 1, TINY, DEVICE)
    assert run().shape == (1, 30, 8) and flops == 2 * 450 * 4 * 16
    run, flops = bench.indexer(1, 30, 2, TINY, DEVICE)
    assert (run() >= 0).all() and flops == 2 * 2 * 30 * 4 * 16


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the no-GPU exit")
def test_refuses_without_cuda(capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
