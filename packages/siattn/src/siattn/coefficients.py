"""Scale-invariant logit coefficients (arXiv 2505.17083, Eq. 16).

For a query at position i and a key at position j, t = i - j >= 0 and the logit is `a_t * S + m_t`, with
S = q.k / sqrt(d). The paper's one-parameter form is

    a_t = sqrt(1 + 2 log(1 + t/tau)),    m_t = -2 log(1 + t/tau)      (so m_t + a_t^2 = 1)

and the general family, valid for beta >= alpha log(alpha), is

    a_t = sqrt(2 (log(1 + t/tau) - log(alpha) + beta/alpha)),    m_t = beta/alpha - a_t^2,

which makes E[exp(L_t)] (1 + t/tau) = alpha and E[L_t exp(L_t)] (1 + t/tau) = beta for L_t with S ~ N(0, 1).
alpha = beta = e^0.5 recovers the one-parameter form. m_t reaches about -17.6 at t = 64k, so the coefficients
are computed in fp32 (or fp64 when asked) whatever the dtype of q and k.
"""

from __future__ import annotations

import math

import torch


def _check_family(tau: float, alpha: float | None, beta: float | None) -> None:
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if (alpha is None) != (beta is None):
        raise ValueError(f"alpha and beta must be given together, got alpha={alpha!r}, beta={beta!r}")
    if alpha is None:
        return
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if beta < alpha * math.log(alpha):
        raise ValueError(
            f"beta must be >= alpha*log(alpha) = {alpha * math.log(alpha):.6g} (else a_0^2 < 0), got beta={beta!r}"
        )


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
    _check_family(tau, alpha, beta)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    t = torch.as_tensor(t).to(dtype)
    if bool((t < 0).any()):
        raise ValueError("t must be >= 0 (distances from a query back to the keys it sees)")
    return _coefficients(t, tau, alpha, beta)


def _coefficients(
    t: torch.Tensor, tau: float, alpha: float | None, beta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`coefficients` without the checks, for callers whose t >= 0 by construction (no host sync, so
    torch.compile traces it without a graph break)."""
    log_growth = torch.log1p(t / tau)
    if alpha is None:
        a_sq = 1.0 + 2.0 * log_growth
        return a_sq.sqrt(), -2.0 * log_growth
    a_sq = 2.0 * (log_growth - math.log(alpha) + beta / alpha)
    return a_sq.sqrt(), beta / alpha - a_sq
