"""The sweep recipe: build idiomreason's SweepConfig from the app config, load transformers models in 4 bits
through nf4lora when asked, run (or resume) the sweep, and print where the table and plot are."""

from __future__ import annotations

import dataclasses
from typing import Any

from idiom_sweep.config import IdiomSweepConfig
from shared_kernels.runconfig import config_to_dict, write_yaml_atomic

# ModelEntry.options keys consumed here rather than passed to idiomreason's TransformersBackend.
_LOAD_KEYS = ("dtype", "quantization", "trust_remote_code", "device_map")
# `load_in_4bit` travels to idiomreason as this option of each transformers model: model options are part
# of idiomreason's prediction cache key, so a changed 4-bit mode is a cache miss. The backend factory takes
# it out.
LOAD_IN_4BIT_OPTION = "load_in_4bit"


def sweep_config(cfg: IdiomSweepConfig, progress: bool = True):
    """idiomreason.SweepConfig equivalent to `cfg` (validated by idiomreason too)."""
    from idiomreason import SweepConfig

    data = config_to_dict(cfg)
    mode = data.pop("load_in_4bit")
    if mode != "none":  # "none" adds nothing: full-precision keys stay those of a plain idiomreason sweep
        for model in data["models"]:
            if model["backend"] == "transformers":
                model["options"] = {**model["options"], LOAD_IN_4BIT_OPTION: mode}
    data["progress"] = progress
    return SweepConfig.from_dict(data)


def nf4lora_backend(spec: Any) -> Any:
    """A transformers backend over a model whose linear layers (all but the LM head) are NF4 with double
    quantization (nf4lora, bitsandbytes-identical bytes); works on CPU, where bitsandbytes' 4-bit does not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from idiomreason.backends.base import check_bool
    from idiomreason.backends.hf import TransformersBackend
    from nf4lora.model import quantize_model

    opts = dict(spec.options)
    if opts.get("quantization") is not None:
        raise ValueError(f"model {spec.name!r}: options.quantization conflicts with load_in_4bit=nf4lora")
    dtype = opts.get("dtype", "auto")
    on_gpu = torch.cuda.is_available()
    torch_dtype = (torch.bfloat16 if on_gpu else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    trust = check_bool(
        opts.get("trust_remote_code", False), f"model {spec.name!r}: options.trust_remote_code"
    )
    tokenizer = AutoTokenizer.from_pretrained(spec.ref, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(spec.ref, dtype=torch_dtype, trust_remote_code=trust)
    quantized = quantize_model(model, double_quant=True).eval()
    kept = {k: v for k, v in spec.backend_options().items() if k not in _LOAD_KEYS}
    return TransformersBackend(quantized.to("cuda" if on_gpu else "cpu"), tokenizer, **kept)


def build_backend(spec: Any) -> Any:
    """The per-model backend builder idiomreason calls: 4-bit loading as the model's `load_in_4bit` option
    (put there by `sweep_config`) says; the option itself is not passed on to the backend."""
    from idiomreason.sweep import default_backend_factory

    options = dict(spec.options)
    mode = options.pop(LOAD_IN_4BIT_OPTION, "none")
    spec = dataclasses.replace(spec, options=options)
    if mode == "none":
        return default_backend_factory(spec)
    if mode == "nf4lora":
        return nf4lora_backend(spec)
    return default_backend_factory(dataclasses.replace(spec, options={**options, "quantization": "4bit"}))


class IdiomSweepRecipe:
    """setup() -> evaluate() (the sweep: generation is its evaluation) -> cleanup(). No training."""

    def __init__(self, cfg: IdiomSweepConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress

    def setup(self) -> None:
        from idiom_sweep.offline import resolve_builtins

        self.cfg, notes = resolve_builtins(self.cfg)
        for note in notes:
            print(f"[idiom-sweep] {note}", flush=True)
        self.sweep = sweep_config(self.cfg, self.progress)
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml_atomic(self.cfg.out_dir / "idiom-sweep.yaml", self.cfg)
        n = len(self.sweep.models) * len(self.sweep.datasets) * len(self.sweep.conditions)
        print(
            f"[idiom-sweep] {len(self.sweep.models)} model(s) x {len(self.sweep.conditions)} condition(s) x "
            f"{len(self.sweep.datasets)} dataset(s) = {n} cells; 4-bit: {self.cfg.load_in_4bit}",
            flush=True,
        )

    def train(self) -> None:
        """Nothing to train: the recipe interface is kept so every app reads the same."""

    def evaluate(self):
        from idiomreason import run_sweep

        result = run_sweep(self.sweep, backend_factory=build_backend)
        print(result.markdown_path.read_text(), flush=True)
        print(f"[idiom-sweep] table: {result.markdown_path} and {result.csv_path}", flush=True)
        if result.plot_path is not None:
            print(f"[idiom-sweep] plot:  {result.plot_path}", flush=True)
        return result

    def cleanup(self) -> None:
        pass


def run(cfg: IdiomSweepConfig, progress: bool = True):
    from shared_kernels.app import run_recipe

    return run_recipe(IdiomSweepRecipe(cfg, progress))
