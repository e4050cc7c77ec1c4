"""nf4lora benchmarks against bitsandbytes (+ peft): NF4 quantize/dequantize throughput, training memory,
and on a GPU the dequantize bandwidth and the QLoRA training step."""

from __future__ import annotations

import ctypes
import functools
import gc
import threading
import time

import torch

from bench.harness import BenchContext, benchmark


def _llama_100m(dtype: torch.dtype, device: str = "cpu"):
    """A ~100M-parameter Llama (hidden 768, 12 layers, MLP 2048, vocab 8192), randomly initialised."""
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    return tiny_causal_lm(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        intermediate_size=2048,
        vocab_size=8192,
        dtype=dtype,
    ).to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _NoHugePageAdvice:
    """Within the block, fresh outputs of the native CPU kernels get no transparent-huge-page advice: the same
    kernel, so a row with and one without separate the kernel's speed from the page-fault savings."""

    def __enter__(self) -> None:
        from shared_kernels import nf4_cpu

        self._saved = nf4_cpu.hugepage_advice
        nf4_cpu.hugepage_advice = False

    def __exit__(self, *exc: object) -> None:
        from shared_kernels import nf4_cpu

        nf4_cpu.hugepage_advice = self._saved


def _without_advice(fn):
    def run():
        with _NoHugePageAdvice():
            return fn()

    return run


def _write_floor(packed: torch.Tensor, numel: int, dtype: torch.dtype, out: torch.Tensor | None = None):
    """The dequantize floor: the same output bytes written (a fresh output allocated as the kernels do,
    huge-page advice included, or the reused `out`) and the packed codes read, nothing computed, on one
    thread (a CPU-time floor whatever the thread count). The write is libc's `memset` (`rep stosb` on x86:
    whole lines without reading them first), which measured 10-40% cheaper than torch's `zero_()` (plain
    stores) at 4-64 MiB; our streaming stores can still beat it. The read is numpy's `max` (one thread:
    torch's OpenMP reduction spins under load, 3-7 ms of CPU time for the 4 MiB floor with 2 threads)."""
    from shared_kernels import nf4_cpu

    codes = packed.numpy()

    def run() -> torch.Tensor:
        y = nf4_cpu.fresh_output(numel, dtype) if out is None else out
        ctypes.memset(y.data_ptr(), 0, numel * dtype.itemsize)
        codes.max()
        return y

    return run


@benchmark("nf4-quantize-cpu", package="nf4lora", device="cpu")
def nf4_quantize_cpu(ctx: BenchContext) -> None:
    """NF4 quantize (blocksize 64, no double quantization) of a (rows, 4096) weight, our CPU path
    (`backend="auto"`: the native kernels of `shared_kernels.nf4_cpu`) vs bitsandbytes CPU; GB/s of input
    read. The bytes are checked equal first. Each case twice: with the huge-page advice on the fresh packed
    output (the default, where it is 2-64 MiB) and without it."""
    import bitsandbytes.functional as F

    from shared_kernels import nf4_cpu
    from shared_kernels.nf4 import quantize_nf4

    t0 = time.perf_counter()
    native = nf4_cpu.available()
    print(f"  native NF4 CPU kernels: {native} (load/compile {time.perf_counter() - t0:.2f} s)", flush=True)
    for rows in [1024] if ctx.quick else [1024, 4096, 11008]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 4096).to(dtype)
            packed, _ = quantize_nf4(x, 64, check_finite=False)
            q, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
            assert torch.equal(packed, q.reshape(-1))
            ours = functools.partial(quantize_nf4, x, 64, check_finite=False)
            for label, fn in (("", ours), (", no huge-page advice", _without_advice(ours))):
                ctx.compare(
                    f"{rows}x4096 {_dtype_name(dtype)}{label}",
                    fn,
                    lambda x=x: F.quantize_4bit(x, blocksize=64, quant_type="nf4"),
                    ours_name="nf4lora" if native else "nf4lora (torch ref)",
                    anchor_name="bitsandbytes",
                    work=x.numel() * x.element_size() / 1e9,
                    unit="GB/s",
                    reps=3 if ctx.quick or rows > 4096 else 5,
                )


