"""Templates as versioned data, conditions, few-shot turns, definitions and chat-template rendering."""

from __future__ import annotations

import pytest

from idiomreason.definitions import definition_from_output, load_definitions
from idiomreason.examples import Example
from idiomreason.prompts import (
    BUILTIN_TEMPLATES,
    PromptTemplate,
    TemplateLibrary,
    build_prompt,
    get_template,
    join_prefill,
    order_shot_pool,
    render_plain,
    shots_for,
)


def _ex(i, label="idiomatic", expression="spill the beans", language="en", **kw):
    return Example(
        id=str(i), language=language, expression=expression, target=f"target {i}", label=label, **kw
    )


def test_builtin_templates_are_versioned_data():
    for name in BUILTIN_TEMPLATES:
        t = get_template(name)
        assert t.name == name and t.version >= 1 and "{expression}" in t.user
    assert get_template("direct").reasoning_prefill == "<think>\n\n</think>\n\n"
    assert (
        get_template("cot_definition").needs_definition
        and "{definition}" in get_template("cot_definition").user
    )
    assert not get_template("cot").reasoning_prefill


def test_conditions_and_keys(tmp_path):
    lib = TemplateLibrary()
    assert lib.condition("cot").key == "cot.v2.0shot"
    assert (
        lib.condition("direct:3shot").key == "direct.v1.3shot"
        and lib.condition("direct:3shot").label == "direct:3shot"
    )
    with pytest.raises(ValueError, match="condition must look like"):
        lib.condition("cot:three")
    with pytest.raises(ValueError, match="unknown template"):
        lib.condition("socratic")
    (tmp_path / "cot.yaml").write_text("name: cot\nversion: 2\nuser: 'Is {expression} literal? {context}'\n")
    assert TemplateLibrary(tmp_path).condition("cot").key == "cot.v2.0shot"  # a user template overrides
    (tmp_path / "bad.yaml").write_text("name: bad\nversion: 0\nuser: x\n")
    with pytest.raises(ValueError, match="version must be a positive integer"):
        TemplateLibrary(tmp_path).get("bad")
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        PromptTemplate.from_dict({"name": "x", "version": 1, "user": "u", "colour": "red"})


def test_build_prompt_direct_for_reasoning_and_base_models():
    ex = Example(
        id="1",
        language="pt",
        expression="pé direito",
        target="O pé direito é alto.",
        label="literal",
        previous="Antes {chaves}.",
        next="Depois.",
    )
    t = get_template("direct")
    p = build_prompt(t, ex, reasoning=True)
    assert p.prefill == "<think>\n\n</think>\n\n"
    assert [m["role"] for m in p.messages] == ["user"]
    text = p.messages[0]["content"]
    assert '"pé direito"' in text and "Previous sentence: Antes {chaves}." in text  # braces in data are safe
    assert "Sentence: O pé direito é alto.\nNext sentence: Depois." in text
    assert build_prompt(t, ex, reasoning=False).prefill == ""
    bare = build_prompt(t, _ex(2), reasoning=False).messages[0]["content"]
    assert "Previous sentence" not in bare and "Next sentence" not in bare


def test_definitions_and_shots():
    t = get_template("cot_definition")
    query = _ex(0, expression="Spill  the Beans")
    with pytest.raises(ValueError, match="needs a definition"):
        build_prompt(t, query)
    names = {"i": "idiomatic", "l": "literal"}
    pool = order_shot_pool(
        [_ex(i, label=names[c], expression=f"e{i}") for i, c in enumerate("iillli", 1)], seed=3
    )
    assert [e.label for e in pool[:4]] == ["idiomatic", "literal", "idiomatic", "literal"]
    defs = {"spill the beans": "reveal a secret", **{f"e{i}": f"def {i}" for i in range(1, 7)}}
    shots = shots_for(query, pool, 2)
    p = build_prompt(t, query, shots=shots, definitions=defs)
    assert [m["role"] for m in p.messages] == ["user", "assistant", "user", "assistant", "user"]
    # chain-of-thought shots show a rationale (about the shot's own expression) before the answer
    assert p.messages[1]["content"].endswith(f"\n\nAnswer: {shots[0].label}")
    assert f'"{shots[0].expression}"' in p.messages[1]["content"]
    assert ("idiomatically" if shots[0].label == "idiomatic" else "literally") in p.messages[1]["content"]
    assert "reveal a secret" in p.messages[-1]["content"] and f"def {shots[0].id}" in p.messages[0]["content"]


