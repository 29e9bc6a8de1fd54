"""Reusable checks of the correctness obligations (docs/mathematics.md section 12) for a single flow layer.

Each helper treats a layer with a standard-normal base density on its output, so a
layer's model density is ``p(x) = N(y; 0, I) * exp(L(x))`` (exact layers) or its noise
marginal (bound layers). All helpers work per sample and in float64.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.autograd.functional import hessian, jacobian

from flowconvert.densities import StandardNormal


def base_log_prob(y: torch.Tensor) -> torch.Tensor:
    return StandardNormal(tuple(y.shape[1:])).to(y.dtype).log_prob(y)


def autograd_logdet(layer, x: torch.Tensor) -> torch.Tensor:
    """log|det dy/dx| per sample from the autograd Jacobian of the deterministic forward."""
    out = []
    for xi in x:
        fn = lambda v: layer.call_and_ll(v.reshape(1, *xi.shape))[0].reshape(-1)
        J = jacobian(fn, xi.reshape(-1).clone())
        assert J.shape[0] == J.shape[1], f"not a bijection: Jacobian {tuple(J.shape)}"
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def log_density(layer, x: torch.Tensor) -> torch.Tensor:
    """log p(x) of layer + standard normal base, deterministic mode."""
    y, ll = layer.call_and_ll(x)
    return base_log_prob(y) + ll


def grid_integral(log_p, bounds, points: int) -> float:
    """Midpoint-rule integral of exp(log_p) over a box in 1-3 dimensions.

    ``log_p`` maps ``(N, dim)`` points to ``(N,)`` log-densities.
    """
    axes, cell = [], 1.0
    for lo, hi in bounds:
        h = (hi - lo) / points
        axes.append(lo + h * (torch.arange(points, dtype=torch.float64) + 0.5))
        cell *= h
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(bounds))
    total = 0.0
    for chunk in grid.split(65536):
        total += log_p(chunk).exp().sum().item()
    return total * cell


def gaussian_marginal_log_prob(layer, x: torch.Tensor) -> torch.Tensor:
    """Exact log of the noise marginal ``E_eps[N(y; 0, I) exp(L(x, eps))]`` per sample.

    Valid for layers that are affine in their standard-normal noise with a contribution
    quadratic in it (Gaussian augmentation), which is every bound layer here: the integrand
    ``f(eps) = log N(y) + L + log N(eps; 0, I)`` is then exactly quadratic and the integral is
    Gaussian: ``log int exp(f) = f(0) + g^T H^-1 g / 2 + k/2 log 2pi - log det H / 2``.
    """
    out = []
    for xi in x:
        xi = xi.unsqueeze(0)
        shape = layer.noise_shape(tuple(xi.shape[1:]))
        k = math.prod(shape)

        def f(eps):
            e = eps.reshape(1, *shape)
            y, ll = layer.call_and_ll(xi, e)
            return (base_log_prob(y) + ll)[0] - 0.5 * (eps * eps).sum() - 0.5 * k * math.log(2 * math.pi)

        zero = torch.zeros(k, dtype=x.dtype)
        f0 = f(zero)
        g = jacobian(f, zero)
        H = -hessian(f, zero)
        sol = torch.linalg.solve(H, g)
        out.append(f0 + 0.5 * g @ sol + 0.5 * k * math.log(2 * math.pi) - 0.5 * torch.linalg.slogdet(H)[1])
    return torch.stack(out)


def iw_estimate(layer, x: torch.Tensor, k: int) -> torch.Tensor:
    """Importance-weighted estimate ``log mean_k exp(log N(y_k) + L_k)`` with fresh noise."""
    vals = []
    for _ in range(k):
        y, ll = layer.call_and_ll(x, layer.draw_noise(x))
        vals.append(base_log_prob(y) + ll)
    return torch.logsumexp(torch.stack(vals), 0) - math.log(k)


def check_iw_bound(layer, x: torch.Tensor, ks=(1, 8, 64), repeats: int = 200) -> list[float]:
    """Assert the IW estimates never exceed the exact marginal (beyond 4 standard errors) and tighten.

    Returns the mean estimate per K (averaged over samples and repeats).
    """
    exact = gaussian_marginal_log_prob(layer, x)
    means = []
    for k in ks:
        est = torch.stack([iw_estimate(layer, x, k) for _ in range(repeats)])  # (repeats, B)
        mean, se = est.mean(0), est.std(0) / math.sqrt(repeats)
        assert torch.all(mean <= exact + 4 * se + 1e-9), (k, mean, exact, se)
        means.append(mean.mean().item())
    assert all(a < b for a, b in itertools.pairwise(means)), f"IW estimates do not tighten: {means}"
    gap_first, gap_last = exact.mean().item() - means[0], exact.mean().item() - means[-1]
    assert gap_last < gap_first, (gap_first, gap_last)
    return means
