"""Scale-invariant logit coefficients (arXiv 2505.17083, Eq. 16), checked.

For a query at position i and a key at position j, t = i - j >= 0 and the logit is `a_t * S + m_t`, with
S = q.k / sqrt(d). The paper's one-parameter form is

    a_t = sqrt(1 + 2 log(1 + t/tau)),    m_t = -2 log(1 + t/tau)      (so m_t + a_t^2 = 1)

and the general family, valid for beta >= alpha log(alpha), has m_t = beta/alpha - a_t^2 with
E[exp(L_t)] (1 + t/tau) = alpha and E[L_t exp(L_t)] (1 + t/tau) = beta for L_t with S ~ N(0, 1).
The formula lives once, in `shared_kernels.si_attention.si_coefficients`; this is its validated public form.
m_t reaches about -17.6 at t = 64k, so the coefficients are computed in fp32 (or fp64) whatever q's dtype.
"""

from __future__ import annotations

import torch

from shared_kernels.si_attention import check_si_family, si_coefficients


def coefficients(
    t: torch.Tensor | int | float,
    tau: float = 10.0,
    alpha: float | None = None,
    beta: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multiplier a_t and offset m_t of scale-invariant attention for distances t.

    Args:
        t: distances query position - key position (any shape; tensor or number), t >= 0.
        tau: the scale tau > 0 (the paper's best is 10).
        alpha, beta: the general family's targets (both or neither); None gives the one-parameter form.
        dtype: float32 (default) or float64; never lower, since m_t needs the range.
    Returns:
        (a, m), each with t's shape, in `dtype`, on t's device.
    """
    check_si_family(tau, alpha, beta)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    t = torch.as_tensor(t).to(dtype)
    if bool((t < 0).any()):
        raise ValueError("t must be >= 0 (distances from a query back to the keys it sees)")
    return si_coefficients(t, tau, alpha, beta)
