"""pytest plugin loaded by the root conftest: markers, offline defaults, shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared_kernels.testing.data import shared_data_dir
from shared_kernels.testing.openai_server import served_tiny_model  # noqa: F401 - session fixture, registered here


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data folder (../shared/data or $SHARED_DATA); skips when absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            "shared data not found: set SHARED_DATA or place it at ../shared/data beside the checkout"
        )
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE tokenizer trained in-process, saved and re-loaded with AutoTokenizer."""
    from shared_kernels.testing.tiny_lm import train_tokenizer

    return train_tokenizer(save_dir=tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture
def tiny_lm_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    """A directory holding a saved tiny Llama (2 layers, hidden 64, 4 heads, 2 KV heads) and its tokenizer."""
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    tiny_causal_lm(save_dir=tmp_path / "tiny-llama", tokenizer=tiny_tokenizer)
    return tmp_path / "tiny-llama"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
