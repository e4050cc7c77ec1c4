"""extract_label on the outputs reasoning models actually produce (table-driven)."""

from __future__ import annotations

import pytest

from idiomreason.parsing import answer_region, extract_label, split_reasoning

I, L = "idiomatic", "literal"

CASES = [
    # plain answers and the format the prompts ask for
    ("Answer: idiomatic", I),
    ("Answer: literal", L),
    ("answer:LITERAL", L),
    ("Idiomatic", I),
    ("literal.", L),
    ("**Answer:** **Idiomatic**", I),
    ("The final answer is literal.", L),
    ("Label: idiomatic", I),
    ("\\boxed{literal}", L),
    ("So the result is $\\boxed{\\text{idiomatic}}$.", I),
    ("The expression is used figuratively here.", I),
    ("It is meant literally: he really spilled the beans on the floor.", L),
    # think blocks: closed, only the closing tag, prefilled empty, unclosed (truncated)
    ("<think>\nMaybe literal? No, the context is about secrets.\n</think>\n\nAnswer: idiomatic", I),
    ("<think>It sounds idiomatic at first.</think>Answer: literal", L),
    ("He is talking about a real bucket, so it's literal.\n</think>\n\nliteral", L),
    ("<think>\n\n</think>\n\nAnswer: idiomatic", I),
    ("<think>\nLet me consider whether this is idiomatic. The phrase", None),
    ("<think>The answer is idiomatic. Wait, let me re-check the next sentence", None),
    ("<think>long reasoning</think>", None),
    ("<think>reasoning about idiomatic use</think>\n\nI am not sure.", None),
    # answers that mention both labels
    ("Answer: idiomatic (not literal)", I),
    ("It is idiomatic, not literal.", I),
    ("It is used figuratively rather than literally.", I),
    ("This is not idiomatic; it is literal.", L),
    ("Literal or idiomatic? I would say idiomatic.", I),
    ("It could be literal or idiomatic.", None),
    ("At first I thought literal. Answer: idiomatic\n", I),
    ("Answer: idiomatic.\nWait, re-reading it. Answer: literal", L),
    ("I think it is idiomatic.\n\nAnswer: literal", L),
    ("**Final Answer**\n\\boxed{literal}", L),
    ("The answer is: idiomatic", I),
    ("ANSWER - LITERAL", L),
    ("Answer: not literal", I),
    ("Answer: literal or idiomatic", None),
    ("The idiomatic expression 'kick the bucket' is used literally here.", L),
    ("Answer: non-idiomatic", L),
    ("The usage is non-literal.", I),
    # issue 19: digits in SemEval's convention, yes/no-answered label questions, a "but" that decides
    ("Answer: 1", L),
    ("Answer: 0", I),
    ("<think>SemEval labels: 0 idiomatic, 1 literal.</think>\n\nAnswer: 0", I),
    ("Idiomatic usage? No.", L),
    ("Idiomatic usage? Yes.", I),
    ("Literal meaning? No, it is about revealing a secret.", I),
    (
        "Both the literal and the idiomatic readings are possible, "
        "but the context points to the idiomatic one.",
        I,
    ),
    ("It could be idiomatic or literal; however, here it is literal.", L),
    ("It could be idiomatic or literal, but I cannot tell.", None),
    # Portuguese and Galician
    ("Resposta: idiomático", I),
    ("A resposta é: literal", L),
    ("A expressão é usada de forma figurada.", I),
    ("Neste contexto, o sentido é literal.", L),
    ("Não é literal; é idiomática.", I),
    ("A expresión non é idiomática.", L),
    ("Resposta final: idiomática", I),
    ("O uso é idiomático, não literal.", I),
    # yes / no phrasings (the question "is it used idiomatically?")
    ("Yes.", I),
    ("No, it is meant in its ordinary sense.", L),
    ("Answer: yes", I),
    ("Sim.", I),
    ("Não.", L),
    ("Non", L),
    # nothing to find
    ("", None),
    ("   \n ", None),
    ("I cannot determine this from the sentence.", None),
    ("The weather is nice today.", None),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_extract_label(text, expected):
    assert extract_label(text) == expected


def test_enough_cases():
    assert len(CASES) >= 30


def test_yes_means_can_be_flipped():
    assert extract_label("Yes.", yes_means="literal") == L
    assert extract_label("No.", yes_means="literal") == I


def test_bad_arguments():
    with pytest.raises(TypeError, match="text"):
        extract_label(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="yes_means"):
        extract_label("yes", yes_means="maybe")


@pytest.mark.parametrize(
    "text, reasoning, answer",
    [
        ("<think>a b c</think>Answer: literal", "a b c", "Answer: literal"),
        ("a b c\n</think>\nliteral", "a b c", "literal"),
        ("<think>a b c", "a b c", ""),
        ("Answer: literal", "", "Answer: literal"),
    ],
)
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


def test_answer_region():
    assert answer_region("<think>x</think> y </think> z") == " z"
    assert answer_region("<think>x") is None
    assert answer_region("plain") == "plain"
