"""What every inference backend provides: `generate(prompts, max_new_tokens)` yielding finished outputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from idiomreason.prompts import Prompt


@dataclass(frozen=True)
class Generation:
    """One model output: the generated text (without the prompt or prefill), its length in tokens when the
    backend knows it, and why generation stopped ("stop", "length", ...)."""

    text: str
    n_tokens: int | None = None
    finish_reason: str | None = None


class Backend(Protocol):
    """Batched text generation.

    `generate` yields `(index into prompts, Generation)` as outputs finish, in any order, so callers can
    store each one at once (an interrupted run then loses only unfinished work).
    """

    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int
    ) -> Iterator[tuple[int, Generation]]: ...

    def close(self) -> None: ...


def check_generate_args(prompts: Sequence[Prompt], max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompts[{i}] must be a Prompt, got {type(prompt).__name__}")


def check_bool(value: object, name: str) -> bool:
    """`value` if it is a real bool; a string such as "false" (truthy in Python) is an error, so that a
    quoted YAML value can never switch on e.g. `trust_remote_code`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false (a boolean), got {value!r} ({type(value).__name__})")
    return value
