"""idiomreason's HTTP backend redacts through the shared helper (`shared_kernels.redaction`): against a server
that echoes the Authorization header, the key is in no exception, traceback or log line -- neither the exact
key nor any other bearer token the server reflects."""

from __future__ import annotations

import logging
import traceback

import pytest

from idiomreason.backends.http import HTTPBackendError, OpenAIHTTPBackend
from idiomreason.prompts import Prompt
from shared_kernels.testing.auth_echo_server import auth_echo_server

KEY = "sk-idiomreason-secret-0123456789"


def test_echoed_authorization_header_is_redacted(monkeypatch, caplog):
    monkeypatch.setenv("IDIOM_ECHO_KEY", KEY)
    with auth_echo_server() as base_url, caplog.at_level(logging.DEBUG):
        backend = OpenAIHTTPBackend(base_url, "m", api_key_env="IDIOM_ECHO_KEY", max_retries=0)
        with pytest.raises(HTTPBackendError) as err:
            list(backend.generate([Prompt(messages=[{"role": "user", "content": "q"}])], 4))
        backend.close()
    text = "".join(traceback.format_exception(err.value))
    assert "HTTP 401" in text and "Authorization: Bearer ***" in text
    assert KEY not in text and KEY not in caplog.text and KEY not in repr(backend)
