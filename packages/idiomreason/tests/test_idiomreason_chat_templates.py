"""The direct condition is right for each chat template (issue 19, item 1): the R1-distill template drops an
assistant turn's text up to `</think>`, so the empty think block cannot be sent as a chat message to continue;
it goes to /completions rendered here by the model's own template. Checked with the R1-distill, Qwen2.5 and
Llama 3 template texts, and end to end through a real OpenAI-compatible server (transformers serve)."""

from __future__ import annotations

import copy

import pytest

from idiomreason.backends.chat_render import ChatRenderer
from idiomreason.backends.http import HTTPBackendError, OpenAIHTTPBackend
from idiomreason.examples import Example
from idiomreason.prompts import build_prompt, get_template

# The templates of the paper's model families as their tokenizer_config.json ships them (tool-call branches
# left out).
# DeepSeek-R1-Distill-Qwen / -Llama: assistant turns keep only what follows `</think>`; the generation
# prompt opens the think block.
R1_DISTILL = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# Qwen2.5-Instruct (ChatML with a default system prompt).
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1 / 3.3 Instruct (date header of the system turn kept, tools left out).
LLAMA3 = (
    "{{- bos_token }}{%- set date_string = '26 Jul 2024' %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


EMPTY_THINK = "<think>\n\n</think>\n\n"
EXAMPLE = Example(
    id="1", language="en", expression="spill the beans", target="She spilled the beans.", label=None
)


def _with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template, generation_prompt", [
    (R1_DISTILL, "<｜Assistant｜><think>\n"),  # the template opens the think block itself
    (QWEN25, "<|im_start|>assistant\n"),
    (LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
], ids=["r1-distill", "qwen2.5", "llama3"])  # fmt: skip
def test_direct_prefill_rendered_by_each_template(tiny_tokenizer, template, generation_prompt):
    tok = _with_template(tiny_tokenizer, template)
    prompt = build_prompt(get_template("direct"), EXAMPLE, reasoning=True)
    assert prompt.prefill == EMPTY_THINK
    rendered = ChatRenderer(tok).render(prompt)
    plain = tok.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    assert plain.endswith(generation_prompt) and prompt.messages[-1]["content"] in plain
    # exactly one empty think block after the generation prompt, never a second "<think>"
    opened = "<think>\n" if plain.endswith("<think>\n") else ""
    assert rendered == plain + EMPTY_THINK[len(opened) :]
    assert rendered.count("<think>") == 1 and rendered.endswith(EMPTY_THINK)


def test_r1_template_drops_the_prefill_from_an_assistant_turn(tiny_tokenizer):
    """Why chat APIs fail on the R1 distills: continuing the final assistant message is impossible because
    the template keeps only what follows `</think>` (Qwen2.5 keeps it, and continuing works there)."""
    messages = [
        {"role": "user", "content": "Is it idiomatic?"},
        {"role": "assistant", "content": EMPTY_THINK},
    ]
    r1 = _with_template(tiny_tokenizer, R1_DISTILL)
    with pytest.raises(ValueError, match="final message"):
        r1.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    qwen = _with_template(tiny_tokenizer, QWEN25)
    continued = qwen.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    prompt = build_prompt(get_template("direct"), EXAMPLE, reasoning=True)
    assert continued.endswith("<|im_start|>assistant\n" + EMPTY_THINK.rstrip("\n")) or continued.endswith(
        EMPTY_THINK
    )
    assert ChatRenderer(qwen).render(prompt).endswith("<|im_start|>assistant\n" + EMPTY_THINK)


def test_r1_direct_condition_through_a_real_server(served_tiny_model, tiny_tokenizer, tmp_path):
    """`transformers serve` (the loopback server of the tiny model): the direct condition of an R1 distill
    through api="chat" goes to /completions rendered with the R1 template, and the answer equals local greedy
    generation on the same rendered prompt; sent as a message to continue, the server rejects it."""
    from idiomreason.backends.hf import TransformersBackend

    r1_dir = tmp_path / "r1-tokenizer"
    _with_template(tiny_tokenizer, R1_DISTILL).save_pretrained(str(r1_dir))  # same vocabulary as the server's
    prompts = [build_prompt(get_template("direct"), EXAMPLE, reasoning=True)]
    backend = OpenAIHTTPBackend(served_tiny_model.base_url, served_tiny_model.model, tokenizer=str(r1_dir),
                                api_key_env="", max_retries=0)  # fmt: skip
    try:
        ((_, remote),) = list(backend.generate(prompts, 8))
    finally:
        backend.close()
    local = TransformersBackend(
        str(served_tiny_model.model_dir), tokenizer=str(r1_dir), dtype="float32", device="cpu"
    )
    ((_, expected),) = list(local.generate(prompts, 8))
    assert local.renderer.render(prompts[0]).endswith("<｜Assistant｜>" + EMPTY_THINK)
    assert remote.text == expected.text and remote.n_tokens == expected.n_tokens

    as_message = OpenAIHTTPBackend(served_tiny_model.base_url, served_tiny_model.model, api_key_env="",
                                   prefill_via="continue_final_message", max_retries=0)  # fmt: skip
    try:
        with pytest.raises(HTTPBackendError, match=r"HTTP 4\d\d"):
            list(as_message.generate(prompts, 8))
    finally:
        as_message.close()
