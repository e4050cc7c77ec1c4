"""Bad input to nf4lora's public functions and CLI: each case a clear error naming the argument or file (CLI:
one line on stderr, exit code 2, nothing read or written), never a traceback or a silent wrong answer."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

import nf4lora
from nf4lora.cli import main
from nf4lora.lora import Linear4bit, LoRALinear4bit
from nf4lora.model import read_adapter_config
from nf4lora.weight import NF4Weight

_P, _A = nf4lora.quantize_4bit(torch.randn(100), 64)  # 50 bytes, 2 blocks


def _nan_absmax():
    _, absmax = nf4lora.quantize_4bit(
        torch.tensor([1.0] * 64 + [float("nan")] + [1.0] * 63), 64, check_finite=False
    )
    return absmax


API_CASES = [
    ("quantize int tensor", lambda: nf4lora.quantize_4bit(torch.arange(10)), ValueError, "x must be float32"),
    ("quantize list", lambda: nf4lora.quantize_4bit([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ("quantize empty", lambda: nf4lora.quantize_4bit(torch.zeros(0)), ValueError, "x must not be empty"),
    (
        "quantize blocksize 48",
        lambda: nf4lora.quantize_4bit(torch.randn(10), 48),
        ValueError,
        r"blocksize must be one of .* got 48",
    ),
    (
        "quantize blocksize True",
        lambda: nf4lora.quantize_4bit(torch.randn(10), True),
        ValueError,
        "blocksize must be one of",
    ),
    (
        "quantize quant_type",
        lambda: nf4lora.quantize_4bit(torch.randn(10), 64, "int4"),
        ValueError,
        r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'",
    ),
    (
        "quantize NaN",
        lambda: nf4lora.quantize_4bit(torch.tensor([1.0, float("nan")])),
        ValueError,
        "x contains NaN or inf",
    ),
    (
        "quantize inf fp4",
        lambda: nf4lora.quantize_4bit(torch.tensor([float("inf")]), quant_type="fp4"),
        ValueError,
        "x contains NaN or inf",
    ),
    (
        "quantize backend",
        lambda: nf4lora.quantize_4bit(torch.randn(10), backend="cuda"),
        ValueError,
        "backend must be one of",
    ),
    (
        "dequantize packed size",
        lambda: nf4lora.dequantize_4bit(_P, _A, (101, 2)),
        ValueError,
        "packed must hold",
    ),
    (
        "dequantize absmax count",
        lambda: nf4lora.dequantize_4bit(_P, _A, (100,), 32),
        ValueError,
        "absmax must hold",
    ),
    (
        "dequantize packed dtype",
        lambda: nf4lora.dequantize_4bit(_P.float(), _A, (100,)),
        ValueError,
        "packed must be uint8",
    ),
    (
        "dequantize out dtype",
        lambda: nf4lora.dequantize_4bit(_P, _A, (100,), dtype=torch.int32),
        ValueError,
        "dtype must be",
    ),
    (
        "dequantize absmax fp16",
        lambda: nf4lora.dequantize_4bit(_P, _A.half(), (100,)),
        ValueError,
        "absmax must be float32",
    ),
    (
        "dequantize DQ without state",
        lambda: nf4lora.dequantize_4bit(_P, _A.to(torch.uint8), (100,)),
        ValueError,
        "absmax2 and offset are required",
    ),
    (
        "dequantize quant_type",
        lambda: nf4lora.dequantize_4bit(_P, _A, (100,), quant_type="NF4"),
        ValueError,
        "quant_type must be one of",
    ),
    (
        "dequantize empty shape",
        lambda: nf4lora.dequantize_4bit(_P, _A, (0,)),
        ValueError,
        "shape must have at least one element",
    ),
    (
        "double quant NaN absmax",
        lambda: nf4lora.double_quantize_absmax(_nan_absmax()),
        ValueError,
        r"absmax must be finite and >= 0 .* nan at block 1",
    ),
    (
        "double quant negative absmax",
        lambda: nf4lora.double_quantize_absmax(torch.tensor([1.0, -0.5, 2.0])),
        ValueError,
        r"absmax must be finite and >= 0 .* -0.5 at block 1",
    ),
    (
        "double quant inf absmax",
        lambda: nf4lora.double_quantize_absmax(torch.tensor([1.0, float("inf")])),
        ValueError,
        "absmax must be finite",
    ),
    (
        "double quant 2-D",
        lambda: nf4lora.double_quantize_absmax(torch.ones(2, 2)),
        ValueError,
        "absmax must be a non-empty 1-D float32 tensor",
    ),
    (
        "double quant blocksize2",
        lambda: nf4lora.double_quantize_absmax(torch.ones(4), 0),
        ValueError,
        "blocksize2 must be a positive int",
    ),
    (
        "container packed",
        lambda: NF4Weight(torch.zeros(10, dtype=torch.uint8), torch.ones(1), (10,), torch.float32),
        ValueError,
        "packed must be uint8 with 5 elements",
    ),
    (
        "container quant_type",
        lambda: NF4Weight(
            torch.zeros(5, dtype=torch.uint8), torch.ones(1), (10,), torch.float32, quant_type="fp8"
        ),
        ValueError,
        "quant_type must be one of",
    ),
    (
        "from_float quant_type",
        lambda: NF4Weight.from_float(torch.randn(8, 64), quant_type="nf2"),
        ValueError,
        "quant_type must be one of",
    ),
    (
        "Linear4bit 1-D",
        lambda: Linear4bit(NF4Weight.from_float(torch.randn(64))),
        ValueError,
        "weight must be 2-D",
    ),
    (
        "LoRA r=0",
        lambda: LoRALinear4bit(NF4Weight.from_float(torch.randn(8, 64)), r=0),
        ValueError,
        "r must be a positive int",
    ),
    (
        "LoRA dropout 1",
        lambda: LoRALinear4bit(NF4Weight.from_float(torch.randn(8, 64)), r=2, dropout=1.0),
        ValueError,
        "dropout must be in",
    ),
    (
        "prepare no match",
        lambda: nf4lora.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), target_modules=["q_proj"]),
        ValueError,
        "matched no nn.Linear",
    ),
    (
        "prepare target type",
        lambda: nf4lora.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), target_modules=3),
        ValueError,
        "target_modules must be",
    ),
    (
        "optimizer bits",
        lambda: nf4lora.paged_adamw([torch.nn.Parameter(torch.ones(2))], optim_bits=16),
        ValueError,
        "optim_bits must be 32 or 8",
    ),
    ("optimizer no params", lambda: nf4lora.paged_adamw([]), ValueError, "params is empty"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_public_function_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_adapter_config_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="adapter_dir has no adapter_config.json"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type must be 'LORA', got 'IA3'"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        read_adapter_config(tmp_path)


def _model_dir(tmp_path, config: str = '{"model_type": "llama"}'):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(config)
    (d / "model.safetensors").write_bytes(b"weights that must survive")
    return d


def _error_lines(err: str) -> list[str]:
    # torch logs deprecation notices (lines "W1207 ...") when transformers imports torchao: not ours
    return [line for line in err.strip().splitlines() if not re.match(r"W\d{4} ", line)]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


CLI_CASES = [
    ("output is the input", lambda m, t: ["quantize", str(m), str(m)], "would overwrite MODEL_PATH"),
    (
        "output inside the input",
        lambda m, t: ["quantize", str(m), str(m / "q")],
        "would overwrite MODEL_PATH",
    ),
    (
        "output is an existing file",
        lambda m, t: ["quantize", str(m), str(m / "model.safetensors")],
        "would overwrite MODEL_PATH",
    ),
    (
        "output is another existing file",
        lambda m, t: ["quantize", str(m), str(t / "notes.txt")],
        "OUT_PATH exists and is not a folder",
    ),
    ("output folder not empty", lambda m, t: ["quantize", str(m), str(t)], "would overwrite MODEL_PATH"),
    (
        "blocksize 48",
        lambda m, t: ["quantize", str(m), str(t / "out"), "--blocksize", "48"],
        r"--blocksize must be one of \(32, 64, .*\), got 48",
    ),
    ("report rank 0", lambda m, t: ["report", str(m), "--r", "0"], "--r must be a positive LoRA rank, got 0"),
    ("no config", lambda m, t: ["report", str(t / "nowhere")], "MODEL_PATH has no config.json"),
]


@pytest.mark.parametrize("argv, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_user_error_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, argv, match):
    model = _model_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    before = _digest(model), _digest(tmp_path / "model"), (tmp_path / "notes.txt").read_text()
    assert main(argv(model, tmp_path)) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert err.startswith("nf4lora ") and ": error: " in err, err
    assert re.search(match, err), err
    assert (_digest(model), _digest(tmp_path / "model"), (tmp_path / "notes.txt").read_text()) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config, match",
    [
        ("{broken", r"config.json is not valid JSON: .* line 1 column 2"),
        ("[1, 2]", "must hold a JSON object, got list"),
        (b"\xff\xfe{", "is not UTF-8 text"),
    ],
)
def test_cli_broken_config_is_one_line_exit_2(tmp_path, capsys, config, match):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    for argv in (["quantize", str(model), str(tmp_path / "out")], ["report", str(model)]):
        assert main(argv) == 2
        (err,) = _error_lines(capsys.readouterr().err)
        assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_cli_unloadable_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    # a valid config.json whose weights file is garbage: transformers' error, reduced to one line with the
    # path
    model = _model_dir(
        tmp_path,
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": 10,
            }
        ),
    )
    assert main(["quantize", str(model), str(tmp_path / "out")]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert f"cannot load a causal LM from {model}" in err, err
    assert not (tmp_path / "out").exists()
