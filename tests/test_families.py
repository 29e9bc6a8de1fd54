"""Density families: normalization, sampling by change of variables, start as the linear Gaussian."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

import flowconvert as fc
from flowconvert.densities import (
    ConditionalDiagonalNormal,
    ConditionalFullNormal,
    ElementwiseConditionalNormal,
    normal_log_prob,
    triangular_inverse,
)
from flowconvert.families import (
    FlowBase,
    FlowConditional,
    GaussianMixture,
    MLPConditionalNormal,
    make_base,
    make_conditional,
)
from flowconvert.pooling import ChannelConditionalNormal
from obligations import grid_integral


def _perturb(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-trivial parameters (as after fitting), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


#: name -> factory(features, context) of a conditional family, perturbed away from its initialisation
CONDITIONALS = {
    "gaussian": lambda f, c: ConditionalDiagonalNormal(f, c),
    "gaussian-full": lambda f, c: ConditionalFullNormal(f, c),
    "elementwise": lambda f, c: ElementwiseConditionalNormal(f),
    "channel": lambda f, c: ChannelConditionalNormal(c, f // c),
    "mlp": lambda f, c: MLPConditionalNormal(f, c, hidden=16),
    "flow-nsf": lambda f, c: FlowConditional(f, c, hidden=(16, 16)),
    "flow-maf": lambda f, c: FlowConditional(f, c, hidden=(16, 16), kind="maf"),
    # kinked coordinates: negative ones compressed by s, as after a LeakyReLU of slope s
    "gaussian-kink": lambda f, c: _kinked(ConditionalFullNormal(f, c), 0.2),
    "mlp-kink": lambda f, c: _kinked(MLPConditionalNormal(f, c, hidden=16), 0.5),
    "flow-nsf-kink": lambda f, c: _kinked(FlowConditional(f, c, hidden=(16, 16)), 0.5),
    # a diagonal precision factor (the richer families beyond FULL_COVARIANCE_MAX coordinates)
    "mlp-diagonal-kink": lambda f, c: _kinked(MLPConditionalNormal(f, c, hidden=16, full=False), 0.5),
    "flow-nsf-diagonal": lambda f, c: FlowConditional(f, c, hidden=(16, 16), full=False),
}


def _kinked(q, slope):
    getattr(q, "linear", q).set_kink(slope)
    return q


def _case(name: str, features: int):
    context = features if name in ("elementwise", "channel") else 2
    if name == "channel":
        context = 1
    torch.manual_seed(0)
    q = _perturb(CONDITIONALS[name](features, context).double())
    y = torch.randn(1, context, dtype=torch.float64)
    return q, y


@pytest.mark.parametrize("name", list(CONDITIONALS))
@pytest.mark.parametrize("features", [1, 2])
def test_conditional_integrates_to_one(name, features):
    q, y = _case(name, features)
    bounds = [(-14.0, 14.0)] * features
    # a kink compresses the negative side by its slope: a sharper density needs a finer grid
    points = 4000 if features == 1 else (600 if "kink" in name else 350)
    total = grid_integral(lambda d: q.log_prob(d, y.expand(d.shape[0], -1)), bounds, points)
    # tolerance: the midpoint rule on a smooth density over a box holding all but ~1e-6 of its mass
    assert abs(total - 1) < 2e-3, total


@pytest.mark.parametrize(
    "name", ["gaussian", "gaussian-full", "mlp", "flow-nsf", "flow-maf", "gaussian-kink", "mlp-kink", "flow-nsf-kink"]
)
def test_conditional_integrates_to_one_in_three_dims(name):
    q, y = _case(name, 3)
    # importance sampling from a wide Gaussian proposal: E[q / r] = 1
    g = torch.Generator().manual_seed(1)
    n, s = 50_000, 3.0
    d = s * torch.randn(n, 3, generator=g, dtype=torch.float64) + q.mean(y).detach()
    log_r = normal_log_prob(d, q.mean(y).detach(), math.log(s)).sum(1)
    with torch.no_grad():
        w = (q.log_prob(d, y.expand(n, -1)) - log_r).exp()
    est, se = w.mean().item(), w.std().item() / math.sqrt(n)
    assert abs(est - 1) < 4 * se + 1e-3, (est, se)


@pytest.mark.parametrize("name", list(CONDITIONALS))
def test_sampling_is_the_change_of_variables_of_log_prob(name):
    """log q(sample(y, eps) | y) == log N(eps) - log|d sample / d eps| (float64, autograd Jacobian)."""
    q, y = _case(name, 2)
    for seed in range(3):
        eps = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        fn = lambda e: q.sample(y, e.reshape(1, 2)).reshape(-1)
        J = jacobian(fn, eps)
        d = fn(eps).reshape(1, 2)
        expected = normal_log_prob(eps).sum() - torch.linalg.slogdet(J)[1]
        torch.testing.assert_close(q.log_prob(d, y)[0], expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", list(CONDITIONALS))
def test_mean_is_the_image_of_zero_noise_and_batches_broadcast(name):
    q, _ = _case(name, 2)
    y = torch.randn(4, 3, q.context_features, dtype=torch.float64)
    zero = torch.zeros(4, 3, q.features, dtype=torch.float64)
    torch.testing.assert_close(q.mean(y), q.sample(y, zero))
    d = q.sample(y)
    lp = q.log_prob(d, y)
    assert lp.shape == (4,)
    rows = torch.stack([q.log_prob(d[:, j], y[:, j]) for j in range(3)]).sum(0)
    torch.testing.assert_close(lp, rows)


@pytest.mark.parametrize("family", ["mlp", "flow"])
@pytest.mark.parametrize("like", ["gaussian", "elementwise", "channel", "gaussian-kink"])
def test_richer_families_start_as_the_linear_gaussian_they_replace(family, like):
    features = 4
    context = {"gaussian": 3, "elementwise": 4, "channel": 2, "gaussian-kink": 3}[like]
    old = _perturb(CONDITIONALS[like](features, context).double())
    new = make_conditional(family, features, context, like=old)
    assert new.features == features and new.context_features == context
    d = torch.randn(7, features, dtype=torch.float64)
    y = torch.randn(7, context, dtype=torch.float64)
    torch.testing.assert_close(new.log_prob(d, y), old.log_prob(d, y), atol=1e-9, rtol=0)
    torch.testing.assert_close(new.mean(y), old.mean(y), atol=1e-9, rtol=0)


def test_user_callable_family_is_checked():
    q = make_conditional(lambda f, c: MLPConditionalNormal(f, c, hidden=8), 3, 2)
    assert isinstance(q, MLPConditionalNormal)
    with pytest.raises(ValueError, match="features"):
        make_conditional(lambda f, c: ConditionalDiagonalNormal(f + 1, c), 3, 2)
    with pytest.raises(TypeError):
        make_conditional(lambda f, c: torch.nn.Linear(c, f), 3, 2)
    with pytest.raises(ValueError, match="density must be"):
        make_conditional("spline", 3, 2)


# -- bases ----------------------------------------------------------------------------------
BASES = {
    "diagonal": lambda shape: fc.DiagonalNormal(shape),
    "full": lambda shape: fc.FullNormal(shape),
    "mixture": lambda shape: GaussianMixture(shape, components=3),
    "mixture-diagonal": lambda shape: GaussianMixture(shape, components=3, covariance="diagonal"),
    "flow": lambda shape: FlowBase(shape, hidden=(16, 16)),
    "flow-mixture": lambda shape: FlowBase(shape, hidden=(16, 16), prior="mixture", components=3),
}


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("dims", [1, 2])
def test_base_integrates_to_one(name, dims):
    torch.manual_seed(0)
    base = _perturb(BASES[name]((dims,)).double())
    total = grid_integral(base.log_prob, [(-14.0, 14.0)] * dims, 4000 if dims == 1 else 350)
    assert abs(total - 1) < 2e-3, total


@pytest.mark.parametrize("name", list(BASES))
def test_base_sampling_and_temperature(name):
    torch.manual_seed(0)
    base = _perturb(BASES[name]((2, 3)).double())
    z = base.sample(500)
    assert z.shape == (500, 2, 3) and z.dtype == torch.float64 and torch.isfinite(base.log_prob(z)).all()
    # temperature scales every standard-normal draw: at T = 0 only the modes' images remain
    cold = base.sample(50, temperature=0.0)
    modes = getattr(getattr(base, "prior", None) or base, "components", 1)
    assert torch.unique(cold.reshape(50, -1).round(decimals=9), dim=0).shape[0] <= modes
    # lower temperature concentrates the samples: smaller spread around the T = 0 points
    spread = lambda T: (base.sample(500, temperature=T) - cold[:1]).square().mean().item()
    if "mixture" not in name:
        assert spread(0.5) < spread(1.0)


def test_mixture_em_finds_clusters_and_sampling_matches():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-4.0, 0.0], [4.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    k = torch.randint(3, (3000,), generator=g)
    x = centers[k] + 0.5 * torch.randn(3000, 2, generator=g, dtype=torch.float64)
    m = GaussianMixture((2,), components=3).double()
    diag = fc.DiagonalNormal((2,)).double()
    with torch.no_grad():
        diag.loc.copy_(x.mean(0))
        diag.log_scale.copy_(0.5 * x.var(0).log())
    m.em(x)
    true = torch.logsumexp(normal_log_prob(x[:, None], centers, math.log(0.5)).sum(-1) - math.log(3), 1).mean()
    assert abs(m.log_prob(x).mean() - true) < 0.05
    assert m.log_prob(x).mean() > diag.log_prob(x).mean() + 1.0
    found = m.loc.detach()[m.loc.detach()[:, 0].argsort()]
    torch.testing.assert_close(found, centers[centers[:, 0].argsort()], atol=0.1, rtol=0)


def test_make_base_by_name_and_callable():
    assert isinstance(make_base("mixture", (4,)), GaussianMixture)
    assert isinstance(make_base(lambda s: FlowBase(s), (4,)), FlowBase)
    with pytest.raises(ValueError):
        make_base("nope", (4,))


def test_triangular_inverse_and_full_covariance_round_trip():
    g = torch.Generator().manual_seed(0)
    for F in (1, 2, 3, 5, 8, 13):
        P = torch.tril(torch.randn(F, F, generator=g, dtype=torch.float64), -1) + torch.diag(
            torch.rand(F, generator=g, dtype=torch.float64) + 0.5
        )
        torch.testing.assert_close(triangular_inverse(P) @ P, torch.eye(F, dtype=torch.float64))
    q = ConditionalFullNormal(3, 2).double()
    M = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = M @ M.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    A, c = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    q.write_linear(A, c, cov)
    A2, c2, cov2 = q.read_linear()
    torch.testing.assert_close(cov2, cov)
    y, d = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(y @ A.mT + c, cov).log_prob(d)
    torch.testing.assert_close(q.log_prob(d, y), ref)


def test_coloring_solves_the_precision_factor_and_the_likelihood_never_inverts_it(monkeypatch):
    """``color_rows(P, e) = P^{-1} e`` row by row (1e-12, float64, leading dimensions kept); the
    likelihood of the families around a full precision factor never forms an inverse of it (a
    product-only inverse costs ``2 log2(F)`` ``F x F`` products: seconds at the widths of a CNN)."""
    from flowconvert import densities

    g = torch.Generator().manual_seed(1)
    P = torch.tril(torch.randn(6, 6, generator=g, dtype=torch.float64), -1) + torch.diag(
        torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    )
    eps = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    expected = eps @ triangular_inverse(P).mT
    torch.testing.assert_close(densities.color_rows(P, eps), expected, atol=1e-12, rtol=0)

    def refused(*_):
        raise AssertionError("an inverse of P was formed")

    densities_ = {
        name: _perturb(CONDITIONALS[name](4, 3).double()) for name in ("gaussian-full", "mlp", "flow-nsf", "mlp-kink")
    }
    d, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    monkeypatch.setattr(densities, "triangular_inverse", refused)
    for q in densities_.values():
        assert q.sample(y).shape == d.shape  # a triangular solve, not the product-only inverse (export's)
    monkeypatch.setattr(ConditionalFullNormal, "color", refused)
    for q in densities_.values():
        assert torch.isfinite(q.log_prob(d, y)).all()  # P (u - Ay - c) - mu: no P^{-1} at all


def test_richer_families_have_a_diagonal_factor_beyond_the_full_covariance_size():
    """Up to FULL_COVARIANCE_MAX coordinates P is full; beyond, diagonal: no F x F parameter, a
    closed-form write keeps the residual variances (a covariance's diagonal), and log q is the
    diagonal Gaussian's (1e-10, float64)."""
    from flowconvert.densities import FULL_COVARIANCE_MAX

    assert MLPConditionalNormal(FULL_COVARIANCE_MAX, 2).linear.full
    wide = FlowConditional(FULL_COVARIANCE_MAX + 1, 2, hidden=(8,))
    assert not wide.linear.full and not any("tril" in k for k in wide.state_dict())
    q = MLPConditionalNormal(3, 2, full=False).double()
    g = torch.Generator().manual_seed(2)
    M = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = M @ M.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    A, c = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    q.write_linear(A, c, cov)
    torch.testing.assert_close(q.read_linear()[2], torch.diag(cov.diagonal()), atol=1e-12, rtol=0)
    y, d = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ref = normal_log_prob(d, y @ A.mT + c, 0.5 * cov.diagonal().log()).sum(-1)
    torch.testing.assert_close(q.log_prob(d, y), ref, atol=1e-10, rtol=0)


def test_full_normal_base_fits_mean_and_covariance_in_closed_form():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = M @ M.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = mean + torch.randn(20000, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).mT
    base = fc.FullNormal((3,)).double()
    assert base.fit_closed_form(x)
    ref = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    # atol: the 1e-9 relative jitter the fit adds to the diagonal (log p values of about -5)
    torch.testing.assert_close(base.log_prob(x[:100]), ref.log_prob(x[:100]), atol=1e-6, rtol=0)
    # it beats the diagonal fit on correlated data by the Gaussian's total correlation
    diag = fc.DiagonalNormal((3,)).double()
    diag.fit_closed_form(x)
    gain = 0.5 * (torch.log(torch.diagonal(cov)).sum() - torch.logdet(cov)).item()
    measured = (base.log_prob(x).mean() - diag.log_prob(x).mean()).item()
    assert abs(measured - gain) < 0.02, (measured, gain)
    # sampling colours the draw: the sample covariance is the fitted one
    s = base.sample(20000)
    torch.testing.assert_close(torch.cov(s.T), cov, atol=0.15 * cov.abs().max().item(), rtol=0)


def test_full_covariance_mixture_beats_the_diagonal_one_on_tilted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-4.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
    tilt = torch.tensor([[1.0, 0.9], [0.0, 0.3]], dtype=torch.float64)  # correlated within each cluster
    k = torch.randint(2, (4000,), generator=g)
    x = centers[k] + torch.randn(4000, 2, generator=g, dtype=torch.float64) @ tilt.mT
    full = GaussianMixture((2,), components=2).double()
    diag = GaussianMixture((2,), components=2, covariance="diagonal").double()
    full.em(x)
    diag.em(x)
    cov = tilt @ tilt.mT
    true = torch.logsumexp(
        torch.distributions.MultivariateNormal(centers, cov).log_prob(x[:, None]) - math.log(2), 1
    ).mean()
    assert abs(full.log_prob(x).mean() - true) < 0.03
    assert full.log_prob(x).mean() > diag.log_prob(x).mean() + 0.3


def test_robust_cholesky_factorizes_semidefinite_covariances():
    from flowconvert.densities import robust_cholesky

    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    cov = v @ v.mT  # rank one: a plain Cholesky fails
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(cov)
    L = robust_cholesky(cov)
    assert torch.isfinite(L).all() and (L.diagonal() > 0).all()
    # a positive-definite matrix is factorized as it is
    M = cov + torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(robust_cholesky(M), torch.linalg.cholesky(M))


@pytest.mark.parametrize("density", ["mlp", "flow"])
def test_choosing_the_family_a_flow_already_has_keeps_what_it_learned(density):
    from flowconvert.families import use_densities

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LeakyReLU(0.2), torch.nn.Linear(4, 2)).eval()
    x = torch.randn(200, 6)
    flow = fc.convert(model, x[:2], density=density)
    fc.calibrate(flow, x)
    _perturb(flow, 0.05, seed=1)  # as after fitting: not what a fresh family would start from
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    ids = {name: id(m) for name, m in flow.named_modules()}
    use_densities(flow, density)
    after = flow.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert ids == {name: id(m) for name, m in flow.named_modules()}
    use_densities(flow, density, base="standard")  # another base: replaced, the conditionals kept
    assert type(flow.bases[next(iter(flow.bases))]).__name__ == "StandardNormal"
    kept = flow.state_dict()
    assert all(torch.equal(before[k], kept[k]) for k in kept if not k.startswith("bases"))
