"""The lightning indexer's Hadamard rotation and FP8 simulation at model level (scores and
selection: tests/kernels; the FP8 number format itself: tests/test_fp8.py)."""

from __future__ import annotations

import pytest
import torch

from dsv32 import Records
from dsv32.model.indexer import hadamard_matrix


def test_hadamard_is_orthonormal_and_keeps_dot_products():
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16), atol=1e-6, rtol=0)
    a, b = torch.randn(5, 16), torch.randn(7, 16)
    torch.testing.assert_close((a @ h) @ (b @ h).T, a @ b.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_fp8_indexer_changes_scores_only_slightly():
    from dsv32 import DSV32ForCausalLM
    from tests.conftest import tiny_model
    plain = tiny_model(seed=1, index_topk=4).eval()
    cfg = plain.config
    fp8 = DSV32ForCausalLM(cfg.replace(index_fp8=True)).eval()
    fp8.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain(ids, records=Records(record_indices=True))
        b = fp8(ids, records=Records(record_indices=True))
    overlap = [len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in
               zip(a.indices[1].view(-1, 4), b.indices[1].view(-1, 4))]
    assert sum(overlap) / len(overlap) > 0.8
