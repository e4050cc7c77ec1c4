"""Per-layer MX diagnostics: how many elements each cast saturated (clipped) or flushed to zero, and the
amax seen, per tensor role ("input" X, "weight" W, "grad" dY), accumulated over every cast of that role.

Counters stay on the tensors' device (no host sync per step); `summary()` reads them once.
"""

from __future__ import annotations

import torch

from shared_kernels.mx_cast import ELEM_DTYPES, block_view, e8m0_to_fp32

ROLES = ("input", "weight", "grad")
# per role: elements, clipped, flushed, non-zero inputs, blocks, blocks with a clipped element, casts,
# sum over casts of the tensor amax, largest tensor amax
_FIELDS = (
    "elements",
    "clipped",
    "flushed",
    "nonzero",
    "blocks",
    "clipped_blocks",
    "casts",
    "amax_sum",
    "amax_max",
)


class MXStats:
    """Running clip / flush-to-zero / amax counters for one layer."""

    def __init__(self) -> None:
        self.counters: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.counters.clear()

    @torch.no_grad()
    def update(
        self, role: str, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, block_size: int, dim: int
    ) -> None:
        """Count one cast of `x` (any shape) into (data, scale) blocked along `dim`."""
        max_pos, _ = ELEM_DTYPES[data.dtype]
        dim = dim % x.dim()
        xb = block_view(x.to(torch.float32), dim, block_size).abs()  # (..., n_blocks, block_size, ...)
        limit = (e8m0_to_fp32(scale) * max_pos).unsqueeze(dim + 1)
        clipped = xb > limit  # the scaled magnitude exceeded the element maximum: saturated
        zero_code = (block_view(data.view(torch.uint8), dim, block_size) & 0x7F) == 0
        nonzero = xb != 0
        amax = xb.amax() if xb.numel() else xb.new_zeros(())
        row = torch.stack(
            [
                torch.tensor(float(x.numel()), device=x.device),
                clipped.sum().float(),
                (nonzero & zero_code).sum().float(),
                nonzero.sum().float(),
                torch.tensor(float(scale.numel()), device=x.device),
                clipped.any(dim=dim + 1).sum().float(),
                torch.tensor(1.0, device=x.device),
                amax,
                amax,
            ]
        ).double()
        old = self.counters.get(role)
        if old is None:
            self.counters[role] = row
        else:
            new = old + row
            new[-1] = torch.maximum(old[-1], row[-1])
            self.counters[role] = new

    def summary(self) -> dict[str, dict[str, float]]:
        """Per role: clip_fraction (of elements), clipped_block_fraction, flush_fraction (of non-zero
        inputs that became 0), amax_mean and amax_max (over casts), and the raw counts."""
        out: dict[str, dict[str, float]] = {}
        for role, t in self.counters.items():
            c = dict(zip(_FIELDS, t.tolist(), strict=True))
            out[role] = {
                "clip_fraction": c["clipped"] / max(c["elements"], 1.0),
                "clipped_block_fraction": c["clipped_blocks"] / max(c["blocks"], 1.0),
                "flush_fraction": c["flushed"] / max(c["nonzero"], 1.0),
                "amax_mean": c["amax_sum"] / max(c["casts"], 1.0),
                "amax_max": c["amax_max"],
                **c,
            }
        return out


def merge_summaries(summaries: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Pool several layers' `summary()` counts into one per role (fractions recomputed from the counts)."""
    pooled = MXStats()
    for s in summaries:
        for role, c in s.items():
            row = torch.tensor([c[f] for f in _FIELDS], dtype=torch.float64)
            old = pooled.counters.get(role)
            if old is None:
                pooled.counters[role] = row
            else:
                new = old + row
                new[-1] = max(old[-1], row[-1])
                pooled.counters[role] = new
    return pooled.summary()
