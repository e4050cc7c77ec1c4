"""Evidence explanations: query words found (identifier-aware, stemmed), what the code defines and calls, and
which query words the unit's own name spells."""

from rerankdistill.evidence import evidence, name_words, unit_name
from rerankdistill.teacher import QrelsTeacher


def test_evidence_counts_identifier_parts_and_lists_calls():
    text = evidence(
        "Return the HTTP headers of the responses",
        "class HTTPResponse:\n    def getheaders(self):\n        return list(self.headers.items())",
    )
    assert text == (
        "Matches: return, http, header, response (4 of 4 query words). Defines HTTPResponse, getheaders. "
        "Calls list, items. Name getheaders spells: headers (1 of 4 query words)."
    )


def test_evidence_caps_and_non_code():
    q = "alpha beta gamma delta epsilon zeta eta theta iota"
    doc = "alpha beta gamma delta epsilon zeta eta theta iota, plain prose (not code"
    assert evidence(q, doc, max_words=3) == "Matches: alpha, beta, gamma (9 of 9 query words)."
    assert evidence("", "") == "Matches: none (0 of 0 query words)."


def test_unit_name_is_the_method_shown_in_its_class_else_the_first_definition():
    method = "class Wm:\n\n    def wm_iconname(self, newName=None):\n        return self.tk.call(newName)"
    assert unit_name(method) == "wm_iconname"
    klass = (
        "class DirList(TixWidget):\n\n    def __init__(self, master):\n        ...\n\n    def chdir(self):\n"
    )
    assert unit_name(klass) == "DirList"  # a class with several methods is about the class
    assert unit_name("def indentsize(line):\n    return len(line)") == "indentsize"
    assert unit_name("async def fetch(url):\n    pass") == "fetch"
    assert unit_name("no code here") is None


def test_name_words_finds_query_words_inside_unsplittable_names():
    # "indentsize" has no underscore or capital: identifier splitting cannot find "indent" or "size"
    assert name_words("Return the indent size, in spaces, at the start of a line.", "indentsize") == (
        ["indent", "size"],
        6,
    )
    # case-insensitive, stopwords and words under 3 letters never count, each word once, query order
    assert name_words("Set the name of the icon; the NAME is a string", "wm_iconName") == (
        ["name", "icon"],
        4,
    )
    assert name_words("", "x") == ([], 0)
    text = evidence("Return the indent size of a line", "def indentsize(line):\n    return len(line)")
    assert text.endswith("Name indentsize spells: indent, size (2 of 4 query words).")


def test_the_evidence_teacher_name_carries_the_evidence_version():
    from rerankdistill.evidence import EVIDENCE_VERSION

    teacher = QrelsTeacher({}, explanation="evidence")
    assert teacher.name == f"offline-qrels-oracle-evidence-v{EVIDENCE_VERSION}"
