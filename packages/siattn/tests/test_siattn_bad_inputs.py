"""Bad inputs to siattn's public functions and the siattn-lengthgen CLI: a clear error naming the argument
(exit code 2 and one line from the CLI), never a traceback or a silent wrong answer."""

import pytest
import torch

from siattn import (
    alibi_slopes,
    apply_rotary,
    attention,
    coefficients,
    lengthgen,
    logn_scale,
    p_rope_frequencies,
    positions_in_documents,
    rope_frequencies,
)
from siattn.attention import si_block_mask


def _qkv(Tq=8, Tk=8):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, Tq, 8, generator=g),
        torch.randn(2, 2, Tk, 8, generator=g),
        torch.randn(2, 2, Tk, 8, generator=g),
    )


q, k, v = _qkv()

API_CASES = [
    ("attention backend", lambda: attention(q, k, v, backend="cuda"), ValueError, "backend"),
    ("attention k head dim", lambda: attention(q, k[..., :4], v[..., :4]), ValueError, "head dims"),
    ("attention q_offset past keys", lambda: attention(q, k, v, q_offset=3), ValueError, "q_offset"),
    (
        "attention doc_ids shape",
        lambda: attention(q, k, v, doc_ids=torch.zeros(2, 5).long()),
        ValueError,
        "doc_ids",
    ),
    (
        "attention flex attn_mask",
        lambda: attention(q, k, v, backend="flex", attn_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool)),
        ValueError,
        "attn_mask",
    ),
    ("attention flex 3-D q", lambda: attention(q[0], k, v, backend="flex"), ValueError, "4-D"),
    ("attention reference tau", lambda: attention(q, k, v, tau=-1.0, backend="reference"), ValueError, "tau"),
    ("attention chunk", lambda: attention(q, k, v, chunk=-2), ValueError, "chunk"),
    ("coefficients negative t", lambda: coefficients(torch.tensor([-1.0])), ValueError, "t must be"),
    ("coefficients fp16", lambda: coefficients(3, dtype=torch.float16), TypeError, "dtype"),
    ("coefficients alpha alone", lambda: coefficients(3, alpha=1.0), ValueError, "together"),
    ("rope base", lambda: rope_frequencies(8, base=1.0), ValueError, "base"),
    ("p-rope fraction", lambda: p_rope_frequencies(8, fraction=1.5), ValueError, "fraction"),
    ("odd head dim", lambda: p_rope_frequencies(7), ValueError, "head_dim"),
    (
        "apply_rotary positions",
        lambda: apply_rotary(q, torch.arange(5), rope_frequencies(8)),
        ValueError,
        "positions",
    ),
    (
        "positions_in_documents 1-D",
        lambda: positions_in_documents(torch.zeros(5).long()),
        ValueError,
        "doc_ids",
    ),
    ("alibi heads", lambda: alibi_slopes(0), ValueError, "num_heads"),
    ("logn train length", lambda: logn_scale(torch.arange(4), 1), ValueError, "train_length"),
    (
        "block mask doc_ids on q_offset",
        lambda: attention(q, k, v, backend="flex", q_offset=1, doc_ids=torch.zeros(2, 8).long()),
        ValueError,
        "q_offset",
    ),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_public_functions_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_block_mask_without_masking_is_none():
    assert si_block_mask(1, 8, 8, causal=False) is None


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question. " * 60)
    return path


CLI_CASES = [
    (["--steps", "-1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--train-length", "0"], "--train-length"),
    (["--train-length", "8"], "--train-length"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--warmup", "0"], "--warmup"),
    (["--eval-multiples", "0"], "--eval-multiples"),
    (["--n-head", "3"], "--n-head"),
    (["--d-model", "0"], "--d-model"),
    (["--taus", "0"], "--taus"),
    (["--p-rope-bases", "1"], "--p-rope-bases"),
    (["--rope-bases", "1"], "--rope-bases"),
    (["--lrs", "0"], "--lrs"),
    (["--si-p-rope-base", "0.5"], "--si-p-rope-base"),
    (["--taus", "1", "3", "10"], "--taus 3"),  # an uneven tuning budget
    (["--seeds", "0", "0"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--workers", "0"], "--workers"),
    (["--needle-trials", "0"], "--needle-trials"),
    (["--variants", "yarn-typo"], "--variants"),
    (["--eval-multiples", "1000"], "--data"),  # a window longer than the corpus's validation tail
    (["--data", "/nonexistent/corpus.txt"], "--data"),
]


@pytest.mark.parametrize("args,names", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_lengthgen_cli_user_errors_exit_2_with_one_line(args, names, corpus, tmp_path, capsys):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "out"), "--train-length", "16", *args]
    with pytest.raises(SystemExit) as exc:
        lengthgen.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("siattn-lengthgen: error:") and names in err, err
    assert not (tmp_path / "out").exists()  # nothing written before validation


def test_lengthgen_cli_out_is_a_file(corpus, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    with pytest.raises(SystemExit) as exc:
        lengthgen.main(["--data", str(corpus), "--out", str(out)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    assert out.read_text() == "mine"


RETRIEVAL_CASES = [
    ["--steps", "0"],
    ["--lr", "nan"],
    ["--p-rope-base", "1"],
    ["--variants", "alibi"],
    ["--trials", "-3"],
    ["--eval-multiples", "0"],
]


@pytest.mark.parametrize("args", RETRIEVAL_CASES, ids=[" ".join(c) for c in RETRIEVAL_CASES])
def test_retrieval_cli_user_errors_exit_2_with_one_line(args, tmp_path, capsys):
    from siattn import retrieval

    with pytest.raises(SystemExit) as exc:
        retrieval.main(["--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and args[0] in err, err
    assert not (tmp_path / "out").exists()
