"""Idiomaticity detection with reasoning LLMs: datasets, prompt conditions, inference backends, robust answer
parsing, macro-F1, resumable sweeps (arXiv 2508.13365).

The core (this namespace) needs only httpx, tqdm, pyyaml and numpy: torch and transformers are imported by
`idiomreason.backends.hf` / `vllm_offline` alone, when such a backend is built.
"""

from idiomreason.examples import LABELS, Example, Examples, MalformedRowError, RowProblem
from idiomreason.loaders import load_dataset
from idiomreason.metrics import accuracy, bootstrap_macro_f1, confusion_matrix, macro_f1, summarise
from idiomreason.parsing import extract_label
from idiomreason.prompts import Condition, Prompt, PromptTemplate, TemplateLibrary, build_prompt, get_template
from idiomreason.sweep import DatasetSpec, ModelSpec, SweepConfig, SweepResult, run_sweep

__all__ = [
    "LABELS",
    "Condition",
    "DatasetSpec",
    "Example",
    "Examples",
    "MalformedRowError",
    "ModelSpec",
    "Prompt",
    "PromptTemplate",
    "RowProblem",
    "SweepConfig",
    "SweepResult",
    "TemplateLibrary",
    "accuracy",
    "bootstrap_macro_f1",
    "build_prompt",
    "confusion_matrix",
    "extract_label",
    "get_template",
    "load_dataset",
    "macro_f1",
    "run_sweep",
    "summarise",
]
