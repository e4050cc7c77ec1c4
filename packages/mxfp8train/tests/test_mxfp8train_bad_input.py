"""Bad input to mxfp8train's public functions and to the mxfp8-parity CLI: a clear one-line error naming
the argument (TypeError / ValueError from functions; exit code 2 and one stderr line from the CLI), never
a traceback or a silent wrong answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mxfp8train import PAPER_RECIPE, MXLinear, MXRecipe, convert, mx_linear, parity, recipe_from_name, to_mx
from shared_kernels.mx_cast import mx_cast_rows_cols, mx_dequantize

X = torch.randn(4, 64)
CODES = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
SCALES = torch.zeros(4, 2, dtype=torch.uint8)

FUNCTION_CASES = [
    ("to_mx x not a tensor", lambda: to_mx([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ("to_mx integer x", lambda: to_mx(torch.ones(4, 32, dtype=torch.int32)), TypeError, "x must have dtype"),
    ("to_mx float64 x", lambda: to_mx(X.double()), TypeError, "x must have dtype"),
    ("to_mx 0-d x", lambda: to_mx(torch.tensor(1.0)), ValueError, "at least one dimension"),
    ("to_mx elem_dtype bf16", lambda: to_mx(X, torch.bfloat16), ValueError, "elem_dtype"),
    ("to_mx block_size 3", lambda: to_mx(X, block_size=3), ValueError, "block_size"),
    ("to_mx block_size 2048", lambda: to_mx(X, block_size=2048), ValueError, "block_size"),
    ("to_mx block_size True", lambda: to_mx(X, block_size=True), TypeError, "block_size"),
    ("to_mx scale_mode ceil", lambda: to_mx(X, scale_mode="ceil"), ValueError, "scale_mode"),
    ("to_mx dim 2 of 2-D", lambda: to_mx(X, dim=2), ValueError, "dim must be"),
    ("to_mx backend cuda", lambda: to_mx(X, backend="cuda"), ValueError, "backend"),
    ("rows_cols 3-D", lambda: mx_cast_rows_cols(torch.randn(2, 4, 32)), ValueError, "2-D"),
    (
        "dequantize int codes",
        lambda: mx_dequantize(CODES.view(torch.uint8), SCALES),
        TypeError,
        "data must be",
    ),
    (
        "dequantize float scales",
        lambda: mx_dequantize(CODES, SCALES.float()),
        TypeError,
        "scale must be uint8",
    ),
    (
        "dequantize scale shape",
        lambda: mx_dequantize(CODES, SCALES[:, :1]),
        ValueError,
        "scale must have shape",
    ),
    (
        "mx_linear recipe str",
        lambda: mx_linear(X, torch.randn(8, 64), recipe="mxfp8-rceil"),
        TypeError,
        "recipe",
    ),
    ("mx_linear K mismatch", lambda: mx_linear(X, torch.randn(8, 63)), ValueError, "does not match weight"),
    (
        "mx_linear 3-D weight",
        lambda: mx_linear(X, torch.randn(2, 8, 64)),
        ValueError,
        "does not match weight",
    ),
    ("MXLinear recipe dict", lambda: MXLinear(64, 8, recipe={}), TypeError, "recipe"),
    ("convert non-module", lambda: convert("model"), TypeError, "model must be an nn.Module"),
    ("convert recipe name", lambda: convert(nn.Linear(64, 8), "mxfp8-rceil"), TypeError, "recipe"),
    (
        "recipe grad_dtype fp16",
        lambda: PAPER_RECIPE.replace(grad_dtype=torch.float16),
        ValueError,
        "grad_dtype",
    ),
    (
        "recipe scaled_mm block 16",
        lambda: MXRecipe(block_size=16, gemm_backend="scaled_mm"),
        ValueError,
        "block_size",
    ),
    ("recipe gemm_backend", lambda: MXRecipe(gemm_backend="cublas"), ValueError, "gemm_backend"),
    ("recipe skip_modules str", lambda: MXRecipe(skip_modules="lm_head"), TypeError, "skip_modules"),
    ("recipe_from_name unknown", lambda: recipe_from_name("mxfp4"), ValueError, "recipe name"),
    ("ParityConfig seeds repeated", lambda: parity.ParityConfig(seeds=(1, 1)), ValueError, "seeds"),
    ("ParityConfig lr nan", lambda: parity.ParityConfig(lr=float("nan")), ValueError, "lr"),
    ("ParityConfig heads", lambda: parity.ParityConfig(width=100, n_heads=3), ValueError, "n_heads"),
]


@pytest.mark.parametrize(
    "call, error, match", [c[1:] for c in FUNCTION_CASES], ids=[c[0] for c in FUNCTION_CASES]
)
def test_function_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(b"to be or not to be, that is the question.\n" * 400)
    return path


def cli_cases(tmp: str, text: str) -> list[tuple[str, list[str], str]]:
    small = f"{tmp}/small.txt"
    return [
        ("steps negative", ["--steps", "-5"], "steps must be >= 1"),
        ("steps not an int", ["--steps", "many"], "--steps"),
        ("data missing", ["--data", "/nonexistent"], "data file not found: /nonexistent"),
        ("data is a directory", ["--data", tmp], "data file not found"),
        ("data too small", ["--data", small], "need at least 10000"),
        ("variants unknown", ["--data", text, "--variants", "fp4"], "variants must be"),
        ("seeds not ints", ["--data", text, "--seeds", "a,b"], "comma-separated integers"),
        ("seeds negative", ["--data", text, "--seeds", "-1"], "seeds must be"),
        ("lr zero", ["--data", text, "--lr", "0"], "lr must be"),
        ("block size 3", ["--data", text, "--block-size", "3"], "block_size must be"),
        ("warmup negative", ["--data", text, "--warmup", "-1"], "warmup must be"),
        ("jobs zero", ["--data", text, "--jobs", "0"], "jobs must be"),
        ("unknown flag", ["--data", text, "--epochs", "3"], "unrecognized arguments"),
    ]


CLI_IDS = [c[0] for c in cli_cases("t", "x")]


@pytest.mark.parametrize("case", range(len(CLI_IDS)), ids=CLI_IDS)
def test_parity_cli_bad_input_one_line_exit_2(case, text_file, tmp_path, capsys):
    (tmp_path / "small.txt").write_bytes(b"tiny")
    _, args, match = cli_cases(str(tmp_path), str(text_file))[case]
    with pytest.raises(SystemExit) as info:
        parity.main([*args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mxfp8-parity: error: ") and match in err, err
    assert not (tmp_path / "out").exists()  # nothing started
