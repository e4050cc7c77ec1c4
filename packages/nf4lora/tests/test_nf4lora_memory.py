"""Memory accounting, the paper's 65B-in-48GB budget from its parts, and the paged optimizer fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from nf4lora.memory import count_parameters, estimate_memory, memory_report
from nf4lora.model import prepare_model
from nf4lora.optim import paged_adamw

GB = 10**9


def test_estimate_reproduces_65b_in_48gb_budget():
    # LLaMA-65B: 80 layers, hidden 8192, MLP 22016, vocab 32000.
    h, inter, layers, vocab = 8192, 22016, 80, 32000
    n_params = layers * (4 * h * h + 3 * h * inter + 2 * h) + 2 * vocab * h + h
    assert 65.2e9 < n_params < 65.3e9
    est = estimate_memory(
        n_params, n_layers=layers, hidden_size=h, intermediate_size=inter, vocab_size=vocab, r=64
    )
    assert 33.0 * GB < est.base_weights < 34.0 * GB  # 4.127 bits per quantized parameter
    assert est.unquantized_weights == 2 * vocab * h * 2  # embeddings + LM head in 16 bits
    n_lora = layers * 64 * (4 * 2 * h + 3 * (h + inter))
    assert est.adapters == 2 * n_lora and est.optimizer_state == 8 * n_lora
    assert 40 * GB < est.total < 48 * GB  # "65B finetuning in < 48 GB"
    assert est.full_finetune_16bit > 780 * GB  # "full 16-bit: > 780 GB"
    no_dq = estimate_memory(
        n_params,
        n_layers=layers,
        hidden_size=h,
        intermediate_size=inter,
        vocab_size=vocab,
        double_quant=False,
    )
    # double quantization saves 0.373 bits per parameter: ~3 GB at 65B
    assert 2.9 * GB < no_dq.base_weights - est.base_weights < 3.1 * GB
    with pytest.raises(ValueError, match="smaller than the embeddings"):
        estimate_memory(1000, n_layers=1, hidden_size=64, intermediate_size=128, vocab_size=512)


def test_memory_report_on_prepared_model(tiny_tokenizer):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = tiny_causal_lm(tokenizer=tiny_tokenizer)
    n_dense = sum(p.numel() for p in model.parameters())
    quantizable = sum(
        m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"
    )
    prepare_model(model, r=4, dropout=0.0)
    assert count_parameters(model) == n_dense
    lora = [p for p in model.parameters() if p.requires_grad]
    report = memory_report(model)
    assert report.base_codes == quantizable // 2
    assert report.adapters == sum(p.numel() * 4 for p in lora)
    assert report.gradients == 0 and report.optimizer_state == 0
    opt = torch.optim.AdamW(lora, lr=1e-3)
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    report = memory_report(model, opt)
    assert report.gradients == report.adapters
    assert report.optimizer_state >= 2 * report.adapters  # exp_avg + exp_avg_sq (+ step counters)
    assert "total" in report.format()


@pytest.mark.parametrize("bits", (8, 32))
def test_cpu_optimizer_is_bitsandbytes_and_8bit_state_stays_8bit(bits):
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(4096 + 7))  # above bitsandbytes' min_8bit_size
    small = torch.nn.Parameter(torch.randn(33))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no paging warning, no fallback
        opt = paged_adamw([p, small], lr=1e-2, optim_bits=bits)
    assert type(opt) is (bnb.optim.AdamW8bit if bits == 8 else bnb.optim.AdamW)
    reference = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-2, weight_decay=0.0)
    for step in range(3):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        p.grad, small.grad = g, torch.ones(33)
        reference.param_groups[0]["params"][0].grad = g.clone()
        opt.step()
        reference.step()
    state = opt.state[p]
    assert state["state1"].dtype == state["state2"].dtype == (torch.uint8 if bits == 8 else torch.float32)
    assert opt.state[small]["state1"].dtype == torch.float32  # bitsandbytes keeps small tensors 32-bit
    moved = reference.param_groups[0]["params"][0].detach()
    # 8-bit moments: the update follows fp32 AdamW closely (3 steps of lr 1e-2)
    assert float((p.detach() - moved).abs().max()) < (2e-3 if bits == 8 else 1e-5)
    with pytest.raises(ValueError, match="optim_bits must be 32 or 8"):
        paged_adamw([p], optim_bits=16)
    with pytest.raises(ValueError, match="params is empty"):
        paged_adamw([])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", (32, 8))
def test_paged_adamw_on_cuda_is_bitsandbytes(bits):
    from bitsandbytes.optim import PagedAdamW, PagedAdamW8bit

    p = torch.nn.Parameter(torch.randn(4096, device="cuda"))
    opt = paged_adamw([p], lr=1e-3, optim_bits=bits)
    assert isinstance(opt, PagedAdamW if bits == 32 else PagedAdamW8bit)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(before, p.detach())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4),
        dict(r=3, adapter_dtype=torch.bfloat16, double_quant=False, blocksize=128, target_modules=["q_proj"]),
        dict(r=2, skip=["down_proj"], modules_to_save=["lm_head"], norms_in_fp32=False),
    ],
)
def test_estimate_model_memory_equals_prepared_model_bytes(tiny_tokenizer, kwargs):
    """The estimate from a meta-device copy equals the bytes `memory_report` counts on the prepared model."""
    from transformers import AutoModelForCausalLM

    from nf4lora.memory import estimate_model_memory
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, dtype=torch.bfloat16)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config).to(
            torch.bfloat16
        )  # as tiny_causal_lm builds it
    assert meta.lm_head.weight.is_meta
    est = estimate_model_memory(meta, **kwargs)
    prepare_model(model, dropout=0.0, **kwargs)
    real = memory_report(model)
    for part in ("base_codes", "base_constants", "other_weights", "adapters"):
        assert getattr(est, part) == getattr(real, part), part
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.gradients == sum(p.numel() * p.element_size() for p in trainable)
    assert est.optimizer_state == 8 * sum(p.numel() for p in trainable)
    assert est.adapters == real.adapters > 0


def test_llama_table_matches_the_paper_claims():
    """65B fits a 48 GB card (with bf16 or fp32 adapters), 33B a 24 GB one, 65B not a 24 GB one."""
    from nf4lora.memory import LLAMA_SHAPES, llama_params, llama_table

    assert llama_params(*LLAMA_SHAPES["7B"]) == 6_738_415_616  # LLaMA-7B's published count
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in llama_table().splitlines()[2:]}
    assert list(rows) == ["7B", "13B", "33B", "65B"]
    assert rows["65B"][8:12] == ["44.87", "48.07", "no / no", "yes / yes"]
    assert rows["33B"][10] == "yes / yes" and rows["7B"][10] == "yes / yes"


def test_estimate_model_memory_bad_input_names_the_argument():
    from nf4lora.memory import estimate_model_memory

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="r must be a positive int"):
        estimate_model_memory(model, r=0)
    with pytest.raises(ValueError, match="modules_to_save"):
        estimate_model_memory(model, modules_to_save=["score"])
    est = estimate_model_memory(
        model, r=2, double_quant=False
    )  # 4096 weights: 2048 code bytes, 64 fp32 absmax
    assert (est.base_codes, est.base_constants, est.other_weights, est.adapters) == (
        2048,
        256,
        256,
        2 * 128 * 4,
    )
