"""A local transformers model as teacher or student: batched generation and label-token probabilities.

Label probabilities: after the explanation, the context is cut right after `Relevance Label:` (appended when
the model did not write it) and the model scores each continuation " 0", " 1", " 2" (summed token log-probs,
tokenised separately from the context as lm-eval-harness does). Normalised over the labels they give
p(label); the reranking score is E[label] = sum_l l * p(l). When every continuation is one token, one forward
pass per pair reads all three from the same logits; otherwise each continuation is scored in its own row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from rerankdistill.labels import LABEL_PREFIX, STOP, truncate_at_stop
from rerankdistill.teacher import Completion


def load_causal_lm(
    path: str | os.PathLike, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False
):
    """(model, tokenizer) from a local directory; a pad token is set to eos when the tokenizer has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # transformers wraps PreTrainedModel.to with functools.wraps, whose stub drops the bound self
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


class TransformersBackend:
    """Batched chat generation with a local model.

    Args:
        model, tokenizer: a causal LM and its tokenizer (with a chat template).
        name: teacher/student id written into records (defaults to the model's name_or_path).
        max_new_tokens: generation budget per answer.
        temperature: 0 = greedy; > 0 samples.
        batch_size: prompts per `generate` call (1 disables batching).
        stop: generation stops at this string (InteRank: " ##").
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        batch_size: int = 8,
        stop: str = STOP,
        label_prefix: str = LABEL_PREFIX,
    ):
        if batch_size < 1 or max_new_tokens < 1 or temperature < 0:
            raise ValueError(
                f"need batch_size >= 1, max_new_tokens >= 1, temperature >= 0; got {batch_size}, "
                f"{max_new_tokens}, {temperature}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.name = name or str(getattr(model.config, "name_or_path", "local-model"))
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.stop, self.label_prefix = stop, label_prefix
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs a pad token for batched generation")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate_texts(self, prompts: Sequence[str], num_return_sequences: int = 1) -> list[Completion]:
        """Continue each rendered prompt: len(prompts) * num_return_sequences completions, grouped by
        prompt."""
        out: list[Completion] = []
        tok = self.tokenizer
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            side = tok.padding_side
            tok.padding_side = "left"  # generation appends on the right: pad on the left
            try:
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            finally:
                tok.padding_side = side
            sample = self.temperature > 0
            gen = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=sample,
                temperature=self.temperature if sample else None,
                top_p=None,
                top_k=None,
                num_return_sequences=num_return_sequences,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                stop_strings=[self.stop] if self.stop else None,
                tokenizer=tok,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            prompt_lens = enc["attention_mask"].sum(1).repeat_interleave(num_return_sequences)
            for row, plen in zip(new, prompt_lens.tolist()):
                ends = ((row == tok.eos_token_id) | (row == tok.pad_token_id)).nonzero()
                n = int(ends[0]) if len(ends) else len(row)
                text = truncate_at_stop(tok.decode(row[:n], skip_special_tokens=True), self.stop)
                out.append(Completion(text, int(plen), n))
        return out

    def complete_batch(self, batch: list[list[dict[str, str]]]) -> list[Completion]:
        return self.generate_texts([self.render(m) for m in batch])

    @torch.no_grad()
    def label_probabilities(
        self, prompts: Sequence[str], explanations: Sequence[str], labels: Sequence[int] = (0, 1, 2)
    ) -> torch.Tensor:
        """p(label | prompt, explanation up to the label prefix) for each pair: (N, len(labels)) float32."""
        if len(prompts) != len(explanations):
            raise ValueError(
                f"prompts and explanations differ in length: {len(prompts)} vs {len(explanations)}"
            )
        tok = self.tokenizer
        conts = [tok(f" {label}", add_special_tokens=False)["input_ids"] for label in labels]
        contexts = [
            tok(p + self._label_context(e), add_special_tokens=False)["input_ids"]
            for p, e in zip(prompts, explanations)
        ]
        single = all(len(c) == 1 for c in conts)
        rows: list[list[int]] = []
        for ctx in contexts:
            rows += [ctx] if single else [ctx + c for c in conts]
        logps = torch.empty(len(rows), len(labels) if single else 1)  # (rows, L) or (N * L, 1)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            logprobs = logits.log_softmax(-1)  # (B, T, V)
            for i, r in enumerate(chunk):
                if single:
                    last = logprobs[i, len(r) - 1]
                    logps[start + i] = last[[c[0] for c in conts]].cpu()
                else:
                    n = len(r)
                    c = conts[(start + i) % len(conts)]
                    positions = torch.arange(n - len(c) - 1, n - 1, device=logprobs.device)
                    logps[start + i, 0] = (
                        logprobs[i, positions, torch.tensor(c, device=logprobs.device)].sum().cpu()
                    )
        scores = logps if single else logps.view(len(contexts), len(labels))
        return scores.softmax(-1)

    def _label_context(self, explanation: str) -> str:
        """The generated text cut just after the last label prefix (appended when missing)."""
        from rerankdistill.train.forced_label import label_context

        return label_context(explanation, self.label_prefix)
