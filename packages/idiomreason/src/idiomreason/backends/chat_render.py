"""Prompt -> the exact text a completion model sees, through the tokenizer's chat template.

transformers is imported lazily (the `hf` extra); tokenizers without a chat template (base models) get the
plain "User: ... / Assistant: ..." rendering.
"""

from __future__ import annotations

from typing import Any

from idiomreason.backends.base import check_bool
from idiomreason.prompts import Prompt, join_prefill, render_plain


class ChatRenderer:
    """Renders `Prompt`s with a tokenizer (an instance, or a path / hub id loaded with AutoTokenizer)."""

    def __init__(self, tokenizer: Any, trust_remote_code: bool = False):
        check_bool(trust_remote_code, "trust_remote_code")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, prompt: Prompt) -> str:
        if not self.uses_chat_template:
            return render_plain(prompt.messages, prompt.prefill)
        text = self.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        return join_prefill(text, prompt.prefill)

    def token_ids(self, text: str) -> list[int]:
        # A chat template writes its own BOS; plain text needs the tokenizer's.
        return list(self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"])


class PlainRenderer:
    """Rendering without a tokenizer (HTTP completions against a server whose template is unknown here)."""

    uses_chat_template = False

    def render(self, prompt: Prompt) -> str:
        return render_plain(prompt.messages, prompt.prefill)
