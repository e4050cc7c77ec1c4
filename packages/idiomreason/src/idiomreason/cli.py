"""`idiomreason eval | sweep | report | definitions`: a thin command line over `SweepConfig` / `run_sweep`.

    idiomreason eval --dataset semeval2022-2a --path data/semeval2022_task2a --split dev \\
        --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --reasoning --condition direct --condition cot \\
        --backend vllm --out runs/r1-1.5b
    idiomreason eval ... --backend http --base-url http://127.0.0.1:8000/v1 --api-key-env OPENAI_API_KEY
    idiomreason sweep sweep.yaml out_dir=runs/full max_new_tokens=8192
    idiomreason report runs/full          # rebuild tables and plot from the stored predictions
    idiomreason definitions runs/full/definitions.jsonl glosses.csv   # score stored definitions
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from idiomreason.backends import BACKENDS
from idiomreason.backends.http import HTTPBackendError
from idiomreason.loaders import LOADERS
from idiomreason.report import markdown_table
from idiomreason.store import StoreLockedError
from idiomreason.sweep import DatasetSpec, ModelSpec, SweepConfig, SweepResult, run_sweep
from idiomreason.textfile import load_yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idiomreason", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate one model on one dataset in one or more conditions")
    data = ev.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=sorted(LOADERS), help="loader name")
    data.add_argument("--path", required=True, help="dataset file or folder")
    data.add_argument("--split", default=None, help="the loader's split (default: all)")
    data.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of N examples")
    data.add_argument("--shots-split", default=None, help="split to draw few-shot examples from")
    data.add_argument(
        "--loader-options",
        default="{}",
        help='JSON of extra loader arguments (e.g. \'{"columns": {"target": "sentence"}}\')',
    )
    data.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="malformed rows / missing definitions: stop (raise) or skip and count",
    )
    model = ev.add_argument_group("model")
    model.add_argument(
        "--model", required=True, help="path or hub id (transformers, vllm) or served model name (http)"
    )
    model.add_argument("--model-name", default=None, help="label in caches and tables (default: --model)")
    model.add_argument(
        "--size-b", type=float, default=None, help="parameters in billions (default: from the name)"
    )
    model.add_argument(
        "--reasoning", action="store_true", help="R1-style model: prefill an empty think block in 'direct'"
    )
    model.add_argument("--backend", choices=BACKENDS, default="transformers")
    model.add_argument("--dtype", default=None, help="transformers/vllm dtype")
    model.add_argument(
        "--quantization", default=None, help="transformers: 4bit or 8bit; vllm: its method name"
    )
    model.add_argument("--batch-size", type=int, default=None, help="transformers batch size")
    model.add_argument("--base-url", default=None, help="http: API root, e.g. http://127.0.0.1:8000/v1")
    model.add_argument("--api", choices=("chat", "completions"), default=None, help="http wire API")
    model.add_argument("--api-key-env", default=None, help="http: env variable holding the API key")
    model.add_argument("--concurrency", type=int, default=None, help="http: requests in flight")
    model.add_argument("--request-timeout", type=float, default=None, help="http: seconds per request")
    model.add_argument(
        "--tokenizer", default=None, help="http completions: tokenizer whose chat template renders prompts"
    )
    model.add_argument(
        "--backend-options",
        default="{}",
        help='JSON of extra backend arguments (e.g. \'{"prefill_via": "thinking_switch"}\')',
    )
    model.add_argument(
        "--decoding",
        default=None,
        help="JSON of temperature / top_p / n_samples / seed "
        "(default: the model card's where known, e.g. R1 distills 0.6 / 0.95, else greedy)",
    )
    model.add_argument(
        "--scoring",
        choices=("generate", "loglik"),
        default="generate",
        help="loglik: no generation, the more likely answer (base models, transformers backend)",
    )
    run = ev.add_argument_group("run")
    run.add_argument(
        "--condition",
        action="append",
        default=None,
        help="direct | cot | cot_definition, optionally ':<k>shot' (repeatable; default all three)",
    )
    run.add_argument(
        "--definitions", default=None, help="file of expression definitions (default: the model defines them)"
    )
    run.add_argument(
        "--definitions-of",
        default=None,
        help="with --definitions = a run's definitions.jsonl: use that model's stored definitions",
    )
    run.add_argument("--glosses", default=None, help="reference glosses: score the generated definitions")
    run.add_argument("--templates-dir", default=None, help="folder of user prompt templates")
    run.add_argument("--max-new-tokens", type=int, default=4096)
    run.add_argument("--chunk-size", type=int, default=64)
    run.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", required=True, help="output folder (predictions cache, tables, plot)")
    run.add_argument("--no-progress", action="store_true")

    sw = sub.add_parser("sweep", help="run or resume a sweep from a YAML config")
    sw.add_argument("config", help="YAML file with models, datasets, conditions, out_dir, ...")
    sw.add_argument("overrides", nargs="*", help="key=value overrides of top-level keys")

    rp = sub.add_parser("report", help="rebuild tables and plot of an output folder from its predictions")
    rp.add_argument("out_dir")

    df = sub.add_parser(
        "definitions",
        help="score stored definitions against reference glosses (token F1 per "
        "model with a bootstrap CI): definition_quality.md and the plot, no model needed",
    )
    df.add_argument("definitions", help="a run's definitions.jsonl")
    df.add_argument(
        "glosses", help="reference glosses: .json / .jsonl / .csv / .tsv, expression -> definition"
    )
    df.add_argument(
        "--out", default=None, help="folder for the table and plot (default: the definitions' folder)"
    )
    df.add_argument("--no-plot", action="store_true", help="write the table only")
    df.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples")
    df.add_argument("--seed", type=int, default=0)
    return parser


def _json_arg(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value


def eval_config(args: argparse.Namespace) -> SweepConfig:
    options = _json_arg(args.backend_options, "--backend-options")
    named = {
        "dtype": args.dtype, "quantization": args.quantization, "batch_size": args.batch_size,
        "base_url": args.base_url, "api": args.api, "api_key_env": args.api_key_env,
        "concurrency": args.concurrency, "timeout": args.request_timeout, "tokenizer": args.tokenizer,
    }  # fmt: skip
    options.update({k: v for k, v in named.items() if v is not None})
    decoding = _json_arg(args.decoding, "--decoding") if args.decoding is not None else None
    model = ModelSpec(
        name=args.model_name or args.model,
        path=args.model,
        backend=args.backend,
        size_b=args.size_b,
        reasoning=args.reasoning,
        options=options,
        decoding=decoding,
        scoring=args.scoring,
    )
    dataset = DatasetSpec(
        name=args.dataset,
        path=args.path,
        split=args.split,
        limit=args.limit,
        shots_split=args.shots_split,
        options=_json_arg(args.loader_options, "--loader-options"),
    )
    return SweepConfig(
        models=[model], datasets=[dataset], conditions=args.condition or ["direct", "cot", "cot_definition"],
        out_dir=args.out, max_new_tokens=args.max_new_tokens, definitions=args.definitions,
        definitions_of=args.definitions_of, glosses=args.glosses,
        chunk_size=args.chunk_size, on_error=args.on_error, templates_dir=args.templates_dir, seed=args.seed,
        n_resamples=args.n_resamples, progress=not args.no_progress,
    )  # fmt: skip


# What a user can get wrong (a file, an option, a server, a run already in progress): one line on stderr and
# exit code 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    StoreLockedError,
    HTTPBackendError,
    ImportError,
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "definitions":
            return _definitions(args)
        result = _run(args)
    except USER_ERRORS as e:
        print(f"idiomreason {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table(result.rows))
    print(
        f"\nwrote {result.csv_path}, {result.markdown_path}"
        + (f", {result.plot_path}" if result.plot_path else "")
    )
    return 0


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a multi-line message is joined with ' | ')."""
    text = str(error) or type(error).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def _definitions(args: argparse.Namespace) -> int:
    """`idiomreason definitions`: the definition analysis from stored definitions; prints the table."""
    from idiomreason.definition_analysis import analyse_stored_definitions

    for name in ("definitions", "glosses"):
        path = Path(getattr(args, name))
        if not path.is_file():
            raise FileNotFoundError(
                f"{name} file {str(path)!r} " + ("is a folder" if path.is_dir() else "not found")
            )
    if args.n_resamples < 1:
        raise ValueError(f"--n-resamples must be >= 1, got {args.n_resamples}")
    out = Path(args.out) if args.out is not None else Path(args.definitions).parent
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _, md, png = analyse_stored_definitions(
        args.definitions,
        args.glosses,
        out,
        n_resamples=args.n_resamples,
        seed=args.seed,
        plot=not args.no_plot,
    )
    sys.stdout.write(md.read_text())
    print(f"\nwrote {md}" + (f", {png}" if png else ""))
    return 0


def _run(args: argparse.Namespace) -> SweepResult:
    if args.command == "eval":
        config = eval_config(args)
        result = run_sweep(config)
    elif args.command == "sweep":
        config = SweepConfig.from_yaml(args.config, args.overrides)
        result = run_sweep(config)
    else:
        saved = Path(args.out_dir) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} not found: report needs the folder of a run")
        config = SweepConfig.from_dict(load_yaml(saved))
        config.out_dir = args.out_dir
        result = run_sweep(config, generate=False)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