def test_shots_never_include_the_query_or_its_expression():
    pool = order_shot_pool(
        [
            _ex(1, "idiomatic", "a b"),
            _ex(2, "literal", "a b"),
            _ex(3, "literal", "c d"),
            _ex(4, "idiomatic", "e f"),
        ]
    )
    chosen = shots_for(_ex(1, "idiomatic", "A  B"), pool, 2)
    assert {e.id for e in chosen} == {"3", "4"}
    with pytest.raises(ValueError, match="only 2 usable"):
        shots_for(_ex(1, "idiomatic", "a b"), pool, 3)
    assert shots_for(_ex(9), pool, 0) == []


def test_join_prefill_does_not_repeat_an_opened_think_block():
    prefill = "<think>\n\n</think>\n\n"
    assert join_prefill("<|Assistant|><think>\n", prefill) == "<|Assistant|><think>\n\n</think>\n\n"
    assert join_prefill("<|im_start|>assistant\n", prefill) == "<|im_start|>assistant\n" + prefill
    assert join_prefill("x\n", "\nAnswer:") == "x\n\nAnswer:"  # only a think block is merged


def test_render_plain_and_chat_template(tiny_tokenizer):
    from idiomreason.backends.chat_render import ChatRenderer

    p = build_prompt(get_template("direct"), _ex(1), reasoning=True)
    plain = render_plain(p.messages, p.prefill)
    assert plain.startswith("User: Decide") and plain.endswith("Assistant: <think>\n\n</think>\n\n")
    rendered = ChatRenderer(tiny_tokenizer).render(p)
    assert rendered.startswith("<|im_start|>user\nDecide")
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("To reveal a secret.", "To reveal a secret."),
        ("<think>hmm</think>\n\nDefinition: to reveal a secret\n\nExample: ...", "to reveal a secret"),
        ('**Meaning:** "to die"', "to die"),
        ("<think>never finished", None),
        ("<think>x</think>   ", None),
    ],
)
def test_definition_from_output(text, expected):
    assert definition_from_output(text) == expected


def test_load_definitions_formats(tmp_path):
    (tmp_path / "d.json").write_text('{"Spill the  beans": "reveal a secret"}')
    (tmp_path / "d.jsonl").write_text('{"expression": "a b", "definition": "x"}\n')
    (tmp_path / "d.tsv").write_text("expression\tdefinition\npé direito\taltura do teto\n")
    assert load_definitions(tmp_path / "d.json") == {"spill the beans": "reveal a secret"}
    assert load_definitions(tmp_path / "d.jsonl") == {"a b": "x"}
    assert load_definitions(tmp_path / "d.tsv") == {"pé direito": "altura do teto"}
    (tmp_path / "e.csv").write_text("mwe,meaning\na,b\n")
    with pytest.raises(ValueError, match="needs columns"):
        load_definitions(tmp_path / "e.csv")


def test_a_shot_with_its_own_rationale_shows_it():
    t = get_template("cot")
    shot = Example(
        id="s",
        language="en",
        expression="e f",
        target="t",
        label="literal",
        source={"rationale": "Annotated: a real bucket."},
    )
    p = build_prompt(t, _ex(1), shots=[shot])
    assert p.messages[1]["content"] == "Annotated: a real bucket.\n\nAnswer: literal"
    direct = build_prompt(get_template("direct"), _ex(1), shots=[shot])
    assert direct.messages[1]["content"] == "Answer: literal"  # the direct condition shows no reasoning
