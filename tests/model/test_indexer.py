"""The lightning indexer's FP8/Hadamard numerics (scores and selection: tests/kernels)."""

from __future__ import annotations

import pytest
import torch

from dsv32 import Records
from dsv32.model.indexer import fp8_e4m3_roundtrip, hadamard_matrix


def test_hadamard_is_orthonormal_and_keeps_dot_products():
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16), atol=1e-6, rtol=0)
    a, b = torch.randn(5, 16), torch.randn(7, 16)
    torch.testing.assert_close((a @ h) @ (b @ h).T, a @ b.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_fp8_roundtrip_error_and_power_of_two_scales():
    x = torch.randn(64, 256) * 3
    y = fp8_e4m3_roundtrip(x)
    rel = ((y - x).abs() / x.abs().clamp(min=1e-3)).median()
    assert rel < 0.05                      # e4m3 has a 3-bit mantissa: ~2^-4 relative error
    assert not torch.equal(x, y)
    # Values exactly representable at the chosen power-of-two scale survive unchanged.
    z = torch.tensor([[1.0, 2.0, -0.5, 448.0 / 4]])
    torch.testing.assert_close(fp8_e4m3_roundtrip(z), z)


def test_fp8_indexer_changes_scores_only_slightly():
    from dsv32 import DSV32ForCausalLM
    from tests.conftest import randomize_, tiny_config
    cfg = tiny_config(index_topk=4)
    plain = randomize_(DSV32ForCausalLM(cfg), seed=1).eval()
    fp8 = DSV32ForCausalLM(cfg.replace(index_fp8=True)).eval()
    fp8.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain(ids, records=Records(record_indices=True))
        b = fp8(ids, records=Records(record_indices=True))
    overlap = [len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in
               zip(a.indices[1].view(-1, 4), b.indices[1].view(-1, 4))]
    assert sum(overlap) / len(overlap) > 0.8
