"""Families inside converted flows: convert(density=...), calibrate and fit per family, declared
parts of pooling/merging, temperature, ONNX parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flowconvert as fc
from flowconvert.densities import FULL_COVARIANCE_MAX, ConditionalFullNormal, FullNormal
from flowconvert.families import FlowBase, FlowConditional, GaussianMixture, MLPConditionalNormal

FAMILIES = ["gaussian", "mlp", "flow"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU(0.3), nn.Linear(4, 2))


def _data(n: int, seed: int) -> torch.Tensor:
    """Correlated, skewed 6-d data: the dropped coordinates depend on the kept ones nonlinearly."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    x = torch.cat([z, z[:, :1] ** 2, torch.tanh(2 * z[:, 1:2]), 0.3 * torch.randn(n, 1, generator=g)], 1)
    return x @ torch.randn(6, 6, generator=torch.Generator().manual_seed(99)) + 0.5


class _PoolNet(nn.Module):
    """Average and max pooling, a residual sum (fan-out + sum): every pooling/merging density part."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2, stride=2)
        self.act = nn.LeakyReLU(0.5)
        self.avg = nn.AvgPool2d(2)
        self.max = nn.MaxPool2d(2)

    def forward(self, x):
        h = self.act(self.conv(x.reshape(-1, 1, 8, 8)))  # (2, 4, 4)
        h = h + self.act(h)  # fan-out and a sum
        return torch.cat([self.avg(h), self.max(h)], 1).flatten(1)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 4, 4, generator=g)
    img = nn.functional.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    return (img + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).reshape(n, 64)


def test_default_is_gaussian_with_full_covariances_where_they_are_small():
    flow = fc.convert(_mlp(), torch.randn(2, 6))
    # a linear layer's few dropped inputs and a small output: full covariances, fitted in closed form
    assert all(type(b) is GaussianMixture and b.full for b in flow.bases.values())
    assert type(flow.layers["_0"].dropped) is ConditionalFullNormal
    # beyond FULL_COVARIANCE_MAX coordinates: diagonal, and the linear layer keeps its fused residual
    wide = fc.convert(
        nn.Linear(FULL_COVARIANCE_MAX + 10, FULL_COVARIANCE_MAX + 1), torch.randn(2, FULL_COVARIANCE_MAX + 10)
    )
    assert type(next(iter(wide.layers.values())).dropped) is ConditionalFullNormal  # 9 dropped inputs
    narrow = fc.convert(nn.Linear(FULL_COVARIANCE_MAX + 2, 1), torch.randn(2, FULL_COVARIANCE_MAX + 2))
    assert (
        type(next(iter(narrow.layers.values())).dropped) is fc.ConditionalDiagonalNormal
        and next(iter(narrow.layers.values())).fused()
    )
    assert all(type(b) is fc.DiagonalNormal for b in wide.bases.values())  # beyond MIXTURE_MAX: one Gaussian


@pytest.mark.parametrize("density", FAMILIES)
def test_convert_with_each_family_keeps_outputs_and_round_trips(density):
    net = _mlp()
    x = torch.randn(5, 6)
    flow = fc.convert(net, x[:2], density=density)
    expected = {"gaussian": ConditionalFullNormal, "mlp": MLPConditionalNormal, "flow": FlowConditional}[density]
    assert all(
        type(layer.get_submodule(p.name)) is expected
        for layer in flow.layers.values()
        for p in layer.density_parts()
        if p.kind == "conditional"
    )
    base = {"gaussian": GaussianMixture, "mlp": GaussianMixture, "flow": FlowBase}[density]
    assert all(type(b) is base for b in flow.bases.values())
    with torch.no_grad():
        assert torch.equal(flow(x), net(x))
        y = flow(x)
        for T in (1.0, 0.5):
            back = flow.inverse(y, sample=True, temperature=T)
            torch.testing.assert_close(flow(back), y, atol=1e-5, rtol=1e-5)
        assert flow.sample(7, temperature=0.7).shape == (7, 6)


def test_temperature_scales_every_standard_normal_draw():
    flow = fc.convert(_mlp(), torch.randn(2, 6), density="flow")
    y = torch.randn(3, 2)
    eps = {k: torch.randn(3, *s) for k, s in flow.inverse_noise_shapes().items()}
    with torch.no_grad():
        hot = flow.inverse(y, sample=True, noise=eps, temperature=0.3)
        ref = flow.inverse(y, sample=True, noise={k: 0.3 * v for k, v in eps.items()})
        cold = flow.inverse(y, sample=True, noise=eps, temperature=0.0)
        mean = flow.inverse(y, sample=False)
    torch.testing.assert_close(hot, ref)
    torch.testing.assert_close(cold, mean)  # T = 0: the image of zero noise, the deterministic inverse


def test_user_callable_family_is_used_and_reported_as_not_calibrated():
    made = []

    class Laplace(fc.densities.ConditionalDensity):
        def __init__(self, f, c):
            super().__init__()
            self.features, self.context_features = f, c
            self.loc = nn.Linear(c, f)
            self.log_b = nn.Parameter(torch.zeros(f))

        def log_prob(self, d, y):
            return (
                (-(d - self.loc(y)).abs() / self.log_b.exp() - self.log_b - 0.6931471805599453)
                .reshape(d.shape[0], -1)
                .sum(1)
            )

        def sample(self, y, eps=None):
            mu = self.loc(y)
            eps = torch.randn_like(mu) if eps is None else eps
            u = torch.special.ndtr(eps) - 0.5  # a standard-normal draw mapped to Laplace by its quantile
            return mu - self.log_b.exp() * u.sign() * torch.log1p(-2 * u.abs())

    def family(f, c):
        made.append((f, c))
        return Laplace(f, c)

    flow = fc.convert(_mlp(), torch.randn(2, 6), density=family)
    assert made == [(2, 4), (2, 2)]
    x = _data(600, 0)
    report = fc.calibrate(flow, x)
    names = {p.name for p in report.not_calibrated}
    assert names == {"layers._0.dropped", "layers._2.dropped"}, str(report)
    assert "no closed form" in str(report)
    before = fc.log_likelihood(flow, x[:200]).mean()
    fc.fit(flow, x[200:], val_data=x[:200], epochs=4, lr=1e-2, progress=False)
    assert fc.log_likelihood(flow, x[:200]).mean() > before


def test_pooling_and_merging_parts_are_declared_calibrated_and_fitted():
    x, held = _images(800, 0), _images(300, 1)
    torch.manual_seed(0)
    net = _PoolNet()
    flow = fc.convert(net, x[:2])
    kinds = {
        (p.kind, type(layer.get_submodule(p.name)).__name__)
        for layer in flow.layers.values()
        for p in layer.density_parts()
    }
    assert {
        ("conditional", "ChannelConditionalNormal"),
        ("gaps", "HalfNormal"),
        ("conditional", "ElementwiseConditionalNormal"),
        ("noise", "GaussianNoise"),
    } <= kinds, kinds
    out = flow(held)
    report = fc.calibrate(flow, x)
    by_kind = {}
    for p in report.parts:
        by_kind.setdefault(p.kind, []).append(p)
    assert not report.not_calibrated, str(report)
    for kind in ("conditional", "gaps", "base"):
        assert any(p.updated for p in by_kind[kind]), str(report)
        assert all(p.heldout_after >= p.heldout_before for p in by_kind[kind]), str(report)
    assert "noise" in by_kind
    assert report.heldout_after > report.heldout_before
    assert torch.equal(flow(held), out)


@pytest.mark.parametrize("density", FAMILIES)
def test_calibrate_never_lowers_heldout_log_p_and_richer_families_start_from_it(density):
    x, held = _data(1500, 0), _data(500, 1)
    flow = fc.convert(_mlp(), x[:2], density=density, base="diagonal")
    before = fc.log_likelihood(flow, held).mean().item()
    report = fc.calibrate(flow, x, val_data=held)
    after = fc.log_likelihood(flow, held).mean().item()
    assert report.heldout_after >= report.heldout_before and after >= before - 1e-6
    assert not report.not_calibrated, str(report)
    # a richer family starts from a calibrated linear Gaussian (full covariance for "mlp"/"flow"):
    # never below the diagonal "gaussian" family after calibration
    reference = fc.convert(_mlp(), x[:2], density="gaussian", base="diagonal")
    fc.calibrate(reference, x, val_data=held)
    ref = fc.log_likelihood(reference, held).mean().item()
    assert after >= ref - 1e-4 if density != "gaussian" else abs(after - ref) < 1e-4
    # calibrating again changes nothing for the worse, also after fitting moved a richer family
    if density != "gaussian":
        fc.fit(flow, x, val_data=held, epochs=3, lr=3e-3, progress=False)
        fitted = fc.log_likelihood(flow, held).mean().item()
        again = fc.calibrate(flow, x, val_data=held)
        assert again.heldout_after >= again.heldout_before
        assert fc.log_likelihood(flow, held).mean().item() >= fitted - 1e-5


@pytest.mark.parametrize("density", ["mlp", "flow"])
def test_fit_densities_improves_richer_families_and_keeps_the_network(density):
    x, held = _data(1500, 0), _data(500, 1)
    net = _mlp()
    flow = fc.convert(net, x[:2], density=density)
    fc.calibrate(flow, x, val_data=held)
    start = fc.log_likelihood(flow, held).mean().item()
    out = flow(held)
    epochs = 15 if density == "mlp" else 5  # a spline step costs ~20x a Gaussian one
    history = fc.fit(flow, x, val_data=held, epochs=epochs, lr=3e-3 if density == "mlp" else 1e-2, progress=False)
    assert torch.equal(flow(held), out)
    end = fc.log_likelihood(flow, held).mean().item()
    # the data's dropped part depends nonlinearly on the kept part: a richer family gains
    assert end > start + 0.05, (start, end, history.val_bpd)


def test_mixture_base_calibrated_by_em_on_clustered_outputs():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 2, generator=g)
    k = torch.randint(5, (2000,), generator=g)
    x = torch.cat([centers[k] + 0.3 * torch.randn(2000, 2, generator=g), torch.randn(2000, 4, generator=g)], 1)
    net = nn.Sequential(nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(6)[:2])
        net[0].bias.zero_()
    flow_diag = fc.convert(net, x[:2], base="gaussian")  # one Gaussian
    flow_mix = fc.convert(net, x[:2])  # the default: a mixture
    rep_diag, rep_mix = fc.calibrate(flow_diag, x), fc.calibrate(flow_mix, x)
    assert rep_mix.heldout_after > rep_diag.heldout_after + 1.0, (str(rep_diag), str(rep_mix))


@pytest.mark.parametrize("density", FAMILIES)
@pytest.mark.parametrize("graph", ["likelihood", "inverse"])
def test_onnx_parity_for_every_family(density, graph, tmp_path):
    pytest.importorskip("onnxruntime")
    x = _data(200, 0)
    flow = fc.convert(_mlp(), x[:2], density=density)
    fc.calibrate(flow, x)
    fc.fit(flow, x, epochs=1, lr=1e-2, progress=False)  # move every family off its initialisation
    res = fc.export_onnx(flow, tmp_path / f"{density}_{graph}.onnx", x[:4], graph=graph, noise="input")
    assert max(res.max_abs_diff.values()) < 1e-3, res.max_abs_diff


@pytest.mark.parametrize("graph", ["likelihood", "inverse"])
def test_onnx_parity_with_kinked_full_covariances(graph, tmp_path):
    """The gaussian family's full-covariance, kinked conditional and the single full base export as they compute."""
    pytest.importorskip("onnxruntime")
    x = _data(200, 0)
    flow = fc.convert(_mlp(), x[:2], base="gaussian")
    fc.calibrate(flow, x)
    for layer in flow.layers.values():
        if isinstance(getattr(layer, "dropped", None), ConditionalFullNormal):
            layer.dropped.set_kink(0.3)  # the slope of the LeakyReLU before the second linear layer
    assert any(abs(float(m.kink) - 0.3) < 1e-6 for m in flow.modules() if isinstance(m, ConditionalFullNormal))
    assert all(isinstance(b, FullNormal) for b in flow.bases.values())
    res = fc.export_onnx(flow, tmp_path / f"kink_{graph}.onnx", x[:4], graph=graph, noise="input")
    assert max(res.max_abs_diff.values()) < 1e-3, res.max_abs_diff
