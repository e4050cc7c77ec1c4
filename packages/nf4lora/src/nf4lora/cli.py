"""`nf4lora quantize MODEL_PATH OUT_PATH` and `nf4lora report MODEL_PATH`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load(path: Path):
    import json

    from transformers import AutoModelForCausalLM

    from nf4lora.model import quantize_model
    from nf4lora.serialize import load_quantized

    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config"):
        return load_quantized(path), True
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return quantize_model(model), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize every linear layer but the LM head to NF4 and save it "
                       "(bitsandbytes' safetensors format)")
    q.add_argument("model_path", type=Path)
    q.add_argument("out_path", type=Path)
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--no-double-quant", action="store_true")
    q.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    r = sub.add_parser("report", help="bytes by role of a (quantized) model and the QLoRA training estimate")
    r.add_argument("model_path", type=Path)
    r.add_argument("--r", type=int, default=64)
    args = parser.parse_args(argv)

    from nf4lora.memory import count_parameters, estimate_memory, memory_report

    if not (args.model_path / "config.json").is_file():
        parser.error(f"MODEL_PATH has no config.json: {args.model_path}")
    if args.command == "quantize":
        from transformers import AutoModelForCausalLM

        from nf4lora.model import quantize_model
        from nf4lora.serialize import save_quantized

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype="auto")
        quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                       quant_type=args.quant_type)
        save_quantized(model, args.out_path, source_dir=args.model_path)
        print(f"wrote {args.out_path}")
        print(memory_report(model).format())
        return 0
    model, was_quantized = _load(args.model_path)
    print(f"{args.model_path} ({'NF4 checkpoint' if was_quantized else 'dense checkpoint, quantized in memory'})")
    print(memory_report(model).format())
    cfg = model.config
    est = estimate_memory(count_parameters(model), n_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, r=args.r,
                          kv_size=cfg.hidden_size * cfg.num_key_value_heads // cfg.num_attention_heads)
    print(f"QLoRA estimate (r={args.r}, batch 1 x 512): {est.total / 2**20:.1f} MiB; "
          f"full 16-bit finetune: {est.full_finetune_16bit / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
