"""The final label from a (reasoning) model's output, or None when there is none to find.

Algorithm (`extract_label`):

1. Answer region. With a `</think>`, the text after the LAST `</think>` (R1 distills often emit only the
   closing tag, the opening one being in the prompt). With a `<think>` that is never closed the generation
   was cut off mid-reasoning: there is no answer (None). Without tags, the whole text.
2. The region is lower-cased, accents are stripped (idiomático -> idiomatico) and markdown emphasis removed.
3. Explicit answer markers win: the LAST of `answer:` / `final answer is` / `label:` / `classification:` /
   `resposta:` (pt, gl) / `\\boxed{...}`, read from the words right after it. A bare digit there is read
   in SemEval-2022 Task 2's convention (`digit_labels`: 0 = idiomatic, 1 = literal): "Answer: 1" -> literal.
3b. A label question answered yes/no ("Idiomatic usage? No.") answers for that label: no -> the other class.
4. Otherwise every label word is collected, with negation ("not idiomatic", "não literal", "non
   idiomático", "rather than literally") flipping it. One class only -> that class. Both classes -> the
   last sentence that names exactly one class decides ("Literal or idiomatic? Idiomatic." -> idiomatic);
   a sentence naming both is decided by what follows its last "but" / "however" ("Both readings are
   possible, but the context points to the idiomatic one." -> idiomatic); otherwise None.
5. Otherwise a bare yes/no (en, pt "sim"/"não", gl "si"/"non") opening the region answers a question of the
   form "is it used idiomatically?": yes -> `yes_means` (idiomatic by default), no -> the other class.

Unparseable outputs are None, never a guess: callers count them (see `metrics.summarise`).
"""

from __future__ import annotations

import re
import unicodedata

_IDIOMATIC = (
    r"idiomatic(?:al)?(?:ally|ly)?|idiomatic[oa]s?|idiomaticamente"
    r"|figurative(?:ly)?|figurativ[oa]s?|figurativamente|figurad[oa]s?|figuradamente"
    r"|metaphorical(?:ly)?|metaforic[oa]s?|metaforicamente|non-?literal(?:ly)?"
)
_LITERAL = r"literal(?:ly)?|literais|literalmente|non-?idiomatic(?:ally)?|compositional(?:ly)?"
# "the idiomatic expression X is used literally" names the expression, not the class: not a mention.
_TERM = re.compile(
    rf"\b(?:(?P<idiomatic>{_IDIOMATIC})(?!\s+(?:expressions?|phrases?))|(?P<literal>{_LITERAL}))\b"
)
# A negator a few words before a label word flips it: "not idiomatic", "is not being used literally",
# "não é literal", "non é idiomático" (gl), "rather than literally", "em vez de literal".
_NEGATOR = re.compile(
    r"(?:\bnot\b|n't\b|\bnever\b|\bnao\b|\bnon\b|\bnunca\b|\brather than\b|\binstead of\b|\bas opposed to\b"
    r"|\bem vez de\b|\bao inves de\b|\bno canto de\b|\ben vez de\b)(?:\W+\w+){0,2}\W*$"
)
_MARKER = re.compile(
    r"(?:\bfinal answer\b|\banswer\b|\blabel\b|\bclassification\b|\bprediction\b|\bverdict\b"
    r"|\bresposta(?: final)?\b|\brespuesta\b|\bclassificacion\b|\bclassificacao\b)"
    r"\s*(?:is|e|:|=|-|->)\s*(?=(?P<rest>.{0,60}))",  # a lookahead: markers inside `rest` are found too
    re.DOTALL,
)
_BOXED = re.compile(r"\\boxed\{(?:\\text\{)?(?P<rest>[^{}]{0,40})")
_YES = re.compile(r"^\W*(?:yes|sim|si)\b")
_NO = re.compile(r"^\W*(?:no|nao|non)\b")
# "idiomatic usage? no." / "is it literal? yes": a label word in a question, answered right after it.
_QUESTION = re.compile(
    rf"\b(?:(?P<idiomatic>{_IDIOMATIC})|(?P<literal>{_LITERAL}))\b[^?.!\n]{{0,30}}\?\s*"
    r"(?:(?P<yes>yes|sim|si)|(?P<no>no|nao|non))\b"
)
_CONTRAST = re.compile(r"\b(?:but|however|yet|though|although|mas|porem|pero|aunque)\b")
_DIGIT = re.compile(r"^\W*([01])\b")
SEMEVAL_DIGITS = {"0": "idiomatic", "1": "literal"}
_SENTENCE_END = re.compile(r"(?<=[.!?;\n])\s+|\n+")


def _normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"[*_`#]+", "", stripped)


