"""The generic conditional slot: any ConditionalDensity may replace a layer's conditional part.

A small non-linear family written here (a Gaussian whose mean and log-scale come from a
tiny tanh MLP of the kept output) replaces the linear-Gaussian parts of FlowLinear,
FlowConv and FlowGroupedConv through ``layer.set_submodule(part.name, new)``. The layers
must then use it in ``call_and_ll`` (through its ``log_prob``) and ``inverse`` (its
``sample`` / ``mean``), on the same code path with and without gradients.

Tolerances: float64 throughout, 1e-10 for identities, integrals within 3e-3 of one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowconvert import FlowConv, FlowGroupedConv, FlowLinear
from flowconvert.densities import ConditionalDensity, ConditionalDiagonalNormal, normal_log_prob, sum_except_batch
from obligations import grid_integral, log_density


class MLPGaussian(ConditionalDensity):
    """q(d | y) = N(mu(y), diag exp(2 s(y))) with (mu, s) = Linear(tanh(Linear(y)))."""

    def __init__(self, features: int, context: int, hidden: int = 5, seed: int = 0):
        super().__init__()
        self.features, self.context_features = features, context
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(context, hidden), nn.Tanh(), nn.Linear(hidden, 2 * features)).double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        self.calls = {"log_prob": 0, "sample": 0}

    def _params(self, y):
        mu, s = self.net(y).chunk(2, -1)
        return mu, 0.3 * torch.tanh(s)  # bounded log-scale keeps the integrals on a small box

    def log_prob(self, d, y):
        self.calls["log_prob"] += 1
        mu, s = self._params(y)
        return sum_except_batch(normal_log_prob(d, mu, s))

    def sample(self, y, eps=None):
        self.calls["sample"] += 1
        mu, s = self._params(y)
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + eps.reshape(mu.shape) * s.exp()

    def mean(self, y):
        return self._params(y)[0]


def replace_conditionals(layer, seed: int = 0) -> list[str]:
    names = []
    for i, part in enumerate(layer.density_parts()):
        if part.kind == "conditional":
            layer.set_submodule(part.name, MLPGaussian(part.features, part.context, seed=seed + i))
            names.append(part.name)
    assert names, "the layer has no conditional part"
    return names


def both_paths(layer, x, noise=None):
    with torch.no_grad():
        fast = layer.call_and_ll(x, noise)
    graph = layer.call_and_ll(x, noise)
    return fast, graph


# -- the declarations and the rows the parts model ---------------------------------------------
LAYERS = {
    "linear_funnel": lambda: (FlowLinear.from_module(nn.Linear(6, 3).double()), (6,)),
    "linear_augment": lambda: (FlowLinear.from_module(nn.Linear(3, 5).double()), (3,)),
    "conv_all_stages": lambda: (
        FlowConv.from_module(nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1).double(), (2, 7, 7)),
        (2, 7, 7),
    ),
    "conv_augment": lambda: (FlowConv.from_module(nn.Conv2d(1, 16, 3, padding=1).double(), (1, 5, 5)), (1, 5, 5)),
    "grouped": lambda: (
        FlowGroupedConv.from_module(nn.Conv2d(4, 6, 3, padding=1, groups=2).double(), (4, 4, 4)),
        (4, 4, 4),
    ),
    "depthwise_dropped": lambda: (
        FlowGroupedConv.from_module(nn.Conv2d(2, 2, 1, stride=2, groups=2).double(), (2, 5, 5)),
        (2, 5, 5),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_observe_gives_rows_of_every_declared_part(name):
    torch.manual_seed(0)
    layer, shape = LAYERS[name]()
    parts = layer.density_parts()
    assert parts
    x = torch.randn(3, *shape, dtype=torch.float64)
    for noise in (None, layer.draw_noise(x)):
        rows = layer.observe(x, noise=noise)
        assert set(rows) == {p.name for p in parts}
        for p in parts:
            module = layer.get_submodule(p.name)
            d, ctx = rows[p.name]
            assert d.dim() == 2 and d.shape[1] == p.features and d.shape[0] % 3 == 0
            if p.kind == "conditional":
                assert isinstance(module, ConditionalDensity) and ctx.shape == (d.shape[0], p.context)
                assert module.features == p.features and module.context_features == p.context
            else:
                assert ctx is None and p.context == 0 and module.features == p.features


@pytest.mark.parametrize("name", ["linear_funnel", "conv_all_stages", "grouped", "depthwise_dropped"])
def test_contribution_uses_the_replacement_log_prob(name):
    """ll(new) - ll(old) == sum over parts of log q_new(rows) - log q_old(rows), on both paths."""
    torch.manual_seed(1)
    layer, shape = LAYERS[name]()
    x = torch.randn(4, *shape, dtype=torch.float64)
    noise = layer.draw_noise(x)
    for eps in (None, noise):
        (_, before), _ = both_paths(layer, x, eps)
        rows = layer.observe(x, noise=eps)
        old = {p.name: layer.get_submodule(p.name) for p in layer.density_parts() if p.kind == "conditional"}
        names = replace_conditionals(layer)
        (y_fast, ll_fast), (y_graph, ll_graph) = both_paths(layer, x, eps)
        expected = before.clone()
        for n in names:
            d, ctx = rows[n]
            new = layer.get_submodule(n)
            per_row = lambda q: q.log_prob(d, ctx).reshape(4, -1).sum(1)
            expected += (per_row(new) - per_row(old[n])).detach()
        torch.testing.assert_close(ll_fast, expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(ll_graph.detach(), expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(y_fast, y_graph.detach(), atol=1e-12, rtol=0)
        for n in names:  # back to the original parts for the next mode
            layer.set_submodule(n, old[n])


def test_linear_logdet_of_the_split_map_with_replacement():
    """For x -> (y, d) (d the rows observe() reports, linear in x) the contribution is
    log|det [W; D]| + log q(d | y) with the replacement q; D read column by column."""
    torch.manual_seed(2)
    layer, _ = LAYERS["linear_funnel"]()
    replace_conditionals(layer)
    x = torch.randn(5, 6, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    D = layer.observe(eye)["dropped"][0].mT  # d = D x (the dropped coordinates carry no bias)
    torch.testing.assert_close(
        layer.observe(torch.zeros(1, 6, dtype=torch.float64))["dropped"][0], torch.zeros(1, 3, dtype=torch.float64)
    )
    J = torch.cat([layer.weight, D])
    logdet = torch.linalg.slogdet(J)[1]
    y, ll = layer.call_and_ll(x)
    d, ctx = layer.observe(x)["dropped"]
    torch.testing.assert_close(ll.detach(), logdet + layer.dropped.log_prob(d, ctx).detach(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,m", [(2, 1), (3, 1), (3, 2)])
def test_linear_with_replacement_integrates_to_one(n, m):
    torch.manual_seed(10 * n + m)
    lin = nn.Linear(n, m).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(m, n, dtype=torch.float64) + 0.3 * torch.randn(m, n, dtype=torch.float64))
    layer = FlowLinear.from_module(lin)
    replace_conditionals(layer, seed=n)
    with torch.no_grad():
        x0 = layer.inverse(torch.zeros(1, m, dtype=torch.float64))[0]
        bounds = [(c - 11.0, c + 11.0) for c in x0.tolist()]
        total = grid_integral(lambda pts: log_density(layer, pts), bounds, points={2: 500, 3: 110}[n])
    assert abs(total - 1.0) < 3e-3, total


def test_conv_with_replacements_integrates_to_one():
    # kernel funnel 2 -> 1 plus one dropped pixel: both conditionals replaced
    torch.manual_seed(3)
    conv = nn.Conv2d(1, 1, (1, 2), stride=(1, 3)).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.3, -0.6]]]], dtype=torch.float64))
    layer = FlowConv.from_module(conv, (1, 1, 3))
    assert layer.exact
    assert replace_conditionals(layer) == ["kernel.dropped", "dropped_pixels"]
    with torch.no_grad():
        total = grid_integral(lambda pts: log_density(layer, pts.reshape(-1, 1, 1, 3)), [(-11.0, 11.0)] * 3, 110)
    assert abs(total - 1.0) < 3e-3, total


@pytest.mark.parametrize("name", ["linear_funnel", "conv_dropped", "grouped_funnel"])
def test_sampled_inverse_with_replacement_reproduces_the_output(name):
    torch.manual_seed(4)
    if name == "linear_funnel":
        layer, shape = LAYERS["linear_funnel"]()
    elif name == "conv_dropped":
        shape = (3, 5, 4)
        layer = FlowConv.from_module(nn.Conv2d(3, 5, 2, stride=2).double(), shape)
    else:
        shape = (2, 4, 4)
        layer = FlowGroupedConv.from_module(nn.Conv2d(2, 4, 2, stride=2, groups=2).double(), shape)
    names = replace_conditionals(layer)
    y = layer(torch.randn(3, *shape, dtype=torch.float64))
    means = layer.inverse(y)
    torch.testing.assert_close(layer(means), y, atol=1e-10, rtol=0)
    eps = layer.draw_inverse_noise(y)
    draws = layer.inverse(y, sample=True, noise=eps)
    assert not torch.allclose(draws, means)
    torch.testing.assert_close(layer.inverse(y, sample=True, noise=eps), draws)  # reproducible
    torch.testing.assert_close(layer(draws), y, atol=1e-10, rtol=0)
    assert all(layer.get_submodule(n).calls["sample"] > 0 for n in names)


def test_fused_path_only_for_the_linear_gaussian_type():
    layer, _ = LAYERS["linear_funnel"]()
    assert layer.fused()

    class Subclass(ConditionalDiagonalNormal):
        def mean(self, y):  # a different mean: a fused pass built from weight/bias would be wrong
            return super().mean(y) + y[..., :1].square()

    sub = Subclass(3, 3).double()
    layer.set_submodule("dropped", sub)
    assert not layer.fused()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        _, ll = layer.call_and_ll(x)
    d, ctx = layer.observe(x)["dropped"]
    logdet = torch.linalg.slogdet(
        torch.cat([layer.weight, layer.observe(torch.eye(6, dtype=torch.float64))["dropped"][0].mT])
    )[1]
    torch.testing.assert_close(ll, logdet + sub.log_prob(d, ctx).detach(), atol=1e-10, rtol=0)
