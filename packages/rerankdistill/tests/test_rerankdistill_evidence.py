"""Evidence explanations: query words found (identifier-aware, stemmed), what the code defines and calls."""

from rerankdistill.evidence import evidence


def test_evidence_counts_identifier_parts_and_lists_calls():
    text = evidence(
        "Return the HTTP headers of the responses",
        "class HTTPResponse:\n    def getheaders(self):\n        return list(self.headers.items())",
    )
    assert text == (
        "Matches: return, http, header, response (4 of 4 query words). Defines HTTPResponse, getheaders. "
        "Calls list, items."
    )


def test_evidence_caps_and_non_code():
    q = "alpha beta gamma delta epsilon zeta eta theta iota"
    doc = "alpha beta gamma delta epsilon zeta eta theta iota, plain prose (not code"
    assert evidence(q, doc, max_words=3) == "Matches: alpha, beta, gamma (9 of 9 query words)."
    assert evidence("", "") == "Matches: none (0 of 0 query words)."