@benchmark("nf4-dequantize-cpu", package="nf4lora", device="cpu")
def nf4_dequantize_cpu(ctx: BenchContext) -> None:
    """NF4 dequantize of a (rows, 4096) weight (blocksize 64, +DQ: double-quantized constants), our CPU path
    (`backend="auto"`: the native kernels of `shared_kernels.nf4_cpu`, AVX-512 where the CPU has it; the
    torch reference where they are unavailable) vs bitsandbytes CPU (native C++, AVX-512 where the CPU has it,
    always a fresh output: its `out=` has no CPU kernel); GB/s
    of output written. The values are checked equal first. Each case three ways: a fresh output with the
    huge-page advice (the default: outputs of 2-64 MiB get it), a fresh output without it, and `out=` a reused
    buffer (no page faults: the kernel's own speed). The note of each row gives both sides' CPU time as a
    multiple of a floor timed in the same interleaving, under the same protocol and allocation: the output
    bytes written by libc's `memset` (fresh, as ours allocates them, or the reused buffer) and the packed
    codes read by numpy's `max()`; where bitsandbytes is within 3x of the floor, 3x bitsandbytes cannot be
    reached."""
    import bitsandbytes.functional as F

    from shared_kernels import nf4_cpu
    from shared_kernels.nf4 import dequantize_nf4, double_quantize_absmax, quantize_nf4

    native = nf4_cpu.available()
    print(
        f"  native NF4 CPU kernels: {native}, dequantize ISA {nf4_cpu.isa() if native else '-'}", flush=True
    )
    rows = [256, 4096] if ctx.quick else [256, 4096, 11008]
    for r in rows:
        shape = (r, 4096)
        x = torch.randn(shape)
        for dq in (False, True):
            q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
            packed, absmax = quantize_nf4(x, 64)
            kw = {}
            if dq:
                absmax, absmax2, offset = double_quantize_absmax(absmax)
                kw = dict(absmax2=absmax2, offset=offset)
            for dtype in (torch.float32, torch.bfloat16):
                state.dtype = dtype
                got = dequantize_nf4(packed, absmax, shape, 64, dtype, **kw)
                assert torch.equal(got, F.dequantize_4bit(q, state))
                ours = functools.partial(dequantize_nf4, packed, absmax, shape, 64, dtype, **kw)
                reused = functools.partial(ours, out=got)
                floor = _write_floor(packed, x.numel(), dtype)
                ways = (
                    ("", ours, floor),
                    (", no huge-page advice", _without_advice(ours), _without_advice(floor)),
                    (", out= reused", reused, _write_floor(packed, x.numel(), dtype, out=got)),
                )
                for label, fn, floor_fn in ways:
                    ctx.compare(
                        f"{r}x4096 -> {_dtype_name(dtype)}{' +DQ' if dq else ''}{label}",
                        fn,
                        lambda q=q, s=state: F.dequantize_4bit(q, s),
                        ours_name="nf4lora" if native else "nf4lora (torch ref)",
                        anchor_name="bitsandbytes",
                        work=x.numel() * dtype.itemsize / 1e9,
                        unit="GB/s",
                        reps=3 if ctx.quick else 7,
                        floor=floor_fn,
                    )
                del got


