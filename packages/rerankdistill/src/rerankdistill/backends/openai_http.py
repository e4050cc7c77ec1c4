"""Any OpenAI-compatible chat server (vLLM, TGI, transformers serve, hosted APIs) as an async teacher.

Retries: transport errors, timeouts, HTTP 408/409/429 and 5xx are retried with exponential backoff and
jitter (honouring `Retry-After`), up to `max_retries`; other 4xx answers raise at once (they will not get
better). The API key is read from an environment variable, sent only in the Authorization header, and never
printed: `repr` hides it and every error message passes through `shared_kernels.redaction.redact` (a server
that echoes the request headers in its error body leaks nothing).
"""

from __future__ import annotations

import asyncio
import os
import random

import httpx

from rerankdistill.teacher import Completion
from shared_kernels.errors import UserError
from shared_kernels.redaction import env_secrets, redact, redact_http_logs

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class TeacherRequestError(UserError, RuntimeError):
    """A request that failed for good (non-retryable status, or retries exhausted); its message is
    redacted."""


class OpenAIChatBackend:
    """Async client for `POST {base_url}/chat/completions`.

    Args:
        base_url: e.g. "http://127.0.0.1:8000/v1".
        model: the model name the server expects; also the teacher id unless `name` is given.
        api_key_env: environment variable holding the key (none sent when unset).
        temperature, max_tokens: sampling settings (InteRank's teacher: temperature 0).
        stop: stop strings sent to the server (None: omit the field for servers that reject it); the caller
            also cuts at the prompt's stop marker.
        timeout: seconds per request; max_retries: attempts after the first; backoff: first delay in seconds.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        name: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        stop: list[str] | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or timeout <= 0:
            raise ValueError(f"max_retries must be >= 0 and timeout > 0, got {max_retries}, {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or model
        self.temperature, self.max_tokens, self.stop = temperature, max_tokens, stop
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._api_key_env = api_key_env
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0
        self.retries = 0

    def __repr__(self) -> str:
        return (
            f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"key=<from ${self._api_key_env}>)"
        )

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self._api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _redact(self, text: str) -> str:
        return redact(text, env_secrets(self._api_key_env))

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            redact_http_logs(env_secrets(self._api_key_env))
            self._client = httpx.AsyncClient(
                timeout=self.timeout, transport=self._transport, headers=self._headers()
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def acomplete(self, messages: list[dict[str, str]]) -> Completion:
        body: dict = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.stop:
            body["stop"] = self.stop
        client = self._get_client()
        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2**attempt * (0.5 + random.random())
            try:
                response = await client.post(f"{self.base_url}/chat/completions", json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                if attempt == self.max_retries:
                    raise TeacherRequestError(
                        self._redact(f"{self.base_url}: {type(e).__name__} after {attempt + 1} tries: {e}")
                    ) from None
            else:
                if response.status_code == 200:
                    return self._parse(response)
                if response.status_code not in RETRYABLE_STATUS or attempt == self.max_retries:
                    raise TeacherRequestError(
                        self._redact(
                            f"{self.base_url}/chat/completions answered {response.status_code} "
                            f"after {attempt + 1} tries: {response.text[:300]}"
                        )
                    )
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            self.retries += 1
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _parse(self, response: httpx.Response) -> Completion:
        data = response.json()
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TeacherRequestError(self._redact(f"malformed chat completion: {str(data)[:300]}")) from None
        usage = data.get("usage") or {}
        c = Completion(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        self.requests += 1
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        return c
