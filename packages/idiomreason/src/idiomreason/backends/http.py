"""Any OpenAI-compatible HTTP server (vLLM serve, transformers serve, SGLang, hosted APIs).

Requests run `concurrency` at a time on a thread pool over one pooled `httpx.Client`; each has a timeout and
is retried on transport errors, timeouts and 408/409/429/5xx with exponential backoff (`backoff * 2**k`,
jittered, capped at `max_backoff`, or the server's `Retry-After`). Other 4xx fail at once with the
server's message.

The API key is read from the environment variable named by `api_key_env` and only ever put in the
Authorization header: it is not stored in repr, logs or exception messages (any echo of it, or of any
bearer token, is redacted by `shared_kernels.redaction`).

Two wire APIs:
- `api="chat"`: `/chat/completions` with the messages; the server applies the model's chat template. A
  `reasoning_content` / `reasoning` field (vLLM's reasoning parser) is put back into `<think>...</think>`
  before the content. A prompt with a prefill (the direct condition's empty think block for R1-style
  models) goes as `prefill_via` says:
  - "completions" (what "auto" does when `tokenizer` is given): `/completions` with the prompt rendered here
    by the model's own chat template plus the prefill. Right for every template, R1 distills included.
  - "continue_final_message": a final assistant message with vLLM's `continue_final_message: true,
    add_generation_prompt: false`. Only for templates that keep an assistant turn verbatim (Qwen2.5,
    Llama 3): the R1-distill template keeps only what follows `</think>` in assistant turns, so the
    prefill vanishes and vLLM answers 400 ("final message does not appear in the chat"); servers that
    reject unknown fields (transformers serve) answer 422.
  - "thinking_switch": the template's own switch, `chat_template_kwargs: {"enable_thinking": false}`, for
    templates that have one (Qwen3); the prefill is not sent.
  "auto" without a tokenizer refuses prompts with a prefill rather than guess.
- `api="completions"`: `/completions` with the prompt rendered here, by the chat template of `tokenizer`
  (a path or hub id; needs the hf extra) or as plain text without one.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx

from idiomreason.backends.base import Generation, check_generate_args
from idiomreason.backends.chat_render import ChatRenderer, PlainRenderer
from idiomreason.prompts import Prompt
from shared_kernels.redaction import redact, redact_http_logs

logger = logging.getLogger("idiomreason")

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
PREFILL_MODES = ("auto", "completions", "continue_final_message", "thinking_switch")


class HTTPBackendError(RuntimeError):
    """A request that failed for good (non-retryable status, or retries exhausted)."""


class OpenAIHTTPBackend:
    """Generation through an OpenAI-compatible server.

    Args:
        base_url: the API root, usually ending in `/v1` (e.g. "http://127.0.0.1:8000/v1").
        model: the model name the server knows.
        api: "chat" or "completions" (see the module docstring).
        api_key_env: environment variable holding the API key; unset or empty sends no Authorization header.
        concurrency: requests in flight at once.
        timeout: seconds per request (reading a long reasoning output included).
        max_retries: retries per request after the first try.
        backoff / max_backoff: first and largest wait between retries, in seconds.
        temperature / top_p / seed: sampling (temperature 0 = greedy).
        tokenizer: a tokenizer (or its path) whose chat template renders prompts here: every prompt for
            api="completions", prompts with a prefill for api="chat" (see `prefill_via`).
        prefill_via: "auto", "completions", "continue_final_message" or "thinking_switch" (module docstring).
        extra_body: more JSON fields for every request (e.g. {"top_k": 20}).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: str = "chat",
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        tokenizer: Any = None,
        prefill_via: str = "auto",
        extra_body: dict[str, Any] | None = None,
    ):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        if prefill_via not in PREFILL_MODES:
            raise ValueError(f"prefill_via must be one of {PREFILL_MODES}, got {prefill_via!r}")
        if prefill_via == "completions" and tokenizer is None and api == "chat":
            raise ValueError(
                "prefill_via='completions' renders prompts here: pass tokenizer (the model's path or id)"
            )
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                "max_retries, backoff and max_backoff must be >= 0, "
                f"got {max_retries}, {backoff}, {max_backoff}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sampling = {"temperature": temperature}
        if top_p is not None:
            self.sampling["top_p"] = top_p
        if seed is not None:
            self.sampling["seed"] = seed
        self.extra_body = dict(extra_body or {})
        self.renderer = (
            ChatRenderer(tokenizer)
            if tokenizer is not None
            else (PlainRenderer() if api == "completions" else None)
        )
        self.prefill_via = (
            ("completions" if tokenizer is not None else "refuse") if prefill_via == "auto" else prefill_via
        )
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self._secret = key
        redact_http_logs([key])
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(30.0, timeout)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._closed = threading.Event()

    def __repr__(self) -> str:
        key = "set" if self._secret else "unset"
        return (
            f"OpenAIHTTPBackend(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r}, "
            f"concurrency={self.concurrency}, api_key_env={self.api_key_env!r} ({key}))"
        )

    def _redact(self, text: str) -> str:
        return redact(text, [self._secret])

    # ----- one request -----

    def _body(self, prompt: Prompt, max_new_tokens: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_new_tokens,
            **self.sampling,
            **self.extra_body,
        }
        if "seed" in self.sampling:
            body["seed"] = self.sampling["seed"] + prompt.seed_offset  # n samples of one prompt differ
        if self.api == "completions" or (prompt.prefill and self.prefill_via == "completions"):
            if self.renderer is None:  # __init__ refuses both without a tokenizer for api="chat"
                raise ValueError("rendering a prompt for the completions API needs a tokenizer")
            body["prompt"] = self.renderer.render(prompt)
            return "/completions", body
        messages = list(prompt.messages)
        if prompt.prefill:
            if self.prefill_via == "refuse":
                raise ValueError(
                    "a prompt with a prefill (the direct condition of a reasoning model) cannot go through "
                    "api='chat' as is: pass tokenizer=<the model's path or id> to send it to /completions "
                    "rendered by the model's chat template (right for R1 distills), or set prefill_via to "
                    "'continue_final_message' (templates that keep assistant turns: Qwen2.5, Llama 3) or "
                    "'thinking_switch' (templates with enable_thinking: Qwen3)"
                )
            if self.prefill_via == "thinking_switch":
                kwargs = {**body.get("chat_template_kwargs", {}), "enable_thinking": False}
                body["chat_template_kwargs"] = kwargs
            else:
                messages.append({"role": "assistant", "content": prompt.prefill})
                body.update(continue_final_message=True, add_generation_prompt=False)
        body["messages"] = messages
        return "/chat/completions", body

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.max_retries + 1):
            if self._closed.is_set():
                raise HTTPBackendError("backend closed")
            retry_after = None
            try:
                response = self._client.post(path, json=body)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                last = f"{type(e).__name__}: {self._redact(str(e))}"
            else:
                if response.status_code == 200:
                    return response.json()
                detail = self._redact(response.text[:500])
                last = f"HTTP {response.status_code}: {detail}"
                if response.status_code not in RETRY_STATUS:
                    raise HTTPBackendError(f"POST {self.base_url}{path} failed with {last}")
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            wait_s = (
                retry_after
                if retry_after is not None
                else self.backoff * 2**attempt * random.uniform(0.5, 1.5)
            )
            wait_s = min(wait_s, self.max_backoff)
            logger.warning(
                "POST %s%s: %s; retry %d/%d in %.1f s",
                self.base_url,
                path,
                last,
                attempt + 1,
                self.max_retries,
                wait_s,
            )
            time.sleep(wait_s)
        raise HTTPBackendError(
            f"POST {self.base_url}{path} failed after {self.max_retries + 1} tries; last: {last}"
        )

    def _one(self, prompt: Prompt, max_new_tokens: int) -> Generation:
        path, body = self._body(prompt, max_new_tokens)
        data = self._post(path, body)
        try:
            choice = data["choices"][0]
            if path == "/completions":
                text = choice["text"]
            else:
                message = choice["message"]
                text = message.get("content") or ""
                reasoning = message.get("reasoning_content") or message.get("reasoning")
                if reasoning:
                    closed = bool(text) or choice.get("finish_reason") != "length"
                    text = f"<think>{reasoning}</think>{text}" if closed else f"<think>{reasoning}"
        except (KeyError, IndexError, TypeError) as e:
            raise HTTPBackendError(
                f"unexpected response shape from {self.base_url}{path}: {str(data)[:300]}"
            ) from e
        usage = data.get("usage") or {}
        return Generation(
            text=text, n_tokens=usage.get("completion_tokens"), finish_reason=choice.get("finish_reason")
        )

    # ----- batches -----

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> Iterator[tuple[int, Generation]]:
        """Yield (index, Generation) as requests finish; at most `concurrency` in flight. A failed request
        cancels the pending ones and raises once the running ones have finished."""
        check_generate_args(prompts, max_new_tokens)
        first_prefilled = next((p for p in prompts if p.prefill), None)
        if first_prefilled is not None and self.api == "chat" and self.prefill_via == "refuse":
            self._body(first_prefilled, max_new_tokens)  # raises the explanation before any request is sent
        todo = iter(enumerate(prompts))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            running: dict[Future, int] = {}

            def refill() -> None:
                while len(running) < self.concurrency:
                    item = next(todo, None)
                    if item is None:
                        return
                    running[pool.submit(self._one, item[1], max_new_tokens)] = item[0]

            refill()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    yield index, future.result()
                refill()

    def close(self) -> None:
        self._closed.set()
        self._client.close()


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
