"""Densities: normalization and agreement with torch.distributions (used only here, in tests)."""

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
