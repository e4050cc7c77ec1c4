"""transformers backend: batched `generate` with left padding, in bf16/fp32 or 4-bit (bitsandbytes NF4).

The only module of the package, with `vllm_offline.py`, that imports torch and transformers (lazily, when a
backend is built), so the rest stays importable without the hf extra.

Prompts are rendered by the tokenizer's chat template (plain text for base models without one), sorted by
token length so each batch pads little, generated `batch_size` at a time, and yielded per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from idiomreason.backends.base import Generation, check_bool, check_generate_args
from idiomreason.backends.chat_render import ChatRenderer
from idiomreason.prompts import Prompt

DTYPES = ("auto", "bfloat16", "float16", "float32")


class TransformersBackend:
    """Local generation with a transformers causal LM.

    Args:
        model: a path or hub id, or an already loaded model (e.g. quantized by the caller); then pass
            `tokenizer` too.
        tokenizer: a tokenizer or its path (default: the model's).
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16" or "float32".
        quantization: None, "4bit" (NF4, bf16 compute, double quantization) or "8bit", via bitsandbytes.
        device: "cuda", "cuda:1", "cpu"; default CUDA when available. `device_map` overrides it
            (e.g. "auto" to shard a 70B model over several GPUs).
        batch_size: prompts per `generate` call.
        temperature / top_p / seed: sampling (temperature 0 = greedy; the seed is set before each batch).
        trust_remote_code: passed to from_pretrained (off by default).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        device: str | None = None,
        device_map: Any = None,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        check_bool(trust_remote_code, "trust_remote_code")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, str):
            torch_dtype = (
                (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
                if dtype == "auto" else getattr(torch, dtype)
            )  # fmt: skip
            kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            if quantization is not None:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = (
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
                    if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
                )  # fmt: skip
            kwargs["device_map"] = device_map if device_map is not None else {"": self.device}
            tokenizer = tokenizer if tokenizer is not None else model
            model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        elif tokenizer is None:
            raise ValueError("tokenizer must be given when model is a loaded model, not a path")
        self.model = model.eval()
        self.renderer = ChatRenderer(tokenizer, trust_remote_code=trust_remote_code)
        self.tokenizer = self.renderer.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # Llama-style tokenizers have no pad token
        self.batch_size = batch_size
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def _generate_batch(self, ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
        import torch

        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # (B, T), left padded
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])  # (B, T)
        device = next(self.model.parameters()).device
        sampling: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            sampling["temperature"] = self.temperature
            if self.top_p is not None:
                sampling["top_p"] = self.top_p
        else:
            sampling.update(temperature=None, top_p=None, top_k=None)  # silence sampling-flag warnings
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling,
            )  # fmt: skip
        new = out[:, width:].tolist()  # (B, <= max_new_tokens)
        results = []
        for row in new:
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row if stop is None else row[: stop + 1]
            results.append(Generation(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True), n_tokens=len(tokens),
                finish_reason="stop" if stop is not None else "length",
            ))  # fmt: skip
        return results

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> Iterator[tuple[int, Generation]]:
        import torch

        check_generate_args(prompts, max_new_tokens)
        if self.temperature > 0:
            # One seeded random stream for the whole call: repeated prompts (n samples) draw different tokens
            # wherever they land in the batches, and the same call reproduces the same samples.
            torch.manual_seed(self.seed)
        ids = [self.renderer.token_ids(self.renderer.render(p)) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: OOM shows up at once
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            yield from zip(chunk, self._generate_batch([ids[i] for i in chunk], max_new_tokens))

    def loglikelihood(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[list[float]]:
        """Sum of token log-probabilities of each continuation after each rendered prompt (lm-evaluation-
        harness convention: context and continuation tokenised separately and concatenated).

        Returns: (len(prompts), len(continuations)) nested lists of floats.
        """
        import torch

        device = next(self.model.parameters()).device
        out = []
        for prompt in prompts:
            context = self.renderer.token_ids(self.renderer.render(prompt))
            row = []
            for text in continuations:
                cont = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if not cont:
                    raise ValueError(f"continuation {text!r} has no tokens")
                ids = torch.tensor([context + cont], device=device)  # (1, T)
                with torch.inference_mode():
                    logits = self.model(input_ids=ids).logits[0, len(context) - 1 : -1].float()  # (C, V)
                logprobs = torch.log_softmax(logits, dim=-1)
                row.append(float(logprobs.gather(1, torch.tensor(cont, device=device)[:, None]).sum()))
            out.append(row)
        return out

    def close(self) -> None:
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
