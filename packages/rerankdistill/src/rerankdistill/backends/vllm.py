"""vLLM offline engine as a batch teacher/student (optional: `pip install vllm`, a GPU machine)."""

from __future__ import annotations

from rerankdistill.labels import STOP
from rerankdistill.teacher import Completion


class VLLMBackend:
    """Batched chat generation with `vllm.LLM.chat`.

    Args:
        model: a local model directory (or a name vLLM can load offline).
        name: teacher id (default: model).
        max_tokens, temperature: sampling settings; generation stops at `stop`.
        llm_kwargs: passed to `vllm.LLM` (e.g. tensor_parallel_size, gpu_memory_utilization).
    """

    def __init__(
        self,
        model: str,
        name: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        stop: str = STOP,
        trust_remote_code: bool = False,
        **llm_kwargs,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install vllm") from e
        self.name = name or model
        self.llm = LLM(model=model, trust_remote_code=trust_remote_code, **llm_kwargs)
        self.params = SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=[stop])

    def complete_batch(self, batch: list[list[dict[str, str]]]) -> list[Completion]:
        outputs = self.llm.chat(batch, self.params, use_tqdm=False)
        return [
            Completion(o.outputs[0].text, len(o.prompt_token_ids or []), len(o.outputs[0].token_ids))
            for o in outputs
        ]
