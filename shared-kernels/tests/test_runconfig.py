"""Typed run configs: YAML + key=value overrides, type checks with clear errors, --help listing every option,
atomic run-dir writes, and the JSONL tracker through accelerate."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from shared_kernels.runconfig import (
    ConfigError,
    JSONLTracker,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    load_config,
    make_trackers,
    option,
    options_help,
    write_yaml_atomic,
)


@dataclasses.dataclass
class Train:
    lr: float = option(2e-4, "peak learning rate")
    steps: int = option(10, "optimizer steps")
    precision: Literal["bf16", "mxfp8"] = option("bf16", "precision recipe")

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclasses.dataclass
class Cfg:
    model: str = option("tiny", "HF id, local path or 'tiny'")
    out_dir: Path = option(Path("runs/x"), "run directory")
    seed: int | None = option(None, "seed (None: random)")
    lengths: list[int] = option(default_factory=lambda: [128, 512], help="evaluation lengths")
    use_4bit: bool = option(False, "load in 4-bit")
    train: Train = option(default_factory=Train, help="training")


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config(Cfg) == Cfg()
    path = tmp_path / "c.yaml"
    path.write_text("# run: tool --config c.yaml\nmodel: Qwen/Qwen2.5-3B\ntrain:\n  lr: 1e-4\n  steps: 3\n")
    cfg = load_config(
        Cfg,
        path,
        ["train.steps=5", "lengths=[64, 97]", "use_4bit=true", "model=123", "seed=7", "out_dir=/tmp/r"],
    )
    assert cfg.model == "123"  # str fields keep the override text verbatim
    assert cfg.train == Train(lr=1e-4, steps=5)  # YAML 1.1 reads 1e-4 as a string: converted to float
    assert isinstance(cfg.train.lr, float)
    assert (
        cfg.lengths == [64, 97] and cfg.use_4bit is True and cfg.seed == 7 and cfg.out_dir == Path("/tmp/r")
    )
    assert load_config(Cfg, overrides=["seed=null"]).seed is None
    assert load_config(Cfg, base={"train": {"steps": 4}}, overrides=["train.lr=0.5"]).train == Train(0.5, 4)
    # round trip through the resolved YAML the app writes
    write_yaml_atomic(tmp_path / "resolved.yaml", cfg)
    assert load_config(Cfg, tmp_path / "resolved.yaml") == cfg
    assert config_to_dict(cfg)["out_dir"] == "/tmp/r"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.lr=abc"], r"'train.lr': expected float, got 'abc'"),
        (["train.steps=1.5"], r"'train.steps': expected int"),
        (["train.steps=true"], r"'train.steps': expected int"),
        (["use_4bit=1"], r"'use_4bit': expected bool"),
        (["train.precision=fp8"], r"'train.precision': expected one of 'bf16', 'mxfp8'"),
        (["lengths=[1, x]"], r"'lengths\[1\]': expected int"),
        (["lengths=x"], r"'lengths\[0\]': expected int"),  # a bare value is a one-item list
        (["train.lrr=1"], r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"),
        (["modle=x"], r"did you mean 'model'"),
        (["train=3"], r"'train': expected mapping"),
        (["train.steps=0"], r"invalid config in 'train': steps must be >= 1, got 0"),
        (["novalue"], r"not of the form key=value"),
        (["=3"], r"empty key"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Cfg, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, tmp_path / "broken.yaml")
    with pytest.raises(TypeError, match="dataclass"):
        load_config(dict)
    with pytest.raises(ValueError, match="default_factory"):
        option([1])


def test_help_lists_every_option(capsys, tmp_path):
    text = options_help(Cfg)
    for key in (
        "model",
        "out_dir",
        "seed",
        "lengths",
        "use_4bit",
        "train.lr",
        "train.steps",
        "train.precision",
    ):
        assert f"  {key} " in text
    assert "peak learning rate" in text and "0.0002" in text

    parser = argparse.ArgumentParser(prog="tool")
    add_config_arguments(parser, Cfg)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "train.precision" in out and "key=value" in out

    args = parser.parse_args(["--print-config", "train.steps=2"])
    with pytest.raises(SystemExit):
        config_from_args(Cfg, args)
    assert "steps: 2" in capsys.readouterr().out
    cfg = config_from_args(Cfg, parser.parse_args(["seed=3"]))
    assert cfg.seed == 3


def test_jsonl_tracker_through_accelerate(tmp_path):
    from accelerate import Accelerator

    with pytest.raises(ValueError, match="unknown tracker"):
        make_trackers(tmp_path, ["neptune"])
    trackers = make_trackers(tmp_path, ["none"])
    acc = Accelerator(cpu=True, log_with=trackers, project_dir=str(tmp_path))
    acc.init_trackers("t", config={"a": 1})
    for step in range(4):
        acc.log({"loss": 1.0 / (step + 1)}, step=step)
    acc.end_training()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[1]["loss"] == 0.5
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": null, "final": 1}\n{"step": 9, "lo')  # a row without a step; a line cut by a kill
    JSONLTracker.truncate_after(tmp_path / "metrics.jsonl", 1)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        None,
    ]


def test_runconfig_and_app_import_without_torch():
    """The data and evaluation commands (rerankdistill's CLI) load configs without importing torch."""
    import subprocess
    import sys

    code = (
        "import sys, shared_kernels, shared_kernels.runconfig, shared_kernels.app; "
        "heavy = sorted(m for m in ('torch', 'accelerate', 'transformers') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_list_overrides_take_comma_separated_items():
    @dataclasses.dataclass
    class Lists:
        names: list[str] = option(default_factory=list)
        sizes: list[int] = option(default_factory=list)

    cfg = load_config(Lists, overrides=["names=a=x.run,b=y.run", "sizes=1,2,3"])
    assert cfg.names == ["a=x.run", "b=y.run"] and cfg.sizes == [1, 2, 3]
    assert load_config(Lists, overrides=["sizes=[4, 5]", "names=one"]).sizes == [4, 5]
    with pytest.raises(ConfigError, match=r"sizes\[1\]"):
        load_config(Lists, overrides=["sizes=1,x"])


class _Tag:
    """A plain class used as an annotation: values must already be instances."""


@dataclasses.dataclass
class Kinds:
    pair: tuple[int, str] = option((1, "a"), "fixed-length tuple")
    many: tuple[float, ...] = option((), "any-length tuple")
    weights: dict[str, float] = option(default_factory=dict, help="mapping")
    anything: object = option(None, "Any-like")
    num_or_name: int | str = option(0, "union without None")
    flag: Literal[1, "one"] = option(1, "literal of mixed types")
    where: Path | None = option(None, "optional path")
    tag: _Tag | None = option(None, "a plain class")


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"pair": [2, "b"]}, {"pair": (2, "b")}),
        ({"many": [1, 2.5, "3e-1"]}, {"many": (1.0, 2.5, 0.3)}),
        ({"weights": {"a": 1, "b": "2e-3"}}, {"weights": {"a": 1.0, "b": 0.002}}),
        ({"num_or_name": 3}, {"num_or_name": 3}),
        ({"num_or_name": "x"}, {"num_or_name": "x"}),
        ({"flag": "one"}, {"flag": "one"}),
        ({"where": "/tmp/x"}, {"where": Path("/tmp/x")}),
        ({"where": None}, {"where": None}),
    ],
)
def test_every_annotation_kind_converts(values, expected):
    cfg = load_config(Kinds, base=values)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert all(type(getattr(cfg, k)) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    "values, match",
    [
        ({"pair": [1, "a", 2]}, r"'pair': expected 2 items, got 3"),
        ({"pair": [1, 2]}, r"'pair\[1\]': expected str, got 2"),
        ({"pair": "ab"}, r"'pair': expected tuple\[int, str\]"),
        ({"many": [True]}, r"'many\[0\]': expected float, got True"),
        ({"weights": [1]}, r"'weights': expected dict\[str, float\]"),
        ({"weights": {"a": "x"}}, r"'weights.a': expected float, got 'x'"),
        ({"num_or_name": 1.5}, r"'num_or_name': expected int \| str, got 1.5"),
        ({"num_or_name": None}, r"'num_or_name': expected int \| str, got None"),
        ({"flag": True}, r"'flag': expected one of 1, 'one', got True"),
        ({"where": 3}, r"'where': expected Path \| null, got 3"),
        ({"tag": "x"}, r"'tag': expected _Tag \| null, got 'x'"),
    ],
)
def test_every_annotation_kind_rejects(values, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Kinds, base=values)


