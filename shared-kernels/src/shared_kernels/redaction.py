"""Secrets out of every error message, log line and record: the one redaction helper of every backend.

A server may echo a request's headers in its error body (`{"error": "bad key Bearer sk-..."}`); an exception
that carries that body into a traceback, a log or an output file leaks the key. `redact` removes the exact
secret values it is given (e.g. the API key read from the environment) and, as a second line of defence,
any `Bearer <token>` and `Authorization:`/`api-key:` header value. `redact_http_logs` does the same to the
records of the HTTP client libraries' own loggers (httpcore logs response headers at DEBUG, so a server that
echoes the key in a header would leak it through any DEBUG handler). Torch-free.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

__all__ = ["REDACTED", "RedactingFilter", "env_secrets", "redact", "redact_http_logs"]

REDACTED = "***"
# `Authorization: Bearer <v>`, `Bearer <v>`, `x-api-key: <v>`, `"api_key": "<v>"`:
# the prefix is kept, <v> is not
_HEADER_VALUE = re.compile(
    r"(?i)\b((?:(?:authorization|x-api-key|api[-_]key)[\"']?\s*[:=]\s*[\"']?)"
    r"(?>(?:(?:bearer|basic|token)\s+)?)|bearer\s+)(?!\*\*\*)[^\s\"',;}]+"
)


def env_secrets(*names: str) -> list[str]:
    """The non-empty values of the environment variables `names` (API keys to redact)."""
    return [v for v in (os.environ.get(n, "") for n in names if n) if v]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret value and every bearer token / key header value replaced by `***`.

    Args:
        text: an error body, message or log line.
        secrets: exact values to remove (longest first, so a key containing another is removed whole).
    """
    text = _HEADER_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message through `redact` (it never drops records)."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = set(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# Logger filters apply only to records logged on that exact logger, so every module logger is named.
HTTP_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")


def redact_http_logs(secrets: Iterable[str]) -> None:
    """Redact `secrets` (and bearer tokens) from the httpx/httpcore loggers' records, once per process."""
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        existing = next((f for f in logger.filters if isinstance(f, RedactingFilter)), None)
        if existing is None:
            logger.addFilter(RedactingFilter(secrets))
        else:
            existing.secrets.update(s for s in secrets if s)
