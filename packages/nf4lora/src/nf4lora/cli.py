"""`nf4lora quantize MODEL_PATH OUT_PATH` and `nf4lora report MODEL_PATH`.

User errors (a bad option, a missing or broken config.json, an output that would overwrite something) print
one line `nf4lora <command>: error: ...` on stderr and exit with code 2, before anything is read or written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared_kernels.nf4 import QUANT_TYPES, SUPPORTED_BLOCKSIZES


class UsageError(Exception):
    """A user error: reported as one line, exit code 2."""


def _read_config(model_path: Path) -> dict:
    path = model_path / "config.json"
    if not path.is_file():
        raise UsageError(f"MODEL_PATH has no config.json: {model_path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_output(out_path: Path, model_path: Path) -> None:
    """OUT_PATH must be a new or empty folder, and not MODEL_PATH or a folder inside or around it."""
    out, src = out_path.resolve(), model_path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UsageError(f"OUT_PATH {out_path} would overwrite MODEL_PATH {model_path}: choose a new folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_PATH exists and is not a folder: {out_path}")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"OUT_PATH exists and is not empty: {out_path} (choose a new folder)")


def _load_pretrained(model_path: Path):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # unusable checkpoints, not bugs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load a causal LM from {model_path}: {first}") from None


def _load_for_report(model_path: Path, config: dict):
    from safetensors import SafetensorError

    from nf4lora.model import quantize_model
    from nf4lora.serialize import load_quantized

    if config.get("quantization_config"):
        try:
            return load_quantized(model_path), True
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise UsageError(f"cannot load the 4-bit checkpoint {model_path}: {exc}") from None
    return quantize_model(_load_pretrained(model_path)), False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nf4lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser(
        "quantize",
        help="quantize every linear layer but the LM head to 4 bits and save it "
        "(bitsandbytes' safetensors format) in a new folder",
    )
    q.add_argument("model_path", type=Path)
    q.add_argument("out_path", type=Path)
    q.add_argument("--blocksize", type=int, default=64, help=f"one of {SUPPORTED_BLOCKSIZES}")
    q.add_argument("--no-double-quant", action="store_true")
    q.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4")
    r = sub.add_parser("report", help="bytes by role of a (quantized) model and the QLoRA training estimate")
    r.add_argument("model_path", type=Path)
    r.add_argument("--r", type=int, default=64, help="LoRA rank of the estimate (> 0)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from nf4lora.memory import count_parameters, estimate_memory, memory_report

    config = _read_config(args.model_path)
    if args.command == "quantize":
        if args.blocksize not in SUPPORTED_BLOCKSIZES:
            raise UsageError(f"--blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {args.blocksize}")
        _check_output(args.out_path, args.model_path)
        if config.get("quantization_config"):
            raise UsageError(
                f"MODEL_PATH is already quantized (config.json has a quantization_config): {args.model_path}"
            )
        from nf4lora.model import quantize_model
        from nf4lora.serialize import save_quantized

        model = _load_pretrained(args.model_path)
        quantize_model(
            model, blocksize=args.blocksize, double_quant=not args.no_double_quant, quant_type=args.quant_type
        )
        save_quantized(model, args.out_path, source_dir=args.model_path)
        print(f"wrote {args.out_path}")
        print(memory_report(model).format())
        return 0
    if args.r <= 0:
        raise UsageError(f"--r must be a positive LoRA rank, got {args.r}")
    model, was_quantized = _load_for_report(args.model_path, config)
    kind = "4-bit checkpoint" if was_quantized else "dense checkpoint, quantized in memory"
    print(f"{args.model_path} ({kind})")
    print(memory_report(model).format())
    cfg = model.config
    est = estimate_memory(
        count_parameters(model),
        n_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        r=args.r,
        kv_size=cfg.hidden_size * cfg.num_key_value_heads // cfg.num_attention_heads,
    )
    print(
        f"QLoRA estimate (r={args.r}, batch 1 x 512): {est.total / 2**20:.1f} MiB; "
        f"full 16-bit finetune: {est.full_finetune_16bit / 2**20:.1f} MiB"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"nf4lora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
