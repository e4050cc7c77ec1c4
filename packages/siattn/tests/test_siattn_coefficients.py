"""The coefficient identities and the distributional properties of REFERENCE section 1."""

import math

import numpy as np
import pytest
import torch

from siattn import coefficients

TS = torch.tensor([0.0, 1.0, 3.0, 10.0, 97.0, 1e3, 65536.0, 1e6], dtype=torch.float64)


def test_identities_of_the_one_parameter_form():
    a, m = coefficients(TS, tau=10.0, dtype=torch.float64)
    assert a[0].item() == 1.0 and m[0].item() == 0.0
    torch.testing.assert_close(m + a**2, torch.ones_like(a), rtol=0, atol=1e-12)
    assert (a[1:] > a[:-1]).all() and (m[1:] < m[:-1]).all()


def test_fp32_by_default_and_m_range_at_64k():
    a, m = coefficients(torch.tensor([65536]))
    assert a.dtype == m.dtype == torch.float32
    assert m.item() == pytest.approx(-2 * math.log1p(65536 / 10), rel=1e-6)
    assert m.item() == pytest.approx(-17.6, abs=0.05)


def test_general_family_at_sqrt_e_matches_the_one_parameter_form():
    e = math.exp(0.5)
    a1, m1 = coefficients(TS, tau=7.0, dtype=torch.float64)
    a2, m2 = coefficients(TS, tau=7.0, alpha=e, beta=e, dtype=torch.float64)
    torch.testing.assert_close(a2, a1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(m2, m1, rtol=1e-14, atol=1e-14)


def _gauss_hermite_expectations(a, m, n=240):
    """E[exp(L)] and E[L exp(L)] for L = a S + m, S ~ N(0, 1), by Gauss-Hermite quadrature in fp64."""
    x, w = np.polynomial.hermite.hermgauss(n)
    s = math.sqrt(2.0) * x
    logits = a[:, None] * s[None, :] + m[:, None]
    e = np.exp(logits)
    return (e * w).sum(1) / math.sqrt(math.pi), (logits * e * w).sum(1) / math.sqrt(math.pi)


@pytest.mark.parametrize(
    "alpha,beta", [(math.exp(0.5), math.exp(0.5)), (1.0, 0.3), (2.0, 2.0 * math.log(2.0) + 0.5)]
)
def test_gauss_hermite_targets_hold_for_every_t(alpha, beta):
    tau = 10.0
    a, m = coefficients(TS, tau=tau, alpha=alpha, beta=beta, dtype=torch.float64)
    e_exp, e_lexp = _gauss_hermite_expectations(a.numpy(), m.numpy())
    growth = 1.0 + TS.numpy() / tau
    np.testing.assert_allclose(e_exp * growth, alpha, rtol=1e-11)
    np.testing.assert_allclose(e_lexp * growth, beta, rtol=1e-9, atol=1e-11)


def test_range_mass_is_constant_across_scales_and_unscaled_mass_grows():
    tau, alpha = 10.0, math.exp(0.5)
    expected = {10: 6.82, 100: 10.70, 1000: 11.35, 10000: 11.42}
    for T, value in expected.items():
        t = torch.arange(T, 2 * T, dtype=torch.float64)
        a, m = coefficients(t, tau=tau, dtype=torch.float64)
        e_exp, _ = _gauss_hermite_expectations(a.numpy(), m.numpy(), n=120)
        mass = e_exp.sum()
        assert mass == pytest.approx(value, abs=0.006), T
        harmonic = mass / (alpha * tau)  # sum_k 1/(k/tau + 1)/tau
        lower = math.log((2 * T + tau) / (T + tau))
        upper = math.log((2 * T - 1 + tau) / (T + tau - 1))
        assert lower - 1e-12 <= harmonic <= upper + 1e-12
        assert mass < alpha * tau * math.log(2) + 1e-9  # the limit 11.428 from below
        ones, zeros = np.ones(T), np.zeros(T)
        unscaled, _ = _gauss_hermite_expectations(ones, zeros, n=120)  # a_t = 1, m_t = 0
        assert unscaled.sum() == pytest.approx(T * math.exp(0.5), rel=1e-12)  # grows linearly with T


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(alpha=2.0, beta=1.0), "beta"),
        (dict(alpha=2.0), "together"),
        (dict(alpha=-1.0, beta=1.0), "alpha"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coefficients(torch.arange(4), **kwargs)


def test_negative_t_and_low_precision_dtype_raise():
    with pytest.raises(ValueError, match="t must be"):
        coefficients(torch.tensor([-1.0]))
    with pytest.raises(TypeError, match="dtype"):
        coefficients(torch.arange(3), dtype=torch.bfloat16)
