"""OpenAI-compatible HTTP backend: retries with backoff, timeouts, concurrency limit, API key handling.

These run against a scripted stdlib HTTP server on loopback (real sockets, real HTTP) that can fail on
demand; the end-to-end tests against a real model server are in test_idiomreason_e2e.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idiomreason.backends import make_backend
from idiomreason.backends.http import HTTPBackendError, OpenAIHTTPBackend
from idiomreason.prompts import Prompt

SECRET = "sk-test-very-secret-123"


class ScriptedServer:
    """Answers POSTs from a script: a list of (status, body dict or text, delay s, headers) consumed in
    order, then `default`. Records every request's headers and JSON body, and the most requests in flight."""

    def __init__(self):
        self.script: list[tuple[int, object, float, dict]] = []
        self.default = (200, None, 0.0, {})
        self.requests: list[tuple[dict, dict]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((dict(self.headers), body))
                    status, payload, delay, headers = outer.script.pop(0) if outer.script else outer.default
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(delay)
                with outer.lock:
                    outer.in_flight -= 1
                if payload is None:  # echo: the answer names the prompt it got
                    text = body.get("prompt") or body["messages"][-1]["content"]
                    payload = (
                        _chat(f"echo {text}")
                        if "messages" in body
                        else {
                            "choices": [{"text": f"echo {text}", "finish_reason": "stop"}],
                            "usage": {"completion_tokens": 3},
                        }
                    )
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _chat(content, reasoning=None, finish="stop"):
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"choices": [{"message": message, "finish_reason": finish}], "usage": {"completion_tokens": 5}}


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def _prompts(n, prefill=""):
    return [Prompt(messages=[{"role": "user", "content": f"q{i}"}], prefill=prefill) for i in range(n)]