def test_instances_pass_through():
    tag = _Tag()
    cfg = load_config(Kinds, base={"tag": tag, "anything": [1, {"x": 2}]})
    assert cfg.tag is tag and cfg.anything == [1, {"x": 2}]


def test_write_atomic_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from shared_kernels.runconfig import write_atomic, write_text_atomic

    target = tmp_path / "out.txt"
    write_text_atomic(target, "old\r\n")
    assert target.read_bytes() == b"old\r\n"  # UTF-8, newlines untranslated

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old\r\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_save_figure_atomic_writes_the_suffix_format_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared_kernels.runconfig import save_figure_atomic

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure_atomic(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    fig, _ = plt.subplots()
    assert save_figure_atomic(fig, tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.svg", "sub"]


def test_cli_main_extra_options_reach_run_as_keywords(capsys):
    from shared_kernels.app import cli_main

    got = []
    extra = {"--seeds": {"nargs": "*", "default": None}}

    def run(cfg, progress, seeds):
        got.append((cfg.train.steps, progress, seeds))

    assert cli_main("prog", "d", Cfg, run, ["train.steps=3", "--seeds", "1", "2"], extra_options=extra) == 0
    assert cli_main("prog", "d", Cfg, run, ["--no-progress"], extra_options=extra) == 0
    assert got == [(3, True, ["1", "2"]), (10, False, None)]
    assert cli_main("prog", "d", Cfg, lambda cfg, progress: got.append(cfg), ["train.steps=0"]) == 2
    assert capsys.readouterr().err.startswith("prog: error: ") and len(got) == 2
