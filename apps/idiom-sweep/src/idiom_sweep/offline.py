"""The offline default of `idiom-sweep` with no arguments: tiny models built here and SemEval-2022 2A dev.

Config paths starting with `builtin:` are resolved before the sweep runs:
- `builtin:tiny-<width>x<layers>` (a model path): a randomly initialised tiny Llama with the in-process BPE
  tokenizer (ChatML template), built once into `<out_dir>/builtin-models/<name>` (safetensors) and reused;
  its size in billions is its parameter count.
- `builtin:semeval2022-2a-dev` (a dataset path): the real SemEval-2022 Task 2A dev file from the shared data
  folder ($SHARED_DATA or ../shared/data) when present, otherwise the small fixture bundled here (invented
  sentences in the same format).

The tiny models are untrained: the default demonstrates and tests the whole pipeline offline (prompts,
generation, parsing, cache, table, plot), it measures nothing about idiomaticity.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import Any

BUILTIN = "builtin:"
BUILTIN_SEMEVAL_DEV = "builtin:semeval2022-2a-dev"
_TINY = re.compile(r"builtin:tiny-(\d+)x(\d+)")


DEFAULT_CONFIG = "default.yaml"  # in this package; what `idiom-sweep` with no --config runs


def default_config_path() -> Path:
    return Path(str(resources.files("idiom_sweep").joinpath(DEFAULT_CONFIG)))


def semeval_dev_folder() -> tuple[Path, str]:
    """(folder holding dev.csv + dev_gold.csv, where it came from)."""
    from shared_kernels.testing import shared_data_dir

    shared = shared_data_dir()
    if shared is not None and (shared / "semeval2022_task2a" / "dev_gold.csv").is_file():
        return shared / "semeval2022_task2a", "the real SemEval-2022 Task 2A dev set"
    fixture = Path(str(resources.files("idiom_sweep").joinpath("data/semeval_fixture")))
    return fixture, "the bundled fixture (the shared data folder is absent)"


def build_tiny_model(spec: str, out_dir: Path) -> tuple[Path, float]:
    """Build (or reuse) the tiny model a `builtin:tiny-<width>x<layers>` path names; (folder, size in B)."""
    m = _TINY.fullmatch(spec)
    if m is None:
        raise ValueError(
            f"unknown builtin model {spec!r}: expected builtin:tiny-<width>x<layers>, e.g. builtin:tiny-64x2"
        )
    width, layers = int(m.group(1)), int(m.group(2))
    if width % 16 or not 1 <= layers <= 16:
        raise ValueError(f"builtin model {spec!r}: width must be a multiple of 16 and layers 1..16")
    folder = out_dir / "builtin-models" / spec.removeprefix(BUILTIN)
    if not (folder / "model.safetensors").is_file():
        from shared_kernels.testing.tiny_lm import tiny_causal_lm, train_tokenizer

        tokenizer = train_tokenizer()
        tiny_causal_lm(save_dir=folder, tokenizer=tokenizer, seed=width * 100 + layers, hidden_size=width,
                       num_layers=layers, num_heads=4, num_kv_heads=2)  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return folder, n_params / 1e9


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def resolve_builtins(cfg: Any) -> tuple[Any, list[str]]:
    """`cfg` with every `builtin:` path replaced by a real one, and a line per replacement for the log."""
    notes = []
    models = []
    for entry in cfg.models:
        if entry.path is not None and entry.path.startswith(BUILTIN):
            folder, size_b = build_tiny_model(entry.path, Path(cfg.out_dir))
            notes.append(f"{entry.name}: tiny model {folder} ({size_b * 1e9:,.0f} parameters)")
            entry = dataclasses.replace(entry, path=str(folder), size_b=entry.size_b or size_b)
        models.append(entry)
    datasets = []
    for entry in cfg.datasets:
        if entry.path == BUILTIN_SEMEVAL_DEV:
            folder, source = semeval_dev_folder()
            notes.append(f"{entry.key or entry.name}: {source} ({folder})")
            entry = dataclasses.replace(entry, path=str(folder))
        elif entry.path.startswith(BUILTIN):
            raise ValueError(f"unknown builtin dataset {entry.path!r} (known: {BUILTIN_SEMEVAL_DEV})")
        datasets.append(entry)
    return dataclasses.replace(cfg, models=models, datasets=datasets), notes