@benchmark("nf4lora-linear-step-cpu", package="nf4lora", device="cpu")
def nf4lora_linear_step_cpu(ctx: BenchContext) -> None:
    """One LoRA linear layer on a 4-bit base (NF4 + DQ, r=64, fp32 compute and adapters), forward + backward
    of a (tokens, in) input: `LoRALinear4bit` vs bitsandbytes `Linear4bit` + peft LoRA over the same bytes.
    (fp32: this CPU has no bf16 matmul units, a bf16 step of 4096x4096 takes ~40 s in both.)"""
    from collections import OrderedDict

    import bitsandbytes as bnb
    import peft

    from nf4lora.interop import to_bnb_params4bit
    from nf4lora.lora import LoRALinear4bit
    from nf4lora.weight import NF4Weight

    cases = [(4096, 4096, 64)] if ctx.quick else [(4096, 4096, 64), (11008, 4096, 64), (4096, 4096, 512)]
    for out_f, in_f, tokens in cases:
        g = torch.Generator().manual_seed(0)
        w = NF4Weight.from_float(torch.randn(out_f, in_f, generator=g) * 0.02, 64, double_quant=True)
        ours = LoRALinear4bit(w, r=64, alpha=16, dropout=0.0, compute_dtype=torch.float32)
        torch.nn.init.normal_(ours.lora_B.weight, std=0.01)
        proj = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="cpu"
        )
        proj.weight = to_bnb_params4bit(w)
        anchor = peft.get_peft_model(
            torch.nn.Sequential(OrderedDict(proj=proj)),
            peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"]),
        )
        with torch.no_grad():
            anchor.base_model.model.proj.lora_A["default"].weight.copy_(ours.lora_A.weight)
            anchor.base_model.model.proj.lora_B["default"].weight.copy_(ours.lora_B.weight)
        x = torch.randn(tokens, in_f, generator=g)

        def step(m, x=x):
            xi = x.detach().requires_grad_()
            m(xi).square().mean().backward()
            return xi.grad

        torch.testing.assert_close(step(ours), step(anchor), rtol=1e-4, atol=1e-7)
        ctx.compare(
            f"{out_f}x{in_f}, {tokens} tokens, fwd+bwd",
            lambda m=ours: step(m),
            lambda m=anchor: step(m),
            ours_name="nf4lora",
            anchor_name="bnb Linear4bit+peft",
            reps=3 if ctx.quick else 7,
        )


class _PeakRSS:
    """Samples the process RSS every 2 ms in a thread; `.peak` after the block (bytes)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _train_steps(model, steps: int, seq: int) -> int:
    """`steps` AdamW steps; returns the exact bytes of the trainable state they hold: trainable parameters,
    their gradients and the optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 8192, (1, seq), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    tensors += [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@benchmark("nf4lora-train-memory-cpu", package="nf4lora", device="cpu")
def nf4lora_train_memory_cpu(ctx: BenchContext) -> None:
    """~100M-param Llama: weight bytes and peak RSS of LoRA training (r=64, all linear layers, 2 steps,
    seq 128): prepare_model (NF4 + DQ, fp32 adapters) vs bf16 base + peft LoRA."""
    import peft

    from nf4lora.memory import memory_report
    from nf4lora.model import prepare_model

    seq = 64 if ctx.quick else 128
    # ours
    gc.collect()
    model = _llama_100m(torch.bfloat16)
    prepare_model(
        model, r=64, alpha=16, dropout=0.05, gradient_checkpointing=True, compute_dtype=torch.bfloat16
    )
    rep = memory_report(model)
    ours_weights = rep.base_codes + rep.base_constants + rep.other_weights
    ours_linear = rep.base_codes + rep.base_constants
    with _PeakRSS() as ours_rss:
        ours_state = _train_steps(model, 2, seq)
    ours_peak_extra = ours_rss.peak - ours_rss.start
    ours_total = ours_rss.peak
    del model
    gc.collect()
    # anchor: bf16 base + peft LoRA
    model = _llama_100m(torch.bfloat16)
    linear_bytes = sum(
        m.weight.numel() * 2
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and n != "lm_head"
    )
    bf16_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    )
    with _PeakRSS() as anchor_rss:
        anchor_state = _train_steps(model, 2, seq)
    anchor_peak_extra = anchor_rss.peak - anchor_rss.start
    ctx.record(
        "frozen weights, linear layers (MiB)",
        ours_linear / 2**20,
        linear_bytes / 2**20,
        "MiB",
        ours_name="NF4+DQ",
        anchor_name="bf16",
        note="target <= 0.3",
    )
    ctx.record(
        "frozen weights, all incl. 16-bit embeddings + head (MiB)",
        ours_weights / 2**20,
        bf16_weights / 2**20,
        "MiB",
        ours_name="NF4+DQ",
        anchor_name="bf16",
    )
    ctx.record(
        "adapters + their grads + AdamW state, exact (MiB)",
        ours_state / 2**20,
        anchor_state / 2**20,
        "MiB",
        ours_name="nf4lora",
        anchor_name="peft bf16",
        note="fp32 adapters on both sides (peft upcasts them too)",
    )
    ctx.record(
        f"training-step RSS growth, seq {seq} (MiB)",
        ours_peak_extra / 2**20,
        anchor_peak_extra / 2**20,
        "MiB",
        ours_name="nf4lora",
        anchor_name="peft bf16",
        note="sampled every 2 ms: activations, transients, grads + Adam state first touched",
    )
    ctx.record(
        "process peak RSS (MiB)",
        ours_total / 2**20,
        anchor_rss.peak / 2**20,
        "MiB",
        ours_name="nf4lora",
        anchor_name="peft bf16",
        note="same process, ours measured first",
    )


