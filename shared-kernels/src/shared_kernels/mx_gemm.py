"""MX GEMM: C = A Bᵀ for A (M, K) and B (N, K), both MX-quantized in blocks along K (the reduction).

Two paths:
- emulated (any device): dequantize both operands to fp32 (exact: an FP8 element times a power of two fits
  fp32) and multiply with fp32 accumulation. The products are the ones the hardware forms; only the
  accumulation order differs.
- `torch._scaled_mm` on GPUs with hardware MX (compute capability >= 10.0): FP8 operands, E8M0 scales in
  cuBLAS's swizzled 128x4 tile layout ("32_4_4", cuBLAS docs, "1D block scaling factors layout"), block 32
  only. K, M and N are zero-padded to the multiples the kernel needs; zeros add nothing to the sums.
"""

from __future__ import annotations

import torch

from shared_kernels.mx_cast import ELEM_DTYPES, mx_dequantize

GEMM_BACKENDS = ("auto", "emulated", "scaled_mm")


def mx_gemm_ref(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: int = 32,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Emulated MX GEMM, the specification.

    Args:
        a_data: (M, K) float8; a_scale: (M, ceil(K / block_size)) uint8.
        b_data: (N, K) float8; b_scale: (N, ceil(K / block_size)) uint8.
    Returns:
        (M, N) A Bᵀ accumulated in fp32, cast to `out_dtype`.
    """
    a = mx_dequantize(a_data, a_scale, block_size, dim=-1)
    b = mx_dequantize(b_data, b_scale, block_size, dim=-1)
    return (a @ b.t()).to(out_dtype)


def swizzle_scales_32_4_4(scale: torch.Tensor) -> torch.Tensor:
    """Lay out (rows, cols) scale bytes as cuBLAS's block-scaling tiles: the matrix is zero-padded to
    (128 i, 4 j) and cut into 128x4 tiles, tiles stored row-major; inside a tile, entry (r, c) sits at
    offset (r % 32) * 16 + (r // 32) * 4 + c.

    Returns:
        (n_tiles * 512,) uint8, flattened.
    """
    rows, cols = scale.shape
    padded = scale.new_zeros((-(-rows // 128) * 128, -(-cols // 4) * 4))
    padded[:rows, :cols] = scale
    tr, tc = padded.shape[0] // 128, padded.shape[1] // 4
    tiles = padded.view(tr, 4, 32, tc, 4)  # (tile row, r // 32, r % 32, tile col, c)
    return tiles.permute(0, 3, 2, 1, 4).contiguous().flatten()


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t.contiguous()
    out = (
        t.new_zeros((rows, cols))
        if t.dtype == torch.uint8
        else torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    )
    out[: t.shape[0], : t.shape[1]] = t
    return out


def mx_gemm_scaled_mm(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Hardware MX GEMM through `torch._scaled_mm` (block size 32, compute capability >= 10.0)."""
    m, k = a_data.shape
    n = b_data.shape[0]
    kp, mp, np_ = -(-k // 32) * 32, -(-m // 128) * 128, -(-n // 128) * 128
    # zero data in padded rows / columns; byte 127 (2^0) for their scales keeps every product finite
    a = _pad_to(a_data.view(torch.uint8), mp, kp).view(a_data.dtype)
    b = _pad_to(b_data.view(torch.uint8), np_, kp).view(b_data.dtype)
    sa = torch.full((mp, kp // 32), 127, dtype=torch.uint8, device=a_scale.device)
    sa[:m, : a_scale.shape[1]] = a_scale
    sb = torch.full((np_, kp // 32), 127, dtype=torch.uint8, device=b_scale.device)
    sb[:n, : b_scale.shape[1]] = b_scale
    out = torch._scaled_mm(
        a,
        b.t(),  # (K, N) column-major, as cuBLAS wants
        swizzle_scales_32_4_4(sa).view(torch.float8_e8m0fnu),
        swizzle_scales_32_4_4(sb).view(torch.float8_e8m0fnu),
        out_dtype=torch.bfloat16 if out_dtype not in (torch.bfloat16, torch.float32) else out_dtype,
    )
    return out[:m, :n].to(out_dtype)


def hardware_mx_available(device: torch.device) -> bool:
    """True on CUDA devices of compute capability >= 10.0 (Blackwell), where cuBLAS runs MX GEMMs."""
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device)[0] >= 10
    )


def mx_gemm(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    block_size: int = 32,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """C = A Bᵀ from MX operands blocked along K (shapes as in `mx_gemm_ref`).

    backend: "emulated", "scaled_mm" (needs `hardware_mx_available` and block_size 32) or "auto" (the
    hardware path when it can run, else emulated).
    """
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"backend must be one of {GEMM_BACKENDS}, got {backend!r}")
    for name, t in (("a_data", a_data), ("b_data", b_data)):
        if t.dtype not in ELEM_DTYPES or t.dim() != 2:
            raise TypeError(
                f"{name} must be a 2-D float8_e4m3fn / float8_e5m2 tensor, got {t.dtype} {tuple(t.shape)}"
            )
    if a_data.shape[1] != b_data.shape[1]:
        raise ValueError(
            f"a_data and b_data must share K, got {tuple(a_data.shape)} and {tuple(b_data.shape)}"
        )
    hardware = hardware_mx_available(a_data.device) and block_size == 32
    if backend == "scaled_mm" and not hardware:
        raise ValueError(
            "backend='scaled_mm' needs a CUDA device of compute capability >= 10.0 and block_size 32, got "
            f"device {a_data.device} and block_size {block_size}"
        )
    if backend == "scaled_mm" or (backend == "auto" and hardware):
        return mx_gemm_scaled_mm(a_data, a_scale, b_data, b_scale, out_dtype)
    return mx_gemm_ref(a_data, a_scale, b_data, b_scale, block_size, out_dtype)
