"""Every plot idiomreason writes, rendered on small data: macro-F1 against size and definition quality
against size. Each must be a real, non-blank PNG; the tick labels of close sizes (7B and 8B) must not share
a row, and models of one size must not be drawn on top of each other."""

import math

import pytest

from idiomreason.definition_analysis import _dodged_sizes, write_definition_report
from idiomreason.report import dodge_factor, plot_f1_vs_size, staggered_size_labels

pytest.importorskip("matplotlib")

# The paper's model sizes (billions): R1 distills and their base models share each size.
SIZES = {
    "Qwen-1.5B": 1.5,
    "Qwen-7B": 7.0,
    "Llama-8B": 8.0,
    "Qwen-14B": 14.0,
    "Qwen-32B": 32.0,
    "Llama-70B": 70.0,
}


def _assert_real_png(path, min_width: int):
    import matplotlib.image

    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)  # (H, W, channels), floats in [0, 1]
    assert pixels.shape[1] >= min_width
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert not list(path.parent.glob(".*tmp*")), "the atomic write left its temporary file"


def test_staggered_size_labels_puts_close_sizes_on_two_rows():
    labels = staggered_size_labels(sorted(SIZES.values()))
    assert labels == ["1.5", "7", "\n8", "14", "32", "70"]
    assert staggered_size_labels([0.0001, 0.0003, 1.0]) == ["0.0001", "0.0003", "1"]
    assert staggered_size_labels([7.0]) == ["7"]
    # three close sizes: the third goes back to the top row, past the second-row label
    assert staggered_size_labels([7.0, 7.5, 8.0, 70.0]) == ["7", "\n7.5", "8", "70"]


def test_plot_f1_vs_size_renders(tmp_path, caplog):
    rows = []
    for d, dataset in enumerate(("semeval2022-2a:dev", "magpie:test")):
        for i, (model, size) in enumerate(SIZES.items()):
            for c, condition in enumerate(("direct", "cot", "cot_definition")):
                for reasoning in (True, False):
                    f1 = 0.5 + 0.004 * size + 0.01 * (c + d) + (0.02 if reasoning else 0.0) - 0.003 * i
                    rows.append({"dataset": dataset, "model": f"{'R1-' if reasoning else ''}{model}",
                                 "size_b": size, "reasoning": reasoning, "condition": condition,
                                 "language": "all", "n": 97, "macro_f1": f1})  # fmt: skip
    rows.append({"dataset": "magpie:test", "model": "unsized", "size_b": math.nan, "reasoning": False,
                 "condition": "direct", "language": "all", "n": 97, "macro_f1": 0.6})  # fmt: skip
    path = plot_f1_vs_size(rows, tmp_path / "macro_f1_vs_size.png")
    _assert_real_png(path, min_width=900)  # two panels and the legend beside them
    assert "unsized" in caplog.text  # left out of the plot, and said so

    assert plot_f1_vs_size(rows[-1:], tmp_path / "none.png") is None  # no model with a size: no plot
    assert not (tmp_path / "none.png").exists()


def test_definition_quality_plot_renders(tmp_path):
    rows = []
    for model, size in SIZES.items():
        for reasoning in (True, False):
            f1 = 0.2 + 0.004 * size + (0.05 if reasoning else 0.0)
            judged = f1 + 0.3 if reasoning else math.nan
            rows.append({"model": f"{'R1-' if reasoning else ''}{model}", "size_b": size, "n": 13,
                         "n_no_definition": 1, "token_f1": f1, "token_f1_lo": f1 - 0.04,
                         "token_f1_hi": f1 + 0.05, "n_judged": 12, "judge_accepts": judged})  # fmt: skip
    md, png = write_definition_report(rows, tmp_path)
    _assert_real_png(png, min_width=600)
    assert md.read_text().count("\n| ") == len(rows)  # a table line per model after the header and rule

    (tmp_path / "unsized").mkdir()
    _, none = write_definition_report([{**rows[0], "size_b": None}], tmp_path / "unsized")
    assert none is None and not list((tmp_path / "unsized").glob("*.png"))  # no size: the table only


def test_models_of_one_size_are_drawn_apart():
    xs = _dodged_sizes([7.0, 7.0, 8.0, 14.0, 14.0, 14.0])
    assert xs[2] == 8.0 and xs[4] == pytest.approx(14.0)  # a lone size and the middle of three stay put
    assert xs[0] < 7.0 < xs[1] and xs[3] < xs[4] < xs[5]
    assert math.log10(xs[1] / xs[0]) == pytest.approx(0.03)  # a fixed step in decades, symmetric
    assert math.log10(7.0 / xs[0]) == pytest.approx(math.log10(xs[1] / 7.0))
    # the macro-F1 plot spreads its 2 x conditions series the same way: a lone series stays put
    assert dodge_factor(0, 1, 0.01) == 1.0
    assert [round(math.log10(dodge_factor(k, 4, 0.01)), 6) for k in range(4)] == [
        -0.015,
        -0.005,
        0.005,
        0.015,
    ]
