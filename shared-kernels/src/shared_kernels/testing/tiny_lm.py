"""Tiny causal LMs built from configs and a tokenizer trained in-process: the real transformers loading
code (`save_pretrained` / `from_pretrained`) on artefacts small enough for a 2-core CI machine.

transformers and tokenizers are imported inside the functions so that `shared_kernels` itself never needs
them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# A little English and Portuguese, some markup and digits, so the BPE learns useful merges without data files.
DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was raining cats and dogs all afternoon.",
    "She spilled the beans about the surprise party; he kicked the bucket in the old story.",
    "Relevance Label: 0 ## Relevance Label: 1 ## Relevance Label: 2 ## idiomatic literal",
    "<think> The phrase is used figuratively here, so the answer is idiomatic. </think> Answer: idiomatic",
    "O menino chutou o balde. Ela pagou o pato pelo erro dos outros. Figurativo, literal, idiomático.",
    "def add(a, b):\n    return a + b\n\nclass Tensor:\n    pass\n",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 query document passage question answer yes no",
]


def train_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512, save_dir: str | Path | None = None
) -> Any:
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer with a chat template.

    Args:
        texts: training text (defaults to a small built-in corpus).
        vocab_size: target vocabulary size, special tokens included (byte-level alphabet is 256 + merges).
        save_dir: if given, `save_pretrained` there and return the tokenizer re-loaded with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(texts) if texts is not None else DEFAULT_CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    if save_dir is None:
        return fast
    from transformers import AutoTokenizer

    fast.save_pretrained(str(save_dir))
    return AutoTokenizer.from_pretrained(str(save_dir))


def tiny_config(
    family: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    **overrides: Any,
) -> Any:
    """A transformers config for a tiny Llama / Qwen2 / Qwen3 style causal LM."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    kwargs.update(overrides)
    return classes[family](**kwargs)


def tiny_causal_lm(
    save_dir: str | Path | None = None,
    tokenizer: Any | None = None,
    seed: int = 0,
    dtype: Any = None,
    **config_kwargs: Any,
) -> Any:
    """Build a randomly initialised tiny causal LM from `tiny_config(**config_kwargs)`.

    With `save_dir`, the model (and `tokenizer`, if given) is written with `save_pretrained` (safetensors)
    and the returned model is the one re-loaded through `AutoModelForCausalLM.from_pretrained`.
    Special-token ids are taken from `tokenizer` when one is given.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is not None:
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        config_kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if model.generation_config is not None and tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if save_dir is None:
        return model.to(dtype) if dtype is not None else model
    model.save_pretrained(str(save_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(save_dir))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(str(save_dir), **kwargs)
