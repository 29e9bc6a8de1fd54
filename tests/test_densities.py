"""Densities: normalization and agreement with torch.distributions (used only here, in tests)."""

import math

import pytest
import torch
from torch.distributions import Normal

from flowconvert import ConditionalDiagonalNormal, DiagonalNormal, GaussianNoise, StandardNormal
from flowconvert.densities import normal_log_prob
from obligations import grid_integral


def test_normal_log_prob_matches_reference():
    x, loc, log_scale = (
        torch.randn(3, 4, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
    )
    torch.testing.assert_close(normal_log_prob(x, loc, log_scale), Normal(loc, log_scale.exp()).log_prob(x))


def test_diagonal_normal_integrates_to_one():
    d = DiagonalNormal((2,)).double()
    with torch.no_grad():
        d.loc.copy_(torch.tensor([0.5, -1.0]))
        d.log_scale.copy_(torch.tensor([-0.2, 0.3]))
    assert abs(grid_integral(d.log_prob, [(-8, 8), (-10, 8)], 600) - 1) < 1e-4


def test_standard_normal_sample_and_dtype():
    base = StandardNormal((2, 3)).double()
    z = base.sample(5)
    assert z.shape == (5, 2, 3) and z.dtype == torch.float64
    torch.testing.assert_close(base.log_prob(z), Normal(0.0, 1.0).log_prob(z).sum((1, 2)))


def test_conditional_normal():
    q = ConditionalDiagonalNormal(2, 3).double()
    with torch.no_grad():
        q.weight.normal_()
        q.log_scale.fill_(-1.0)
    y = torch.randn(4, 3, dtype=torch.float64)
    d = q.sample(y)
    expected = Normal(q.mean(y), q.log_scale.exp()).log_prob(d).sum(1)
    torch.testing.assert_close(q.log_prob(d, y), expected)


@pytest.mark.parametrize("shared", [False, True])
def test_gaussian_noise(shared):
    noise = GaussianNoise(3, shared=shared, init_log_scale=-1.0).double()
    u = noise.scale(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(noise.log_prob(u), Normal(0.0, noise.log_scale.exp()).log_prob(u).sum(1))


def test_the_kink_and_its_log_det_follow_the_definition_at_zero_and_off_it():
    """g_s(d) = d / s below zero, d elsewhere; -n_-(d) log s counts strictly negative entries
    (neither 0.0 nor -0.0); the full-covariance density uses exactly these, and none at s = 1
    (float64, 1e-12)."""
    from flowconvert.densities import ConditionalFullNormal, kinked, minus_negatives

    d = torch.tensor([[-2.0, -0.0, 0.0, 3.0], [1e-300, -1e-300, -5.0, 0.5]], dtype=torch.float64)
    slope = 0.2
    expected = torch.where(d < 0, d / slope, d)
    torch.testing.assert_close(kinked(d, slope), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(kinked(d, torch.tensor(slope, dtype=torch.float64)), expected, rtol=1e-15, atol=0)
    assert minus_negatives(d).tolist() == [-1.0, -2.0]
    q = ConditionalFullNormal(4, 3).double()
    with torch.no_grad():
        q.tril.normal_(0, 0.3)
        q.weight.normal_()
    y = torch.randn(2, 3, dtype=torch.float64)
    # no kink (s = 1, the pass skips it): the plain Gaussian; then the kink, set after a first call
    P = q.precision_factor()
    r = (d - y @ q.weight.T - q.bias) @ P.T
    plain = -0.5 * (r * r).sum(1) - 2 * math.log(2 * math.pi) + P.diagonal().log().sum()
    torch.testing.assert_close(q.log_prob(d, y), plain, rtol=1e-12, atol=1e-12)
    q.set_kink(slope)
    u, log_det = q.warp_and_log_det(d)
    torch.testing.assert_close(u, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(log_det, -(d < 0).sum(1).double() * math.log(slope), rtol=1e-12, atol=0)
    P = q.precision_factor()
    r = (expected - y @ q.weight.T - q.bias) @ P.T
    by_hand = -0.5 * (r * r).sum(1) - 2 * math.log(2 * math.pi) + P.diagonal().log().sum() + log_det
    torch.testing.assert_close(q.log_prob(d, y), by_hand, rtol=1e-12, atol=1e-12)
