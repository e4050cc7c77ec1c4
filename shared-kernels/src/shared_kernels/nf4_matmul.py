"""Matmul with a frozen NF4 weight, the base path of a QLoRA linear layer.

The weight W is (N, K) (out_features, in_features), stored as NF4 codes of its row-major flattening (the
bitsandbytes layout, see `shared_kernels.nf4`), optionally with double-quantized constants.

- forward:   y = x @ W^T      x (M, K) -> (M, N)
- backward:  dx = dy @ W      dy (M, N) -> (M, K)   (the base weight itself never gets a gradient)

The torch path dequantizes W to the compute dtype (with "auto" on CPU: the native kernels of
`shared_kernels.nf4_cpu`) and calls a dense matmul. With `reuse_workspace=True` (the layers of nf4lora ask for
it) and "auto" on CPU, outside autograd recording and torch.compile, W is dequantized into a per-thread,
per-dtype scratch buffer kept for the next call instead of a fresh tensor: a fresh output of a large weight
costs page faults (the kernel zeroing every page) that take longer than the dequantization itself. The buffer
grows to the largest weight seen (e.g. 180 MB for 11008x4096 in fp32); `release_workspaces()` frees it.

The Triton kernel dequantizes a (BLOCK_K, BLOCK_N) tile of W in registers (code lookup * absmax, with the
double-quantized absmax rebuilt on the fly), casts it to the input dtype and feeds `tl.dot` with fp32
accumulation: W is never materialised in memory. One kernel serves both directions by addressing W through
strides.
"""

from __future__ import annotations

import threading

import torch

from shared_kernels.backend import resolve_backend, triton_available
from shared_kernels.nf4 import (
    CODES,
    DQ_BLOCKSIZE,
    DYNAMIC_CODE,
    DoubleQuantState,
    check_quant_type,
    dequantize_4bit,
)

# This thread's dequantization scratch buffers, one per dtype (see the module docstring).
_workspaces = threading.local()


def _workspace(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous (shape) CPU view of this thread's `dtype` scratch buffer (grown as needed)."""
    buffers: dict[torch.dtype, torch.Tensor] = _workspaces.__dict__.setdefault("buffers", {})
    numel = shape[0] * shape[1]
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_workspaces() -> None:
    """Free this thread's dequantization scratch buffers (see the module docstring)."""
    _workspaces.__dict__.pop("buffers", None)


def _use_workspace(x: torch.Tensor, backend: str) -> bool:
    """A scratch W is safe where nothing can keep it: no autograd graph records the matmul (the nf4lora
    autograd.Function runs it with grad off) and no compiled graph captures the buffer."""
    return (
        backend == "auto"
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def matmul_nf4_ref(x: torch.Tensor, w_dense: torch.Tensor, transpose_w: bool = True) -> torch.Tensor:
    """The specification: x @ W^T (transpose_w) or x @ W, with W already dequantized to x.dtype."""
    return x @ (w_dense.t() if transpose_w else w_dense)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _matmul_nf4_kernel(
        x_ptr,
        packed_ptr,
        absmax_ptr,
        code_ptr,
        out_ptr,
        M,
        N_OUT,
        K_IN,
        stride_xm,
        stride_xk,
        stride_om,
        stride_on,
        stride_wk,
        stride_wn,
        qabsmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # out (M, N_OUT) = x (M, K_IN) @ B (K_IN, N_OUT) with B[k, n] = W_flat[k * stride_wk + n * stride_wn].
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x_tile = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=(rm[:, None] < M) & (rk[None, :] < K_IN),
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            w_mask = (rk[:, None] < K_IN) & (rn[None, :] < N_OUT)
            e = (
                rk[:, None].to(tl.int64) * stride_wk + rn[None, :].to(tl.int64) * stride_wn
            )  # (BLOCK_K, BLOCK_N)
            byte = tl.load(packed_ptr + (e >> 1), mask=w_mask, other=0).to(tl.int32)
            nibble = tl.where((e & 1) == 0, byte >> 4, byte & 0xF)
            blk = e // BLOCKSIZE
            if DOUBLE_QUANT:
                q2 = tl.load(qabsmax_ptr + blk, mask=w_mask, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q2) * tl.load(
                    absmax2_ptr + blk // BLOCKSIZE2, mask=w_mask, other=0.0
                )
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + blk, mask=w_mask, other=0.0)
            w_tile = tl.where(w_mask, tl.load(code_ptr + nibble) * scale, 0.0)  # fp32 (BLOCK_K, BLOCK_N)
            acc = tl.dot(x_tile, w_tile.to(x_tile.dtype), acc)
        tl.store(
            out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N_OUT),
        )


def _matmul_nf4_triton(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    transpose_w: bool,
    dq: DoubleQuantState | None,
    quant_type: str,
) -> torch.Tensor:
    n_rows, n_cols = shape  # W (N, K)
    M = x2d.shape[0]
    if transpose_w:  # y = x @ W^T: inner index k walks a row of W
        k_in, n_out, stride_wk, stride_wn = n_cols, n_rows, 1, n_cols
    else:  # dx = dy @ W: inner index n walks a column of W
        k_in, n_out, stride_wk, stride_wn = n_rows, n_cols, n_cols, 1
    out = torch.empty((M, n_out), dtype=x2d.dtype, device=x2d.device)
    block_m = 16 if M <= 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(n_out, 64))
    code = CODES[quant_type].to(x2d.device)
    if dq is None:
        dq_args = (packed, absmax, code, absmax)
        double_quant, blocksize2 = False, DQ_BLOCKSIZE
    else:
        blocksize2 = dq.blocksize2
        dq_args = (
            absmax,
            dq.absmax2.float().contiguous(),
            dq.code2.float().contiguous(),
            dq.offset.float().reshape(1),
        )
        double_quant = True
    _matmul_nf4_kernel[grid](
        x2d,
        packed,
        absmax,
        code,
        out,
        M,
        n_out,
        k_in,
        x2d.stride(0),
        x2d.stride(1),
        out.stride(0),
        out.stride(1),
        stride_wk,
        stride_wn,
        *dq_args,
        BLOCKSIZE=blocksize,
        BLOCKSIZE2=blocksize2,
        DOUBLE_QUANT=double_quant,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=32,
    )
    return out