def _backend(server, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAIHTTPBackend(server.url, "tiny", **kw)


def test_concurrency_is_bounded_and_every_prompt_answered(server):
    server.default = (200, None, 0.05, {})
    backend = _backend(server, concurrency=3)
    out = dict(backend.generate(_prompts(10), max_new_tokens=7))
    assert sorted(out) == list(range(10))
    assert all(out[i].text == f"echo q{i}" for i in range(10))
    assert 1 < server.max_in_flight <= 3
    _, body = server.requests[0]
    assert body["model"] == "tiny" and body["max_tokens"] == 7 and body["temperature"] == 0.0


def test_retries_with_backoff_then_succeeds(server, caplog):
    server.script = [(503, "busy", 0, {}), (429, "slow down", 0, {"Retry-After": "0"}), (500, "oops", 0, {})]
    backend = _backend(server, concurrency=1, max_retries=3)
    with caplog.at_level(logging.WARNING, logger="idiomreason"):
        ((index, gen),) = list(backend.generate(_prompts(1), 5))
    assert gen.text == "echo q0" and len(server.requests) == 4
    assert caplog.text.count("retry") == 3 and "HTTP 503: busy" in caplog.text


def test_retries_exhausted_and_non_retryable_errors(server):
    server.script = [(503, "busy", 0, {})] * 3
    with pytest.raises(HTTPBackendError, match=r"failed after 3 tries; last: HTTP 503"):
        list(_backend(server, max_retries=2).generate(_prompts(1), 5))
    server.script = [(400, "bad request: max_tokens too large", 0, {})]
    with pytest.raises(HTTPBackendError, match="HTTP 400: bad request"):
        list(_backend(server, max_retries=5).generate(_prompts(1), 5))
    assert len(server.requests) == 4  # the 400 was not retried


def test_timeouts_are_retried(server):
    server.script = [(200, None, 1.0, {})]  # the first answer comes too late
    backend = _backend(server, timeout=0.3, max_retries=2, concurrency=1)
    ((_, gen),) = list(backend.generate(_prompts(1), 5))
    assert gen.text == "echo q0" and len(server.requests) == 2


def test_api_key_comes_from_the_environment_and_is_never_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("IDIOM_TEST_KEY", SECRET)
    server.script = [(503, f"echoing your key {SECRET}", 0, {}), (401, f"bad key {SECRET}", 0, {})]
    backend = _backend(server, api_key_env="IDIOM_TEST_KEY", max_retries=3)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(HTTPBackendError) as info:
            list(backend.generate(_prompts(1), 5))
    assert server.requests[0][0]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in str(info.value) and "***" in str(info.value)
    assert SECRET not in caplog.text and SECRET not in repr(backend) and "(set)" in repr(backend)
    monkeypatch.delenv("IDIOM_TEST_KEY")
    server.requests.clear()
    list(_backend(server, api_key_env="IDIOM_TEST_KEY").generate(_prompts(1), 5))
    assert "Authorization" not in server.requests[0][0]


def test_prefill_and_reasoning_fields_in_chat_mode(server):
    server.script = [
        (200, _chat("Answer: literal", reasoning="thinking..."), 0, {}),
        (200, _chat("", reasoning="cut off", finish="length"), 0, {}),
    ]
    backend = _backend(server, concurrency=1, prefill_via="continue_final_message")
    out = dict(backend.generate(_prompts(2, prefill="<think>\n\n</think>\n\n"), 5))
    assert out[0].text == "<think>thinking...</think>Answer: literal" and out[0].n_tokens == 5
    assert out[1].text == "<think>cut off" and out[1].finish_reason == "length"
    _, body = server.requests[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "<think>\n\n</think>\n\n"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_completions_mode_renders_prompts_here(server):
    backend = _backend(server, api="completions")
    ((_, gen),) = list(backend.generate(_prompts(1, prefill="<think>\n\n</think>\n\n"), 5))
    _, body = server.requests[0]
    assert body["prompt"] == "User: q0\n\nAssistant: <think>\n\n</think>\n\n"
    assert gen.text.startswith("echo User: q0")


def test_unexpected_response_shape(server):
    server.script = [(200, {"choices": []}, 0, {})]
    with pytest.raises(HTTPBackendError, match="unexpected response shape"):
        list(_backend(server).generate(_prompts(1), 5))


def test_bad_arguments(server):
    with pytest.raises(ValueError, match="api must be"):
        OpenAIHTTPBackend(server.url, "m", api="responses")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIHTTPBackend(server.url, "m", concurrency=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(_backend(server).generate(_prompts(1), 0))
    with pytest.raises(ValueError, match="base_url"):
        make_backend("http", "m")
    with pytest.raises(ValueError, match="backend kind"):
        make_backend("onnx", "m")


def test_chat_prefills_go_where_the_template_can_take_them(server, tiny_tokenizer):
    prefill = "<think>\n\n</think>\n\n"
    with pytest.raises(ValueError, match="pass tokenizer="):  # auto without a tokenizer: refuse, never guess
        list(_backend(server).generate(_prompts(1, prefill=prefill), 5))
    assert server.requests == []
    # auto with the model's tokenizer: /completions, rendered here by its template (+ the prefill)
    ((_, gen),) = list(_backend(server, tokenizer=tiny_tokenizer).generate(_prompts(1, prefill=prefill), 5))
    _, body = server.requests[-1]
    assert body["prompt"] == "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n" + prefill
    assert "messages" not in body and gen.text.startswith("echo <|im_start|>user")
    # prompts without a prefill still go to /chat/completions
    list(_backend(server, tokenizer=tiny_tokenizer).generate(_prompts(1), 5))
    assert server.requests[-1][1]["messages"] == [{"role": "user", "content": "q0"}]
    # the template's own switch (Qwen3): no assistant message, enable_thinking off
    list(_backend(server, prefill_via="thinking_switch").generate(_prompts(1, prefill=prefill), 5))
    _, body = server.requests[-1]
    assert body["messages"] == [{"role": "user", "content": "q0"}]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(ValueError, match="prefill_via must be one of"):
        _backend(server, prefill_via="prefill")
