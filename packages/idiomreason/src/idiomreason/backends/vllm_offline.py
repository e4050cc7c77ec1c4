"""vLLM offline backend (`vllm.LLM`), used when vLLM is installed (it is not a dependency of this package).

Prompts are rendered and tokenised here with the model's tokenizer (chat template + prefill, no second
BOS) and passed as token ids; vLLM schedules them with continuous batching. Outputs are yielded per chunk
of `chunk_size` prompts so a long run stores its progress as it goes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from idiomreason.backends.base import Generation, check_bool, check_generate_args
from idiomreason.backends.chat_render import ChatRenderer
from idiomreason.prompts import Prompt


class VLLMBackend:
    """Args: model (path or hub id); dtype; quantization (vLLM's names, e.g. "bitsandbytes", "awq");
    tensor_parallel_size; temperature / top_p / seed; chunk_size (prompts per `LLM.generate` call);
    llm_kwargs: more `vllm.LLM` arguments (max_model_len, gpu_memory_utilization, ...)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        tensor_parallel_size: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        chunk_size: int = 256,
        trust_remote_code: bool = False,
        **llm_kwargs: Any,
    ):
        check_bool(trust_remote_code, "trust_remote_code")
        try:
            import vllm
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install vllm (GPU machines only)") from e
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model, dtype=dtype, quantization=quantization, tensor_parallel_size=tensor_parallel_size,
            seed=seed, trust_remote_code=trust_remote_code, **llm_kwargs,
        )  # fmt: skip
        self.renderer = ChatRenderer(self.llm.get_tokenizer())
        self.sampling = {"temperature": temperature, "top_p": top_p, "seed": seed}
        self.chunk_size = chunk_size

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> Iterator[tuple[int, Generation]]:
        check_generate_args(prompts, max_new_tokens)
        for start in range(0, len(prompts), self.chunk_size):
            chunk = prompts[start : start + self.chunk_size]
            inputs = [{"prompt_token_ids": self.renderer.token_ids(self.renderer.render(p))} for p in chunk]
            params = [self._vllm.SamplingParams(max_tokens=max_new_tokens, **{
                **self.sampling, "seed": self.sampling["seed"] + p.seed_offset}) for p in chunk]  # fmt: skip
            for offset, output in enumerate(self.llm.generate(inputs, params, use_tqdm=False)):
                completion = output.outputs[0]
                yield (
                    start + offset,
                    Generation(
                        text=completion.text,
                        n_tokens=len(completion.token_ids),
                        finish_reason=completion.finish_reason,
                    ),
                )

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()
