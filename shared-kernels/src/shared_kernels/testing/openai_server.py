"""A real OpenAI-compatible HTTP server on loopback, serving a tiny local model, for tests.

It runs `transformers serve` (transformers[serving]: FastAPI + uvicorn) in a subprocess, pinned to the model
directory you give it, on CPU, offline. Nothing is mocked: requests go through HTTP, the server applies the
tokenizer's chat template, runs `generate` on the model and answers in the OpenAI wire format.

Endpoints of the running server (paths relative to the yielded `base_url`, which ends in `/v1`, the form the
`openai` SDK and most clients expect):

- `POST {base_url}/chat/completions`: `{"model": MODEL, "messages": [...], "max_tokens": N, "temperature": 0}`
  -> `choices[0].message.content`. The chat template always adds the generation prompt; a trailing assistant
  message is NOT continued (vLLM's `continue_final_message` is rejected with 422: unknown fields are errors).
- `POST {base_url}/completions`: `{"model": MODEL, "prompt": "...", "max_tokens": N, "temperature": 0}`
  -> `choices[0].text`. The prompt is used verbatim (render chat templates on the client for prefills).
- `GET {base_url}/models` lists the one model; `GET {root}/health` answers `{"status": "ok"}`.

MODEL must be `str(model_dir)` (the server is pinned to it and answers 400 to any other name; `model_id()`
returns it). `temperature: 0` means greedy decoding, so the answers equal `model.generate(do_sample=False)`
on the same prompt tokens. Without `max_tokens` the server generates up to 1024 tokens.

Usage:

    from shared_kernels.testing.openai_server import openai_compatible_server, save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "tiny")          # or any saved causal LM + tokenizer dir
    with openai_compatible_server(model_dir) as base_url:         # e.g. "http://127.0.0.1:40123/v1"
        r = httpx.post(f"{base_url}/chat/completions", json={
            "model": str(model_dir), "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "temperature": 0})

In pytest, a module- or session-scoped fixture keeps one server (startup takes ~20-100 s on a busy 2-core
CPU, mostly importing torch and transformers):

    @pytest.fixture(scope="module")
    def served(tmp_path_factory):
        model_dir = save_tiny_chat_model(tmp_path_factory.mktemp("served") / "tiny")
        with openai_compatible_server(model_dir) as base_url:
            yield base_url, str(model_dir)

or use the session-scoped `served_tiny_model` below (registered by `shared_kernels.testing.pytest_plugin`, so
tests only name it as an argument): it yields a `ServedModel(base_url, model, model_dir)` and skips when the
serving extra is not installed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class ServedModel:
    """A running server: `base_url` ends in `/v1`; send `model` as the request's model name."""

    base_url: str
    model: str
    model_dir: Path


def serving_available() -> bool:
    """Whether `transformers serve` can run here (transformers with the serving extra: fastapi, uvicorn)."""
    try:
        import fastapi  # noqa: F401
        import transformers  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def model_id(model_dir: str | Path) -> str:
    """The model name requests must carry: the server is pinned to `str(model_dir)`."""
    return str(model_dir)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race with another process is possible,
    which `openai_compatible_server` handles by retrying on another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def save_tiny_chat_model(save_dir: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Train the tiny BPE tokenizer (ChatML template) and save a tiny Llama with it to `save_dir`."""
    from shared_kernels.testing.tiny_lm import tiny_causal_lm, train_tokenizer

    save_dir = Path(save_dir)
    tokenizer = train_tokenizer()
    tiny_causal_lm(save_dir=save_dir, tokenizer=tokenizer, seed=seed, **config_kwargs)
    return save_dir


def _server_command(model_dir: Path, host: str, port: int, extra_args: tuple[str, ...]) -> list[str]:
    # `python -m transformers.cli.transformers` is the `transformers` console script, found through the same
    # interpreter as the tests (no PATH lookup). The positional FORCE_MODEL pins the server to this directory.
    return [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
        "--host", host, "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--log-level", "warning", *extra_args,
    ]  # fmt: skip


def _wait_until_ready(proc: subprocess.Popen, root: str, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"transformers serve exited with code {proc.returncode} before answering; log tail:\n"
                + _tail(log_path)
            )
        try:
            if httpx.get(f"{root}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(
        f"transformers serve did not answer {root}/v1/models within {timeout} s; log tail:\n"
        + _tail(log_path)
    )


def _tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@contextlib.contextmanager
def openai_compatible_server(
    model_dir: str | Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = 300.0,
    extra_args: tuple[str, ...] = (),
    log_path: str | Path | None = None,
) -> Iterator[str]:
    """Start `transformers serve` pinned to `model_dir` on `host:port`, yield its base URL, stop it on exit.

    Args:
        model_dir: a directory with a saved causal LM (safetensors) and its tokenizer (with a chat template
            for `/chat/completions`).
        port: TCP port; None picks a free one (retried up to 3 times if another process takes it first).
        host: listen address; loopback by default so nothing outside the machine can reach it.
        timeout: seconds to wait for `GET /v1/models` to answer before giving up (TimeoutError, with the
            server's log tail).
        extra_args: more `transformers serve` options, e.g. `("--continuous-batching",)`.
        log_path: where the server's stdout/stderr go (a temporary file by default, deleted on exit).

    Yields:
        `http://{host}:{port}/v1`.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir must hold a saved model (config.json), got {str(model_dir)!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    env = {**os.environ, **_OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": ""}
    own_log = log_path is None
    log_file = Path(log_path) if log_path is not None else Path(tempfile.mkstemp(suffix="-serve.log")[1])
    attempts = 1 if port is not None else 3
    try:
        for attempt in range(attempts):
            chosen = port if port is not None else free_port(host)
            root = f"http://{host}:{chosen}"
            with open(log_file, "ab") as log:
                proc = subprocess.Popen(
                    _server_command(model_dir, host, chosen, tuple(extra_args)),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )  # fmt: skip
            try:
                _wait_until_ready(proc, root, timeout, log_file)
            except RuntimeError:
                _stop(proc)
                # Lost the race for the port to another process: try a fresh one.
                if attempt + 1 < attempts and "address already in use" in _tail(log_file).lower():
                    continue
                raise
            except BaseException:
                _stop(proc)
                raise
            try:
                yield f"{root}/v1"
            finally:
                _stop(proc)
            return
    finally:
        if own_log:
            log_file.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def served_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """A tiny Llama (ChatML tokenizer; `save_tiny_chat_model` with its defaults) behind a real `transformers
    serve` on loopback, started once per test session (a start costs 10-100 s of CPU).

    The workspace's pytest plugin registers it, so tests just name it as an argument; do not import it into a
    test module (that would make a second, module-level fixture and a second server).
    """
    if not serving_available():
        pytest.skip("transformers serve needs the serving extra: pip install 'transformers[serving]'")
    model_dir = save_tiny_chat_model(tmp_path_factory.mktemp("served_tiny_model") / "tiny-llama")
    with openai_compatible_server(model_dir) as base_url:
        yield ServedModel(base_url=base_url, model=model_id(model_dir), model_dir=model_dir)
