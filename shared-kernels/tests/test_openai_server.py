"""The loopback OpenAI-compatible server answers like the model it serves, and goes away on exit."""

from __future__ import annotations

import httpx
import pytest
import torch

from shared_kernels.testing.openai_server import (
    openai_compatible_server,
    serving_available,
)

pytestmark = pytest.mark.skipif(not serving_available(), reason="needs transformers[serving]")


def _greedy(model_dir, input_ids: list[int], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([input_ids]), attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False,
    )  # fmt: skip
    return tok.decode(out[0, len(input_ids) :], skip_special_tokens=True)


def test_models_endpoint_lists_the_pinned_model(served_tiny_model):
    r = httpx.get(f"{served_tiny_model.base_url}/models", timeout=30)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [served_tiny_model.model]


def test_chat_completion_is_greedy_generate_on_the_chat_template(served_tiny_model):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Is 'spill the beans' idiomatic here?"}]
    body = {"model": served_tiny_model.model, "messages": messages, "max_tokens": 9, "temperature": 0}
    r = httpx.post(f"{served_tiny_model.base_url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["message"]["content"]
    tok = AutoTokenizer.from_pretrained(served_tiny_model.model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == _greedy(served_tiny_model.model_dir, list(ids), 9)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_completion_uses_the_prompt_verbatim(served_tiny_model):
    from transformers import AutoTokenizer

    prompt = "<|im_start|>user\nliteral or idiomatic?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>"
    body = {"model": served_tiny_model.model, "prompt": prompt, "max_tokens": 7, "temperature": 0}
    r = httpx.post(f"{served_tiny_model.base_url}/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ids = AutoTokenizer.from_pretrained(served_tiny_model.model_dir)(prompt)["input_ids"]
    assert r.json()["choices"][0]["text"] == _greedy(served_tiny_model.model_dir, ids, 7)


def test_other_model_names_are_refused(served_tiny_model):
    body = {"model": "someone/else", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = httpx.post(f"{served_tiny_model.base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400


def _fake_server(tmp_path, monkeypatch, fail_first_with: str | None = None):
    """Swap `transformers serve` for a stdlib file server that answers GET /v1/models (fast, still HTTP)."""
    import sys

    from shared_kernels.testing import openai_server

    (tmp_path / "www" / "v1").mkdir(parents=True)
    (tmp_path / "www" / "v1" / "models").write_text('{"data": []}')
    calls = []

    def command(model_dir, host, port, extra_args):
        calls.append(port)
        if fail_first_with is not None and len(calls) == 1:
            return [sys.executable, "-c", f"import sys; print({fail_first_with!r}); sys.exit(1)"]
        return [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            host,
            "--directory",
            str(tmp_path / "www"),
        ]

    monkeypatch.setattr(openai_server, "_server_command", command)
    (tmp_path / "config.json").write_text("{}")
    return calls


def test_server_stops_on_exit(tmp_path, monkeypatch):
    _fake_server(tmp_path, monkeypatch)
    with openai_compatible_server(tmp_path, timeout=60) as base_url:
        assert httpx.get(f"{base_url}/models", timeout=10).status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base_url}/models", timeout=5)


def test_a_port_taken_meanwhile_is_retried_on_another(tmp_path, monkeypatch):
    calls = _fake_server(tmp_path, monkeypatch, fail_first_with="OSError: [Errno 98] Address already in use")
    with openai_compatible_server(tmp_path, timeout=60) as base_url:
        assert base_url.endswith(f":{calls[-1]}/v1")
    assert len(calls) == 2


def test_a_server_that_exits_reports_its_log(tmp_path, monkeypatch):
    _fake_server(tmp_path, monkeypatch, fail_first_with="boom: config is broken")
    with pytest.raises(RuntimeError, match="(?s)exited with code 1.*boom: config is broken"):
        with openai_compatible_server(tmp_path, timeout=60):
            pass


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_dir"):
        with openai_compatible_server(tmp_path):
            pass
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="timeout"):
        with openai_compatible_server(tmp_path, timeout=0):
            pass