@benchmark("nf4-dequantize-cuda", package="nf4lora", device="cuda")
def nf4_dequantize_cuda(ctx: BenchContext) -> None:
    """NF4 dequantize to bf16 (with fused DQ), Triton vs bitsandbytes CUDA; GB/s of bytes moved (codes +
    constants read, bf16 written). Compare with the card's memory bandwidth (target >= 80%)."""
    import bitsandbytes.functional as F

    from shared_kernels.nf4 import dequantize_nf4, double_quantize_absmax, quantize_nf4

    for rows in [4096] if ctx.quick else [4096, 16384]:
        shape = (rows, 8192)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        packed, absmax = quantize_nf4(x, 64)
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        moved = packed.numel() + qabsmax.numel() + x.numel() * 2
        ctx.compare(
            f"{rows}x8192 -> bf16 +DQ",
            lambda p=packed, a=qabsmax, sh=shape, a2=absmax2, o=offset: dequantize_nf4(
                p, a, sh, 64, torch.bfloat16, absmax2=a2, offset=o
            ),
            lambda q=q, s=state: F.dequantize_4bit(q, s),
            ours_name="nf4lora triton",
            anchor_name="bitsandbytes",
            work=moved / 1e9,
            unit="GB/s",
        )


@benchmark("nf4lora-step-cuda", package="nf4lora", device="cuda")
def nf4lora_step_cuda(ctx: BenchContext) -> None:
    """QLoRA training step (fwd+bwd+AdamW) of a ~100M Llama, bf16 compute, r=64 all-linear, batch 4 x 512:
    prepare_model vs transformers + bitsandbytes 4-bit + peft; also the peak CUDA memory."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nf4lora.model import prepare_model

    ids = torch.randint(0, 8192, (4, 512), device="cuda")
    ours = prepare_model(
        _llama_100m(torch.bfloat16, "cuda"), r=64, alpha=16, dropout=0.05, compute_dtype=torch.bfloat16
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _llama_100m(torch.bfloat16).save_pretrained(tmp)
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        anchor = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qcfg, device_map="cuda")
    anchor = peft.prepare_model_for_kbit_training(anchor)
    anchor = peft.get_peft_model(
        anchor, peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    )
    opts = {}
    for name, m in (("ours", ours), ("anchor", anchor)):
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def step(name, m):
        m(input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad()

    ctx.compare(
        "step 4x512",
        lambda: step("ours", ours),
        lambda: step("anchor", anchor),
        ours_name="nf4lora",
        anchor_name="bnb+peft",
        reps=5 if ctx.quick else 20,
    )
    peaks = []
    for name, m in (("ours", ours), ("anchor", anchor)):
        torch.cuda.reset_peak_memory_stats()
        step(name, m)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    ctx.record(
        "peak CUDA memory (MiB)", peaks[0], peaks[1], "MiB", ours_name="nf4lora", anchor_name="bnb+peft"
    )
