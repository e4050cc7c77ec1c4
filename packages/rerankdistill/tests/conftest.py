"""rerankdistill test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run far faster on one thread, and the CI machine's cores are shared: two threads on a
    loaded 2-core box were 40x slower per matmul than one."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
