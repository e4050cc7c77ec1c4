"""Reward-weighted fine-tuning, as released with InteRank (arXiv 2504.03947, Sec. 3.3).

For each (query, document) pair: sample k explanations from the current student at temperature 1, add the
teacher's answer when given, score every candidate with a reward function (or reward model), min-max
normalise the rewards within the pair's group, keep candidates with normalised reward >= threshold, and
train with loss = r^power * NLL (power 3), optionally multiplied by the pair's misclassification rate (the
share of the k samples whose label differs from the reference), which focuses training on hard pairs.

Group normalisation: r_norm = (r - min) / (max - min). A degenerate group (all rewards equal) carries no
preference: it normalises to 1 when that common reward is > 0 (all candidates equally good) and to 0 when it
is 0 (all wrong).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance
from rerankdistill.train.common import LoopConfig, LoraSpec, apply_lora, save_model, train_loop
from rerankdistill.train.sft import DistillExample, TrainResult, tokenize_examples

RewardFn = Callable[[str, int], float]


def label_agreement_reward(text: str, reference: int) -> float:
    """1 - |label - reference| / 2 for a parsed label in 0..2; 0 when the label cannot be parsed."""
    label = parse_relevance(text)
    return 0.0 if label is None else 1.0 - abs(label - reference) / 2.0


def group_weights(
    rewards: Sequence[float],
    threshold: float = 0.85,
    power: float = 3.0,
    misclassification_rate: float | None = None,
) -> list[float]:
    """Loss weights for one pair's candidates: min-max normalise, drop those below `threshold`, raise to
    `power`, optionally scale by the misclassification rate (see the module docstring).

    Args:
        rewards: (k,) raw rewards of the group's candidates.
        threshold: keep candidates with normalised reward >= threshold (InteRank: 0.85).
        power: exponent on the normalised reward (InteRank: 3).
        misclassification_rate: in [0, 1] or None.
    """
    if not rewards:
        return []
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if misclassification_rate is not None and not 0 <= misclassification_rate <= 1:
        raise ValueError(f"misclassification_rate must be in [0, 1], got {misclassification_rate}")
    lo, hi = min(rewards), max(rewards)
    if hi == lo:
        normed = [1.0 if hi > 0 else 0.0] * len(rewards)
    else:
        normed = [(r - lo) / (hi - lo) for r in rewards]
    scale = 1.0 if misclassification_rate is None else misclassification_rate
    return [scale * r**power if r >= threshold and r > 0 else 0.0 for r in normed]


@dataclass(frozen=True)
class RefinePair:
    """A pair to refine on: texts, the reference label (teacher's or judged), optionally the teacher's
    answer."""

    query: str
    document: str
    reference: int
    teacher_text: str | None = None


def sample_candidates(
    model,
    tokenizer,
    pairs: Sequence[RefinePair],
    k: int,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prompt: RelevancePrompt = INTERANK_PROMPT,
    seed: int = 0,
) -> list[list[str]]:
    """k sampled answers per pair from the current model (grouped per pair, stop marker cut); `batch_size`
    prompts (each with k samples) per generate call."""
    import torch

    from rerankdistill.backends.hf import TransformersBackend

    torch.manual_seed(seed)
    backend = TransformersBackend(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        stop=prompt.stop,
    )
    was_training = model.training
    model.eval()
    prompts = [backend.render(prompt.messages(p.query, p.document)) for p in pairs]
    texts = [c.text for c in backend.generate_texts(prompts, num_return_sequences=k)]
    model.train(was_training)
    return [texts[i * k : (i + 1) * k] for i in range(len(pairs))]


def reward_weighted_finetune(
    model,
    tokenizer,
    pairs: Sequence[RefinePair],
    output_dir: str | os.PathLike,
    k: int = 8,
    reward_fn: RewardFn = label_agreement_reward,
    threshold: float = 0.85,
    power: float = 3.0,
    weight_by_misclassification: bool = False,
    include_teacher: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    loop: LoopConfig | None = None,
    lora: LoraSpec | None = None,
    completion_only: bool = True,
    max_length: int | None = 2048,
    prompt: RelevancePrompt = INTERANK_PROMPT,
    progress: bool = True,
    reward_model=None,
) -> TrainResult:
    """One round of InteRank's reward-weighted fine-tuning of `model` (see the module docstring).

    Args:
        pairs: `RefinePair`s with reference labels (and the teacher's answer when `include_teacher`).
        k: samples per pair (InteRank: 8) at `temperature` (1.0).
        reward_fn: reward(text, reference_label) -> float (default: label agreement).
        reward_model: a `reward_model.RubricRewardModel` (judge backend + rubric) used instead of reward_fn:
            it sees the query and document too, as InteRank's released refinement does.
        threshold, power, weight_by_misclassification: see `group_weights`.
        loop, lora, completion_only, max_length: as in `sft`.

    Returns:
        The trained model, its saved directory and stats: candidates, kept, mean kept weight, losses.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    loop = loop or LoopConfig()
    samples = sample_candidates(
        model, tokenizer, pairs, k, temperature, max_new_tokens, prompt=prompt, seed=loop.seed
    )
    examples: list[DistillExample] = []
    weights: list[float] = []
    candidates = 0
    for pair, group in zip(pairs, samples, strict=True):
        texts = list(group) + ([pair.teacher_text] if include_teacher and pair.teacher_text else [])
        rewards = (
            reward_model.score([(pair.query, pair.document, t, pair.reference) for t in texts])
            if reward_model is not None
            else [reward_fn(t, pair.reference) for t in texts]
        )
        miss = None
        if weight_by_misclassification:
            miss = sum(parse_relevance(t) != pair.reference for t in group) / len(group)
        candidates += len(texts)
        for text, w in zip(texts, group_weights(rewards, threshold, power, miss), strict=True):
            if w > 0:
                examples.append(DistillExample(pair.query, pair.document, text))
                weights.append(w)
    stats: dict[str, float] = {
        "candidates": float(candidates),
        "kept": float(len(examples)),
        "mean_weight": sum(weights) / len(weights) if weights else 0.0,
    }
    if not examples:
        raise ValueError(
            f"no candidate reached the threshold {threshold} ({candidates} candidates): nothing to train on"
        )
    encoded, too_long = tokenize_examples(tokenizer, examples, prompt, completion_only, max_length, weights)
    if lora is not None:
        model = apply_lora(model, lora)
    stats.update(train_loop(model, encoded, tokenizer.pad_token_id, output_dir, loop, progress=progress))
    stats["too_long"] = float(too_long)
    return TrainResult(model, save_model(model, tokenizer, output_dir), stats)
