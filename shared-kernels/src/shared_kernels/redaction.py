"""Secrets out of every error message, log line and record: the one redaction helper of every backend.

A server may echo a request's headers in its error body (`{"error": "bad key Bearer sk-..."}`); an exception
that carries that body into a traceback, a log or an output file leaks the key. `redact` removes the exact
secret values it is given (e.g. the API key read from the environment) and, as a second line of defence,
any `Bearer <token>` and `Authorization:`/`api-key:` header value. Torch-free.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

__all__ = ["REDACTED", "env_secrets", "redact"]

REDACTED = "***"
# `Authorization: Bearer <v>`, `Bearer <v>`, `x-api-key: <v>`, `"api_key": "<v>"`: the prefix is kept, <v> is not
_HEADER_VALUE = re.compile(r"(?i)\b((?:(?:authorization|x-api-key|api[-_]key)[\"']?\s*[:=]\s*[\"']?)"
                           r"(?:(?:bearer|basic|token)\s+)?|bearer\s+)(?!\*\*\*)[^\s\"',;}]+")


def env_secrets(*names: str) -> list[str]:
    """The non-empty values of the environment variables `names` (API keys to redact)."""
    return [v for v in (os.environ.get(n, "") for n in names if n) if v]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret value and every bearer token / key header value replaced by `***`.

    Args:
        text: an error body, message or log line.
        secrets: exact values to remove (longest first, so a key containing another is removed whole).
    """
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _HEADER_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
