"""Named tolerances, one per kind of op (see STYLE.md: Kernels)."""

from __future__ import annotations

import torch


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Bit-for-bit equality (codes, scales, packed bytes). NaNs compare equal to NaNs in the same place."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype} != expected {expected.dtype}")
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype.is_floating_point and a.element_size() in (1, 2, 4, 8):
        # Compare the bit patterns, so -0.0 vs 0.0 and NaN payloads are caught too.
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.contiguous().view(view), e.contiguous().view(view)
    mismatch = a != e
    if bool(mismatch.any()):
        idx = mismatch.nonzero()[0].tolist()
        n = int(mismatch.sum())
        raise AssertionError(
            f"{what}: {n} of {mismatch.numel()} elements differ; first at {idx}: "
            f"{actual.detach().cpu()[tuple(idx)].item()!r} != {expected.detach().cpu()[tuple(idx)].item()!r}"
        )


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, computed in fp64."""
    s = signal.detach().double()
    n = s - approx.detach().double()
    noise = float(n.pow(2).sum())
    power = float(s.pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(power / noise)).item()


def assert_sqnr(signal: torch.Tensor, approx: torch.Tensor, min_db: float, what: str = "tensor") -> float:
    """Quantize-dequantize keeps at least `min_db` dB of SQNR."""
    got = sqnr_db(signal, approx)
    if not got >= min_db:
        raise AssertionError(f"{what}: SQNR {got:.2f} dB below the floor of {min_db:.2f} dB")
    return got


def assert_error_ratio(
    actual: torch.Tensor,
    same_precision: torch.Tensor,
    reference_fp64: torch.Tensor,
    max_ratio: float = 2.0,
    atol: float = 1e-6,
    what: str = "tensor",
) -> float:
    """Fused math vs an fp64 reference: max error at most `max_ratio` x that of a plain torch version in
    the same precision (plus `atol`, for outputs where the plain version is exact)."""
    ref = reference_fp64.detach().double()
    err = float((actual.detach().double() - ref).abs().max())
    base = float((same_precision.detach().double() - ref).abs().max())
    if not err <= max_ratio * base + atol:
        raise AssertionError(
            f"{what}: max error {err:.3e} exceeds {max_ratio} x the same-precision torch error {base:.3e}"
            f" (+ atol {atol:.1e})"
        )
    return err / base if base > 0 else 0.0
