"""The idiom-sweep config: idiomreason's sweep (models x conditions x datasets) plus how to load in 4 bits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared_kernels.runconfig import option


@dataclass
class ModelEntry:
    name: str = option(help="label in caches and tables (change it when the model's generation changes)")
    path: str | None = option(None, "local path or hub id (transformers/vllm) or served model name (http)")
    backend: Literal["transformers", "vllm", "http"] = option("transformers", "inference backend")
    size_b: float | None = option(None, "parameters in billions for the plot (default: parsed from the name)")
    reasoning: bool = option(False, "R1-style model: the direct condition prefills an empty think block")
    options: dict[str, Any] = option(
        default_factory=dict, help="backend keyword arguments (batch_size, base_url, ...)"
    )
    decoding: dict[str, Any] | None = option(
        None,
        "temperature / top_p / n_samples (majority vote) / seed; unset keys: model card (R1 distills 0.6 / "
        "0.95) or greedy",
    )
    scoring: Literal["generate", "loglik"] = option(
        "generate", "generate an answer, or loglik: the more likely answer after the prompt (base models)"
    )


@dataclass
class DatasetEntry:
    name: Literal["semeval2022-2a", "magpie", "vnc-tokens", "generic", "hf"] = option(
        help="idiomreason loader"
    )
    path: str = option(help="file or folder (hub name for 'hf')")
    split: str | None = option(None, "loader split (null = all)")
    key: str | None = option(None, "label in caches and tables (default '<name>:<split>')")
    limit: int | None = option(None, "seeded random sample of this many examples")
    shots_split: str | None = option(None, "split to draw few-shot examples from")
    options: dict[str, Any] = option(default_factory=dict, help="more loader keyword arguments")


@dataclass
class IdiomSweepConfig:
    out_dir: Path = option(Path("runs/idiom-sweep"), "predictions (append-only, resumable), tables, plot")
    models: list[ModelEntry] = option(default_factory=list, help="models to evaluate")
    datasets: list[DatasetEntry] = option(default_factory=list, help="datasets to evaluate on")
    conditions: list[str] = option(
        default_factory=lambda: ["direct", "cot", "cot_definition"],
        help="prompt conditions (optionally ':<k>shot')",
    )
    load_in_4bit: Literal["none", "nf4lora", "bitsandbytes"] = option(
        "none", "transformers models: NF4 + double quantization through nf4lora, or bitsandbytes, or none"
    )
    max_new_tokens: int = option(4096, "answer budget (reasoning models need thousands)")
    definitions: str | None = option(None, "user file of definitions (null: generated in a first pass)")
    definitions_model: str | None = option(None, "model (by name) that defines expressions for every model")
    definitions_of: str | None = option(
        None,
        "with definitions = a run's definitions.jsonl: the model whose stored definitions every model gets",
    )
    glosses: str | None = option(None, "reference glosses file: score the generated definitions against it")
    definition_judge: str | None = option(None, "with glosses: a model (by name) that judges each definition")
    definition_max_new_tokens: int = option(512, "budget of a generated definition")
    chunk_size: int = option(64, "prompts handed to a backend at a time")
    on_error: Literal["raise", "skip"] = option("raise", "malformed rows: stop, or skip and count")
    seed: int = option(0, "sampling seed")
    n_resamples: int = option(1000, "bootstrap resamples of the confidence intervals")

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models must list at least one model (give --config FILE)")
        if not self.datasets:
            raise ValueError("datasets must list at least one dataset (give --config FILE)")
        from idiom_sweep.recipe import sweep_config

        sweep_config(
            self
        )  # idiomreason's own checks (values that cannot work, booleans that must be booleans)
