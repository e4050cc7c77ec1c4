"""Byte-level corpora and the deterministic batch order (a function of seed and step only, so a resumed or
multi-process run sees exactly the batches an uninterrupted single-process run sees)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from shared_kernels.runconfig import ConfigError
from shared_kernels.testing import shared_data_dir

# Fixed list: the same bytes on every machine with the same Python version.
STDLIB_MODULES = (
    "argparse",
    "ast",
    "bisect",
    "calendar",
    "configparser",
    "csv",
    "dataclasses",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "json.decoder",
    "json.encoder",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "statistics",
    "string",
    "tarfile",
    "tempfile",
    "textwrap",
    "tokenize",
    "typing",
    "urllib.parse",
    "zipfile",
)


def load_corpus(corpus: str, max_bytes: int) -> bytes:
    """The raw bytes of `corpus`: "stdlib", "tinyshakespeare", or a path to a text file."""
    if corpus == "stdlib":
        parts = []
        for name in STDLIB_MODULES:
            source = inspect.getsourcefile(importlib.import_module(name))
            parts.append(Path(source).read_bytes())
        data = b"\n\n".join(parts)
    elif corpus == "tinyshakespeare":
        root = shared_data_dir()
        if root is None or not (root / "tinyshakespeare" / "input.txt").is_file():
            raise ConfigError(
                "data.corpus='tinyshakespeare' needs ../shared/data/tinyshakespeare/input.txt or $SHARED_DATA"
            )
        data = (root / "tinyshakespeare" / "input.txt").read_bytes()
    else:
        path = Path(corpus)
        if not path.is_file():
            raise ConfigError(
                f"data.corpus: {corpus!r} is neither 'stdlib', 'tinyshakespeare' nor an existing file"
            )
        data = path.read_bytes()
    return data[:max_bytes]


def check_corpus_fits(n_train: int, n_val: int, seq_len: int, longest_eval: int) -> None:
    """Before any work: the training bytes must hold a training window and the validation bytes the longest
    evaluation window (else the run would fail after training, at evaluation)."""
    if n_train <= seq_len + 1:
        raise ConfigError(
            f"data: {n_train} training bytes are too few for train.seq_len={seq_len} (raise "
            "data.max_bytes or use a larger data.corpus)"
        )
    if n_val <= longest_eval:
        raise ConfigError(
            f"data: {n_val} validation bytes are too few for the longest evaluation window "
            f"({longest_eval} = train.seq_len x max(eval.length_multipliers)); raise data.max_bytes "
            "or data.val_fraction, or lower eval.length_multipliers"
        )


def split_corpus(data: bytes, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors: the first 1 - val_fraction of the bytes, then the rest."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut].clone(), tokens[cut:].clone()


def batch_offsets(step: int, seed: int, n_tokens: int, seq_len: int, batch_size: int) -> torch.Tensor:
    """(batch_size,) start offsets of step `step`'s global batch, drawn from a generator seeded by
    (seed, step)."""
    if n_tokens <= seq_len + 1:
        raise ValueError(f"corpus of {n_tokens} bytes is too short for train.seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=gen)


def windows(tokens: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets (B, seq_len) int64 starting at `offsets`."""
    idx = offsets[:, None] + torch.arange(seq_len + 1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_offsets(n_tokens: int, length: int, count: int) -> torch.Tensor:
    """`count` evenly spaced window starts over the validation bytes (fewer when the text is short)."""
    last = n_tokens - length - 1
    if last < 0:
        raise ValueError(f"validation text ({n_tokens} bytes) is shorter than the evaluation length {length}")
    return torch.linspace(0, last, min(count, last + 1)).long()
