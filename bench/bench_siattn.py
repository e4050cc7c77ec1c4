"""siattn benchmarks: scale-invariant attention backends against torch SDPA (no transform) and FlexAttention.

CPU: forward+backward time and peak allocated memory of the chunked torch path vs SDPA causal, with torch's
default threads and with one thread (on a shared machine every multi-threaded op waits for descheduled
threads, which the one-thread rows factor out); forward of eager and compiled FlexAttention (torch has no CPU
flex backward) vs the chunked path; torch.compile of the chunked path with its first-call compile time. CUDA:
the fused Triton kernel vs SDPA (flash) and compiled FlexAttention.
"""

from __future__ import annotations

import gc
import time
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench.harness import BenchContext, benchmark

B, H, D = 1, 8, 64


def _qkv(T: int, device: str, dtype: torch.dtype = torch.float32, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _fwd_bwd(fn, q, k, v):
    def run():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    return run


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops while the mode is active, releasing them when the last
    tensor using a storage is garbage collected: the peak is the largest live total (CPU has no allocator
    statistics like torch.cuda.max_memory_allocated)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [live tensors, bytes]
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.refs:
                    self.refs[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]


def peak_cpu_mib(fn) -> float:
    """Peak MiB of CPU tensor storage allocated and alive during fn() (inputs excluded)."""
    gc.collect()
    with _LiveTensorBytes() as mode:
        fn()
    return mode.peak / 2**20


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _si_flex(q, k, v, compiled=False):
    from siattn import attention_flex as flex

    return flex(q, k, v, tau=10.0, compiled=compiled)


def _si_chunked(q, k, v):
    from siattn import attention

    return attention(q, k, v, tau=10.0, backend="chunked")


@benchmark("siattn-chunked-cpu", package="siattn", device="cpu")
def siattn_chunked_cpu(ctx: BenchContext) -> None:
    """SI attention chunked torch path vs SDPA causal, fwd+bwd, fp32, B=1 H=8 D=64: time (torch's threads and
    one thread) and peak memory."""
    sizes = [512, 1024] if ctx.quick else [512, 1024, 2048, 4096]
    for T in sizes:
        q, k, v = _qkv(T, "cpu", grad=True)
        reps = 3 if T >= 2048 else None
        ctx.compare(
            f"fwd+bwd T={T}",
            _fwd_bwd(_si_chunked, q, k, v),
            _fwd_bwd(_sdpa, q, k, v),
            ours_name="siattn-chunked",
            anchor_name="sdpa",
            reps=reps,
        )
        with _threads(1):
            ctx.compare(
                f"fwd+bwd T={T} 1 thread",
                _fwd_bwd(_si_chunked, q, k, v),
                _fwd_bwd(_sdpa, q, k, v),
                ours_name="siattn-chunked",
                anchor_name="sdpa",
                reps=reps,
            )
        ctx.record(
            f"fwd+bwd peak MiB T={T}",
            peak_cpu_mib(_fwd_bwd(_si_chunked, q, k, v)),
            peak_cpu_mib(_fwd_bwd(_sdpa, q, k, v)),
            "MiB",
            ours_name="siattn-chunked",
            anchor_name="sdpa",
        )


@benchmark("siattn-flex-cpu", package="siattn", device="cpu")
def siattn_flex_cpu(ctx: BenchContext) -> None:
    """Forward only (CPU flex has no backward, eager or compiled): SI chunked vs SI via FlexAttention
    (score_mod + causal block mask), eager (materialises the scores) and compiled (inductor's CPU flex
    template; first call compiles), and compiled SI flex vs SDPA causal. No peak memory rows: the live-bytes
    dispatch mode cannot enter flex's higher-order op (dynamo refuses it)."""
    from siattn import attention

    sizes = [512, 1024] if ctx.quick else [512, 1024, 2048, 4096]
    for T in sizes:
        q, k, v = _qkv(T, "cpu")
        chunked = lambda q=q, k=k, v=v: _si_chunked(q, k, v)  # noqa: E731
        with torch.no_grad():
            ctx.compare(
                f"fwd T={T}",
                chunked,
                lambda q=q, k=k, v=v: attention(q, k, v, backend="flex"),
                ours_name="siattn-chunked",
                anchor_name="flex-eager",
                reps=3 if T >= 2048 else None,
            )
            flex_compiled = lambda q=q, k=k, v=v: _si_flex(q, k, v, compiled=True)  # noqa: E731
            t0 = time.perf_counter()
            flex_compiled()
            ctx.record(
                f"first call s T={T}",
                0.0,
                time.perf_counter() - t0,
                "s",
                ours_name="siattn-chunked",
                anchor_name="flex-compiled",
                note="compile time of flex-compiled (ours: no compile)",
            )
            ctx.compare(
                f"fwd T={T} vs compiled",
                chunked,
                flex_compiled,
                ours_name="siattn-chunked",
                anchor_name="flex-compiled",
                reps=3 if T >= 2048 else None,
            )
            ctx.compare(
                f"fwd T={T} flex vs sdpa",
                flex_compiled,
                lambda q=q, k=k, v=v: _sdpa(q, k, v),
                ours_name="siattn-flex-compiled",
                anchor_name="sdpa",
                reps=3 if T >= 2048 else None,
            )


@benchmark("siattn-compiled-cpu", package="siattn", device="cpu")
def siattn_compiled_cpu(ctx: BenchContext) -> None:
    """torch.compile of the SI chunked path (fwd+bwd) vs eager, T=1024 (and 2048 in full runs), with the
    first call's compile time. The chunked path is a torch.library custom op since 2026-12-07, so compile
    keeps it opaque: expect a ratio near 1 and a short compile (earlier rows inlined the chunk loop)."""
    for T in [1024] if ctx.quick else [1024, 2048]:
        torch._dynamo.reset()  # a fresh cache per size: the first call below compiles
        compiled = torch.compile(_si_chunked)
        q, k, v = _qkv(T, "cpu", grad=True)
        t0 = time.perf_counter()
        _fwd_bwd(compiled, q, k, v)()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        _fwd_bwd(_si_chunked, q, k, v)()
        ctx.record(
            f"first call s T={T}",
            first,
            time.perf_counter() - t0,
            "s",
            ours_name="compiled",
            anchor_name="eager",
        )
        ctx.compare(
            f"fwd+bwd T={T}",
            _fwd_bwd(compiled, q, k, v),
            _fwd_bwd(_si_chunked, q, k, v),
            ours_name="compiled",
            anchor_name="eager",
            reps=3,
        )


@benchmark("siattn-triton-cuda", package="siattn", device="cuda")
def siattn_triton_cuda(ctx: BenchContext) -> None:
    """Fused Triton SI kernel vs SDPA causal (flash) and compiled FlexAttention SI, bf16, B=1 H=8 D=64/128."""
    from siattn import attention

    sizes = [1024, 4096] if ctx.quick else [512, 1024, 2048, 4096, 8192, 16384]
    for T in sizes:
        q, k, v = _qkv(T, "cuda", torch.bfloat16)
        with torch.no_grad():
            si = lambda q=q, k=k, v=v: attention(q, k, v, backend="triton")  # noqa: E731
            ctx.compare(
                f"fwd T={T}",
                si,
                lambda q=q, k=k, v=v: _sdpa(q, k, v),
                ours_name="siattn-triton",
                anchor_name="sdpa-flash",
            )

            ctx.compare(
                f"fwd T={T} vs flex",
                si,
                lambda q=q, k=k, v=v: attention(q, k, v, backend="flex"),  # compiled, block mask
                ours_name="siattn-triton",
                anchor_name="flex-compiled",
            )
        qg, kg, vg = [x.detach().requires_grad_() for x in (q, k, v)]
        ctx.compare(
            f"fwd+bwd T={T}",
            _fwd_bwd(lambda a, b, c: attention(a, b, c, backend="triton"), qg, kg, vg),
            _fwd_bwd(_sdpa, qg, kg, vg),
            ours_name="siattn-triton",
            anchor_name="sdpa-flash",
        )
