"""The GRPO-loop tests run tiny models, whose ops are too small to gain from several threads; on a
shared machine with a busy core, OpenMP's barrier waits make them many times slower. So these
tests run single-threaded, and restore the setting afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
