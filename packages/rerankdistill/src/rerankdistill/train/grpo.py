"""GRPO refinement with TRL's GRPOTrainer: the student samples a group of answers per prompt; rewards for
label agreement and output format give group-relative advantages (the natural RL extension of InteRank's
reward-weighted fine-tuning, REFERENCE section 5).

Rewards (TRL reward-function signature: completions plus dataset columns as keyword lists):
  * `label_reward`: 1 - |parsed - label| / 2, 0 when unparseable;
  * `format_reward`: 1 when the answer is a non-empty explanation followed by `Relevance Label: <0|1|2>`
    (optionally ` ##`) and nothing after it, else 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance
from rerankdistill.train.common import LoraSpec, apply_lora
from rerankdistill.train.rwft import RefinePair
from rerankdistill.train.sft import TrainResult

_FORMAT = re.compile(r"^\s*\S.*?\S\s+Relevance Label:\s*[012]\s*(##)?\s*$", re.S)


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")  # conversational


def label_reward(completions: Sequence, label: Sequence[int], **_: object) -> list[float]:
    """Label agreement per completion: 1 - |parsed - label| / 2; 0 when no label can be parsed."""
    out = []
    for c, ref in zip(completions, label, strict=True):
        got = parse_relevance(_text(c))
        out.append(0.0 if got is None else 1.0 - abs(got - int(ref)) / 2.0)
    return out


def format_reward(completions: Sequence, **_: object) -> list[float]:
    """1.0 for `<explanation> Relevance Label: n [##]` and nothing else, 0.0 otherwise."""
    return [1.0 if _FORMAT.match(_text(c)) else 0.0 for c in completions]


def grpo(model, tokenizer, pairs: Sequence[RefinePair], output_dir: str | os.PathLike, max_steps: int = 100,
         num_generations: int = 8, max_completion_length: int = 256, learning_rate: float = 1e-6,
         beta: float = 0.0, temperature: float = 1.0, batch_size: int | None = None,
         reward_funcs: Sequence[Callable] | None = None, reward_weights: Sequence[float] | None = None,
         lora: LoraSpec | None = None, seed: int = 0, prompt: RelevancePrompt = INTERANK_PROMPT,
         progress: bool = True) -> TrainResult:
    """GRPO on (query, document, reference label) prompts with TRL's GRPOTrainer.

    Args:
        model, tokenizer: the student (causal LM + chat-template tokenizer).
        pairs: `RefinePair`s; `reference` is the label the reward compares with.
        max_steps, learning_rate, beta (KL to the reference model; 0 skips it), temperature: GRPO settings.
        num_generations: group size per prompt; `batch_size` (default num_generations) must be a multiple.
        reward_funcs, reward_weights: default [label_reward, format_reward] with weights [1.0, 0.5].
        lora: train LoRA adapters instead of all weights.
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if not pairs:
        raise ValueError("pairs is empty")
    batch_size = batch_size or num_generations
    if batch_size % num_generations:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_generations ({num_generations})")
    funcs = list(reward_funcs) if reward_funcs is not None else [label_reward, format_reward]
    weights = list(reward_weights) if reward_weights is not None else ([1.0, 0.5] if reward_funcs is None else None)
    data = Dataset.from_list([{"prompt": prompt.messages(p.query, p.document), "label": int(p.reference)}
                              for p in pairs])
    import torch

    args = GRPOConfig(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate, beta=beta,
        num_generations=num_generations, per_device_train_batch_size=batch_size,
        max_completion_length=max_completion_length, temperature=temperature, reward_weights=weights,
        logging_steps=1, save_strategy="no", report_to="none", seed=seed, use_cpu=not torch.cuda.is_available(),
        bf16=False, disable_tqdm=not progress,  # ends at EOS: SFT taught "... ##<eos>"
    )
    if lora is not None:
        model = apply_lora(model, lora)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    stats = {"steps": float(trainer.state.global_step),
             "first_reward": float(history[0]["reward"]) if history else float("nan"),
             "last_reward": float(history[-1]["reward"]) if history else float("nan")}
    final = Path(output_dir) / "final"
    trainer.model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    return TrainResult(trainer.model, final, stats)