@torch.library.custom_op("shared_kernels::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n_rows: int,
    n_cols: int,
    blocksize: int,
    transpose_w: bool,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize2: int,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """The Triton launch as a torch custom op (fake implementation below), so torch.compile does not break the
    graph around it: x2d (M, K) -> (M, N) forward, (M, N) -> (M, K) with transpose_w=False."""
    dq = None
    if absmax2 is not None and offset is not None and code2 is not None:
        dq = DoubleQuantState(absmax2, offset, code2, blocksize2)
    return _matmul_nf4_triton(
        x2d, packed, absmax.contiguous(), (n_rows, n_cols), blocksize, transpose_w, dq, quant_type
    )


@_nf4_matmul_op.register_fake
def _(
    x2d,
    packed,
    absmax,
    n_rows,
    n_cols,
    blocksize,
    transpose_w,
    absmax2,
    code2,
    offset,
    blocksize2,
    quant_type="nf4",
):
    return x2d.new_empty((x2d.shape[0], n_rows if transpose_w else n_cols))


def matmul_nf4(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int = 64,
    *,
    transpose_w: bool = True,
    absmax2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    blocksize2: int = DQ_BLOCKSIZE,
    quant_type: str = "nf4",
    backend: str = "auto",
    reuse_workspace: bool = False,
) -> torch.Tensor:
    """x @ W^T (transpose_w=True, the forward) or x @ W (False, the input gradient) with NF4 weight W.

    Args:
        x: (..., K) for the forward or (..., N) for the backward, float32/bfloat16/float16; the result has
            x's dtype (W is dequantized to it; fp32 accumulation in the kernel).
        packed, absmax, blocksize, absmax2, offset, code2, blocksize2, quant_type: the 4-bit weight, as for
            `dequantize_4bit`.
        shape: (N, K) = (out_features, in_features) of W.
        backend: "auto" (Triton on CUDA), "torch" (dequantize then matmul) or "triton".
        reuse_workspace: on CPU with "auto", with grad mode off and not compiling, dequantize W into a
            per-thread scratch buffer instead of a fresh tensor (see the module docstring).
    Returns:
        (..., N) for the forward, (..., K) for the backward.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (out_features, in_features), got {tuple(shape)}")
    inner = shape[1] if transpose_w else shape[0]
    if x.shape[-1] != inner:
        raise ValueError(
            f"x must have last dim {inner} for W of shape {tuple(shape)} "
            f"(transpose_w={transpose_w}), got {tuple(x.shape)}"
        )
    if resolve_backend(backend, x.device) == "torch" or x.numel() == 0:
        # "auto" on CPU dequantizes with the native kernels (same bits as the reference, faster).
        w = dequantize_4bit(
            packed,
            absmax,
            shape,
            blocksize,
            x.dtype,
            quant_type,
            absmax2=absmax2,
            offset=offset,
            code2=code2,
            blocksize2=blocksize2,
            backend="torch" if backend == "torch" else "auto",
            out=_workspace(shape, x.dtype) if reuse_workspace and _use_workspace(x, backend) else None,
        )
        return matmul_nf4_ref(x, w, transpose_w)
    check_quant_type(quant_type)
    double_quant = absmax.dtype == torch.uint8
    if double_quant and (absmax2 is None or offset is None):
        raise ValueError("absmax is uint8 (double-quantized): absmax2 and offset are required")
    code2 = DYNAMIC_CODE.to(x.device) if (double_quant and code2 is None) else code2
    dq = (absmax2, code2, offset) if double_quant else (None, None, None)
    x2d = x.reshape(-1, inner)
    out = torch.ops.shared_kernels.nf4_matmul(
        x2d,
        packed.reshape(-1),
        absmax,
        int(shape[0]),
        int(shape[1]),
        blocksize,
        transpose_w,
        *dq,
        blocksize2,
        quant_type,
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])
