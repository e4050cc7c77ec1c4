"""Label-only training for the one-pass judge: the encoded context is the judge's, token for token; the label
logits give the judge's E[label]; the pointwise and listwise losses against hand-computed references; the
group window is deterministic; a few steps of the listwise loss order a query's candidates."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rerankdistill.labels import INTERANK_PROMPT
from rerankdistill.train.forced_label import (
    LabelExample,
    encode_label_example,
    expected_label,
    group_window,
    label_context,
    label_examples,
    label_logits,
    label_loss_fn,
    label_token_ids,
    listwise_label_loss,
    pointwise_label_loss,
    relevance_log_odds,
)


@pytest.fixture(scope="module")
def backend(tiny_tokenizer):
    from rerankdistill.backends.hf import TransformersBackend
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=5).eval()
    return TransformersBackend(model, tiny_tokenizer, name="tiny", batch_size=3)


def _labels_single_token(tok):
    try:
        return label_token_ids(tok)
    except ValueError:
        pytest.skip("this tokenizer splits a label")


def test_encoded_context_and_label_logits_are_the_judges(backend):
    tok, model = backend.tokenizer, backend.model
    ids = _labels_single_token(tok)
    docs = ["def f(x):\n    return x" * n for n in (1, 7, 3)]
    expl = ["Matches: x.", "", "It says Relevance Label: 1 and more"]
    examples = [
        encode_label_example(tok, INTERANK_PROMPT, "what is x", d, e, lab, "q", 10_000)
        for d, e, lab in zip(docs, expl, (2, 0, 1))
    ]
    prompts = [backend.render(INTERANK_PROMPT.messages("what is x", d)) for d in docs]
    for ex, p, e in zip(examples, prompts, expl):
        assert ex is not None
        assert ex.input_ids == tok(p + backend._label_context(e), add_special_tokens=False)["input_ids"]
        assert label_context(e) == backend._label_context(e)
    with torch.no_grad():
        logits = label_logits(model, examples, tok.pad_token_id, ids, "cpu")  # padded batch of odd lengths
    probs = backend.label_probabilities(prompts, expl)
    torch.testing.assert_close(logits.softmax(-1), probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(expected_label(logits), (probs * torch.tensor([0.0, 1, 2])).sum(-1))


def test_documents_are_cut_to_fit(backend):
    tok = backend.tokenizer
    long_doc = "\n".join(f"def function_{i}(a, b):\n    return a * {i} + b" for i in range(200))
    whole = encode_label_example(tok, INTERANK_PROMPT, "scale", long_doc, "Matches: a.", 2, "q", 100_000)
    empty = encode_label_example(tok, INTERANK_PROMPT, "scale", "", "Matches: a.", 2, "q", 100_000)
    assert whole is not None and empty is not None
    limit = len(empty.input_ids) + 97
    fitted = encode_label_example(tok, INTERANK_PROMPT, "scale", long_doc, "Matches: a.", 2, "q", limit)
    assert fitted is not None and len(whole.input_ids) > limit >= len(fitted.input_ids) > limit - 40
    tail = tok(" Matches: a. Relevance Label:", add_special_tokens=False)["input_ids"]
    assert tok.decode(fitted.input_ids).endswith(tok.decode(tail).strip())
    assert encode_label_example(tok, INTERANK_PROMPT, "scale", long_doc, "", 0, "q", 5) is None
    with pytest.raises(ValueError, match="label"):
        encode_label_example(tok, INTERANK_PROMPT, "scale", "d", "", 3, "q", 500)


def test_losses_match_hand_computed_references():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 0, 0, 2, 0])
    ref = -sum(math.log(logits[i].softmax(-1)[labels[i]].item()) for i in range(7)) / 7
    assert pointwise_label_loss(logits, labels).item() == pytest.approx(ref, rel=1e-6)
    e = [sum(v * p for v, p in enumerate(logits[i].softmax(-1).tolist())) for i in range(7)]
    odds = [math.log(x / (2 - x)) for x in e]  # the log-odds of E[label] / 2
    torch.testing.assert_close(relevance_log_odds(logits), torch.tensor(odds), rtol=1e-5, atol=1e-5)
    gains = [2**lab - 1 for lab in labels.tolist()]
    z = math.log(sum(math.exp(x / 0.3) for x in odds))
    ref = -sum(gi / sum(gains) * (x / 0.3 - z) for gi, x in zip(gains, odds))
    assert listwise_label_loss(logits, labels, 0.3).item() == pytest.approx(ref, rel=1e-5)
    zero = listwise_label_loss(logits.requires_grad_(), torch.zeros(7, dtype=torch.long))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="temperature"):
        listwise_label_loss(logits, labels, 0.0)


def test_the_listwise_score_does_not_saturate_where_expected_label_does():
    # every candidate almost surely "2": E[label] is 2 for all (no gradient left), the log-odds still differ
    logits = torch.tensor([[0.0, 0.0, 30.0], [0.0, 0.0, 25.0], [0.0, 0.0, 20.0]], requires_grad=True)
    labels = torch.tensor([0, 2, 0])
    e = expected_label(logits)
    assert torch.allclose(e, torch.full((3,), 2.0))
    listwise_label_loss(logits, labels).backward()
    assert logits.grad is not None and logits.grad.abs().max() > 0.1
    assert relevance_log_odds(logits).argsort().tolist() == [2, 1, 0]
    # monotone in E[label]: sorting by either gives the same order
    g = torch.Generator().manual_seed(1)
    many = torch.randn(50, 3, generator=g) * 3
    assert expected_label(many).argsort().tolist() == relevance_log_odds(many).argsort().tolist()


def test_group_window_is_deterministic_and_covers_the_groups():
    groups = [[i * 3, i * 3 + 1, i * 3 + 2] for i in range(7)]
    w1, w2 = group_window(groups, 9, 2, seed=4), group_window(groups, 9, 2, seed=4)
    assert [w1(s) for s in range(9)] == [w2(s) for s in range(9)]
    first_epoch = [tuple(m) for s in range(3) for m in w1(s)] + [tuple(w1(3)[0])]
    assert sorted(first_epoch) == sorted(tuple(g) for g in groups)
    assert w1(0) != group_window(groups, 9, 2, seed=5)(0) or w1(1) != group_window(groups, 9, 2, seed=5)(1)
    with pytest.raises(ValueError):
        group_window([], 3, 1, 0)


def test_listwise_steps_put_the_relevant_candidate_first(tiny_tokenizer):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    tok = tiny_tokenizer
    ids = _labels_single_token(tok)
    model = tiny_causal_lm(tokenizer=tok, seed=1)
    rng = random.Random(0)
    examples, groups = [], []
    for q in range(6):  # the relevant document is the one that contains the query's word
        word = f"w{q}"
        docs = [f"{word} here"] + [f"z{rng.randrange(99)} there" for _ in range(3)]
        start = len(examples)
        for j, d in enumerate(docs):
            expl = f"Matches: {word}." if j == 0 else "Matches: none."
            examples.append(
                encode_label_example(tok, INTERANK_PROMPT, word, d, expl, 2 if j == 0 else 0, q, 400)
            )
        groups.append(list(range(start, start + 4)))
    loss_fn = label_loss_fn(examples, "listwise", tok.pad_token_id, ids, "cpu", temperature=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window = group_window(groups, 40, 2, seed=0)
    for step in range(40):
        opt.zero_grad()
        sum(loss_fn(model, m) for m in window(step)).backward()
        opt.step()
    with torch.no_grad():
        scores = expected_label(label_logits(model, examples, tok.pad_token_id, ids, "cpu")).view(6, 4)
    assert (scores.argmax(-1) == 0).all()
    with pytest.raises(ValueError, match="kind"):
        label_loss_fn(examples, "pairwise", tok.pad_token_id, ids, "cpu")
    assert isinstance(examples[0], LabelExample)


def test_label_examples_group_by_query_and_skip_unlabelled(tiny_tokenizer):
    from rerankdistill.teacher import Pair

    pairs = [Pair(q, d, f"query {q}", f"def {d}(): pass") for q in ("a", "b") for d in ("x", "y", "z")]
    labels = {("a", "x"): 2, ("a", "z"): 0, ("b", "y"): 0, ("b", "x"): 2}
    seen = []

    def explain(q, d):
        seen.append((q, d))
        return f"Matches: {q.split()[-1]}."

    examples, groups, dropped = label_examples(tiny_tokenizer, INTERANK_PROMPT, pairs, labels, explain, 4000)
    assert dropped == 0 and [[examples[i].group for i in g] for g in groups] == [["a", "a"], ["b", "b"]]
    assert [e.label for e in examples] == [2, 0, 2, 0] and len(seen) == 4
    one = encode_label_example(
        tiny_tokenizer, INTERANK_PROMPT, "query a", "def x(): pass", "Matches: a.", 2, "a", 4000
    )
    assert examples[0] == one
    _, _, dropped = label_examples(tiny_tokenizer, INTERANK_PROMPT, pairs, labels, explain, 3)
    assert dropped == 4
