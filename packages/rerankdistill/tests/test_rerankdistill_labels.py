"""parse_relevance: InteRank's label line, keyword fallbacks, invalid and missing labels."""

from __future__ import annotations

import pytest

from rerankdistill.labels import INTERANK_PROMPT, parse_relevance, truncate_at_stop

CASES = [
    ("The document answers it. Relevance Label: 2 ##", 2),
    ("Relevance Label: 0", 0),
    ("relevance label:1", 1),
    ("RELEVANCE LABEL : 2 ##", 2),
    ("Relevance label = 1", 1),
    ("Relevance Label: **2**", 2),
    ("Relevance Label: [1]", 1),
    ("Relevance_Label: 0 ##", 0),
    ("Relevance Label:\n2", 2),
    ("It mentions Relevance Label: 0 as an example. Final. Relevance Label: 2 ##", 2),  # the last label wins
    ("Relevance Label: 3 ##", None),  # outside 0..2
    ("Relevance Label: -1", None),
    ("Relevance Label: partially relevant", 1),
    ("Relevance Label: Not relevant ##", 0),
    ("Relevance Label: relevant", 2),
    ("2", 2),
    ("**1** ##", 1),
    ("  0  ", 0),
    ("7", None),
    ("The document is irrelevant to the question.", 0),
    ("This page is not relevant.", 0),
    ("This page is not at all relevant.", 0),
    ("The passage is partially relevant: it covers one half.", 1),
    ("somewhat relevant", 1),
    ("The document is highly relevant.", 2),
    ("It is relevant.", 2),
    ("At first it seems irrelevant, but on reflection it is highly relevant.", 2),  # last mention wins
    ("At first it seems relevant, but it is not relevant.", 0),
    ("", None),
    ("I cannot decide.", None),
    ("The relevance of this document is unclear", None),  # "relevance" alone is not a verdict
    ("Label 2 maybe", None),
    ("Relevance Label: <0|1|2> ##", None),  # the template echoed back is not a label
    ("Format: `Relevance Label: <0|1|2> ##`. My answer: Relevance Label: 1 ##", 1),
    ("Relevance Label: 12", None),
    ("Relevance Label: 2/2", 2),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_relevance(text, expected):
    assert parse_relevance(text) == expected


def test_max_label_and_type():
    assert parse_relevance("Relevance Label: 3", max_label=3) == 3
    with pytest.raises(TypeError, match="text must be a string"):
        parse_relevance(None)


def test_prompt_renders_and_cuts_document():
    msgs = INTERANK_PROMPT.messages("why is the sky blue", "x" * 9000)
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert "x" * 8000 in msgs[-1]["content"] and "x" * 8001 not in msgs[-1]["content"]
    assert "why is the sky blue" in msgs[-1]["content"]
    with pytest.raises(ValueError, match="query must be"):
        INTERANK_PROMPT.messages("  ", "doc")
    target = INTERANK_PROMPT.completion("It  explains\nRayleigh scattering.", 2)
    assert target == "It explains Rayleigh scattering. Relevance Label: 2 ##"
    assert parse_relevance(truncate_at_stop(target)) == 2
    assert truncate_at_stop(target) == "It explains Rayleigh scattering. Relevance Label: 2"