def answer_region(text: str) -> str | None:
    """The part of `text` that should hold the answer: after the last `</think>`; None when a `<think>`
    block was opened and never closed (truncated reasoning)."""
    close = text.rfind("</think>")
    if close >= 0:
        return text[close + len("</think>") :]
    if "<think>" in text:
        return None
    return text


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an output: the think block's content and what follows it. Without a closing
    tag, an opened `<think>` makes everything reasoning; without tags there is no separate reasoning."""
    close = text.rfind("</think>")
    if close >= 0:
        reasoning = text[:close]
        start = reasoning.find("<think>")
        return (reasoning[start + len("<think>") :] if start >= 0 else reasoning).strip(), text[
            close + 8 :
        ].strip()
    start = text.find("<think>")
    if start >= 0:
        return text[start + len("<think>") :].strip(), ""
    return "", text.strip()


def _mentions(text: str) -> list[str]:
    """Label words in order, each as the class it asserts once negation is applied."""
    found = []
    for m in _TERM.finditer(text):
        cls = "idiomatic" if m.group("idiomatic") else "literal"
        if _NEGATOR.search(text[max(0, m.start() - 40) : m.start()]):
            cls = "literal" if cls == "idiomatic" else "idiomatic"
        found.append(cls)
    return found


def _label_after_marker(rest: str, yes_means: str, digit_labels: dict[str, str]) -> str | None:
    head = re.split(r"[.\n;]", rest.strip(), maxsplit=1)[0]
    mentions = _mentions(head)
    if mentions and len(set(mentions)) == 1:
        return mentions[0]
    if not mentions:
        digit = _DIGIT.match(head)
        if digit is not None:
            return digit_labels.get(digit.group(1))
        return _yes_no(head, yes_means)
    return None


def _answered_question(region: str) -> str | None:
    """The class a yes/no-answered label question asserts (the last such question), or None."""
    found = list(_QUESTION.finditer(region))
    if not found:
        return None
    m = found[-1]
    named = "idiomatic" if m.group("idiomatic") else "literal"
    return named if m.group("yes") else ("literal" if named == "idiomatic" else "idiomatic")


def _contrast_decides(sentence: str) -> str | None:
    """In a sentence naming both classes, the single class named after its last contrast word, if any."""
    parts = _CONTRAST.split(sentence)
    if len(parts) < 2:
        return None
    after = set(_mentions(parts[-1]))
    return after.pop() if len(after) == 1 else None


def _yes_no(text: str, yes_means: str) -> str | None:
    other = "literal" if yes_means == "idiomatic" else "idiomatic"
    if _YES.match(text):
        return yes_means
    if _NO.match(text):
        return other
    return None


def extract_label(
    text: str, yes_means: str = "idiomatic", digit_labels: dict[str, str] = SEMEVAL_DIGITS
) -> str | None:
    """ "idiomatic", "literal" or None from a model's output (see the module docstring for the rules).

    Args:
        text: the full output, including any prefilled think block.
        yes_means: the class a bare "yes" answers (the question asked "is it idiomatic?" by default).
        digit_labels: the class of a bare "0" / "1" after an answer marker (SemEval's 0 = idiomatic).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if yes_means not in ("idiomatic", "literal"):
        raise ValueError(f"yes_means must be 'idiomatic' or 'literal', got {yes_means!r}")
    region = answer_region(text)
    if region is None:
        return None
    region = _normalise(region)
    if not region.strip():
        return None

    label = _label_from_markers(region, yes_means, digit_labels)
    if label is None:
        label = _answered_question(region)
    if label is not None:
        return label
    mentions = _mentions(region)
    if mentions:
        return _label_from_mentions(region, mentions)
    return _yes_no(region, yes_means)


def _label_from_markers(region: str, yes_means: str, digit_labels: dict[str, str]) -> str | None:
    """Step 3: the label after the last answer marker (`answer:`, `\\boxed{...}`, ...) that yields one."""
    markers = [(m.start(), m.group("rest")) for m in _MARKER.finditer(region)]
    markers += [(m.start(), m.group("rest")) for m in _BOXED.finditer(region)]
    for _, rest in sorted(markers, reverse=True):
        label = _label_after_marker(rest, yes_means, digit_labels)
        if label is not None:
            return label
    return None


def _label_from_mentions(region: str, mentions: list[str]) -> str | None:
    """Step 4: one class mentioned -> that class; both -> the last sentence naming exactly one decides, and
    a sentence naming both is decided by a "but ..." clause or not at all."""
    if len(set(mentions)) == 1:
        return mentions[0]
    for sentence in reversed(_SENTENCE_END.split(region)):
        in_sentence = set(_mentions(sentence))
        if len(in_sentence) == 1:
            return in_sentence.pop()
        if in_sentence:
            return _contrast_decides(sentence)
    return None


def output_prefix(prefill: str, reasoning: bool, generated: str) -> str:
    """What to put before a generated text before parsing it: the prefill when there was one; for a
    reasoning model whose output does not open its think block (the chat template did), "<think>\\n", so
    that a generation cut off mid-reasoning reads as unclosed reasoning rather than as an answer."""
    if prefill:
        return prefill
    if reasoning and "<think>" not in generated:
        return "<think>\n"
    return ""
