"""How a model decodes: sampling settings from its model card where the card gives them, n samples per
prompt with a majority vote, and the fingerprint of everything that can change an output.

Model cards followed (`MODEL_CARD_DECODING`):
- DeepSeek-R1-Distill-* (Qwen 1.5B/7B/14B/32B, Llama 8B/70B): "set the temperature within 0.5-0.7 (0.6 is
  recommended) ... top-p 0.95" (greedy decoding makes them repeat themselves and loop).
Every other model decodes greedily unless the config says otherwise (base models have no card setting;
lm-evaluation-harness also scores them greedily).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from idiomreason.prompts import Prompt

MODEL_CARD_DECODING: tuple[tuple[re.Pattern[str], dict[str, float], str], ...] = (
    (re.compile(r"deepseek-r1-distill", re.IGNORECASE), {"temperature": 0.6, "top_p": 0.95},
     "DeepSeek-R1-Distill model card (temperature 0.6, top-p 0.95)"),
)  # fmt: skip
DECODING_KEYS = ("temperature", "top_p", "n_samples", "seed")
SAMPLING_OPTION_KEYS = ("temperature", "top_p", "seed")


@dataclass(frozen=True)
class Decoding:
    """Sampling of one model. `temperature` 0 = greedy (then `n_samples` must be 1); `source` says where
    the settings came from (kept in records and tables, not in the cache key)."""

    temperature: float = 0.0
    top_p: float | None = None
    n_samples: int = 1
    seed: int = 0
    source: str = "greedy (no model-card setting)"

    def __post_init__(self) -> None:
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"decoding.temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (
            isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"decoding.top_p must be in (0, 1] or null, got {self.top_p!r}")
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ValueError(f"decoding.n_samples must be an int >= 1, got {self.n_samples!r}")
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(
                f"decoding.n_samples={self.n_samples} needs sampling (temperature > 0): greedy "
                "samples would all be the same"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"decoding.seed must be an int, got {self.seed!r}")

    def backend_options(self) -> dict[str, Any]:
        """The sampling keyword arguments every backend takes."""
        options: dict[str, Any] = {"temperature": float(self.temperature), "seed": self.seed}
        if self.top_p is not None:
            options["top_p"] = float(self.top_p)
        return options

    def settings(self) -> dict[str, Any]:
        """What changes outputs (no `source`)."""
        return {k: v for k, v in asdict(self).items() if k != "source"}


def resolve_decoding(model_ref: str, user: dict[str, Any] | None) -> Decoding:
    """The decoding of a model: `user` settings (keys `DECODING_KEYS`) over the model card's, over greedy.

    Args:
        model_ref: the model's name or path (matched against `MODEL_CARD_DECODING`).
        user: the config's `decoding` mapping, or None.
    """
    user = dict(user or {})
    unknown = set(user) - set(DECODING_KEYS)
    if unknown:
        raise ValueError(f"decoding: unknown keys {sorted(unknown)} (known: {list(DECODING_KEYS)})")
    base: dict[str, Any] = {}
    card = "greedy (no model-card setting)"
    for pattern, settings, text in MODEL_CARD_DECODING:
        if pattern.search(model_ref):
            base, card = dict(settings), text
            break
    source = f"config {user} over {card}" if user else card
    return Decoding(**{**base, **user}, source=source)


def majority_vote(labels: Sequence[str | None]) -> str | None:
    """The most frequent parsed label of n samples (unparseable ones do not vote); a tie, or no parsed
    label at all, is None (counted as unparseable, never a guess)."""
    counts = Counter(label for label in labels if label is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-able data (sorted keys)."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_fingerprint(prompt: Prompt) -> str:
    """Hash of the prompt as sent: every message and the prefill (so template wording, shots and the
    definition in it all change it)."""
    return fingerprint({"messages": prompt.messages, "prefill": prompt.prefill})
