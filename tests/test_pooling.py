"""Average pooling (funnel) and max pooling (SurVAE surjection) against the obligations of docs/mathematics.md section 12."""

import math

import pytest
import torch
import torch.nn as nn

from flowconvert import LayerConfigurationError
from flowconvert.pooling import FlowAvgPool, FlowMaxPool, helmert, to_windows
from obligations import base_log_prob, grid_integral

# (module, per-sample input shape)
AVG = {
    "avg1d": (nn.AvgPool1d(3), (2, 6)),
    "avg2d": (nn.AvgPool2d(2), (3, 4, 6)),
    "avg2d_rect": (nn.AvgPool2d((1, 3), stride=(1, 3)), (2, 2, 6)),
    "avg2d_divisor": (nn.AvgPool2d(2, divisor_override=3), (2, 4, 4)),
    "adaptive1d": (nn.AdaptiveAvgPool1d(2), (3, 8)),
    "adaptive2d_global": (nn.AdaptiveAvgPool2d(1), (4, 3, 3)),
    "adaptive2d_none": (nn.AdaptiveAvgPool2d((None, 2)), (2, 3, 4)),
}
MAX = {
    "max1d": (nn.MaxPool1d(2), (3, 8)),
    "max2d": (nn.MaxPool2d(2), (3, 4, 6)),
    "max2d_rect": (nn.MaxPool2d((2, 1)), (2, 4, 3)),
}
ALL = {**AVG, **MAX}


def build(name, dtype=torch.float64, seed=0):
    module, shape = ALL[name]
    cls = FlowAvgPool if name in AVG else FlowMaxPool
    flow = cls.from_module(module, shape).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make the densities of the dropped parts matter
        if isinstance(flow, FlowAvgPool):
            for p in flow.dropped.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=dtype))
        else:
            flow.gap_log_scale.copy_(0.3 * torch.randn(flow.channels, generator=g, dtype=dtype))
    return module, shape, flow


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch", [1, 4])
def test_equals_original(name, dtype, atol, batch):
    module, shape, flow = build(name, dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    y, ll = flow.call_and_ll(x)
    assert torch.equal(y, module(x)) and torch.equal(flow(x), module(x))
    assert ll.shape == (batch,) and torch.isfinite(ll).all() and ll.dtype == dtype


def test_helmert_completes_the_mean_direction():
    for k in (1, 2, 3, 7):
        Q = torch.cat([torch.full((1, k), 1 / math.sqrt(k), dtype=torch.float64), helmert(k)])
        torch.testing.assert_close(Q @ Q.T, torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("name", list(AVG))
def test_avgpool_logdet_matches_jacobian_of_split_map(name):
    # x -> (y, d) is a bijection; its log|det| is L - log q(d | y)
    _, shape, flow = build(name)
    x = torch.randn(2, *shape, dtype=torch.float64)
    y, ll = flow.call_and_ll(x)
    logq = flow.dropped.log_prob(flow.dropped_rows(flow.dropped_coordinates(x)), flow.output_rows(y))
    for i in range(2):
        split = lambda v: torch.cat(
            [flow(v.reshape(1, *shape)).reshape(-1), flow.dropped_coordinates(v.reshape(1, *shape)).reshape(-1)]
        )
        J = torch.autograd.functional.jacobian(split, x[i].reshape(-1))
        logdet = torch.linalg.slogdet(J)[1]
        assert abs(logdet.item()) > 0.1
        torch.testing.assert_close(ll[i] - logq[i], logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(MAX))
def test_maxpool_contribution_by_hand(name):
    _, shape, flow = build(name)
    x = torch.randn(3, *shape, dtype=torch.float64)
    y, ll = flow.call_and_ll(x)
    w = to_windows(x, flow.kernel)  # (B, C, *out, K)
    K = flow.window
    expected = torch.zeros(3, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in w.shape[:-1]]):
        b, c = idx[0].item(), idx[1].item()
        v = w[tuple(idx.tolist())]
        others = torch.cat([v[: v.argmax()], v[v.argmax() + 1 :]])
        s = flow.gap_log_scale[c].exp()
        g = v.max() - others  # the map x -> (max, others) has unit Jacobian
        expected[b] += -math.log(K) + (math.log(2) - 0.5 * (g / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)).sum()
    torch.testing.assert_close(ll, expected, atol=1e-10, rtol=0)


def _density(flow, shape):
    def log_p(points):
        x = points.reshape(-1, *shape)
        y, ll = flow.call_and_ll(x)
        return base_log_prob(y) + ll

    return log_p


@pytest.mark.parametrize(
    "module,shape,points",
    [
        (nn.AvgPool1d(2), (1, 2), 400),
        (nn.AvgPool1d(3), (1, 3), 90),
        (nn.AdaptiveAvgPool2d(1), (1, 1, 2), 400),
        (nn.MaxPool1d(2), (1, 2), 400),
        (nn.MaxPool1d(3), (1, 3), 90),
        (nn.MaxPool2d((1, 2)), (1, 1, 2), 400),
    ],
    ids=["avg2", "avg3", "adaptive2", "max2", "max3", "max2d"],
)
def test_integrates_to_one(module, shape, points):
    flow = (FlowMaxPool if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)) else FlowAvgPool).from_module(module, shape)
    flow = flow.double()
    with torch.no_grad():
        if isinstance(flow, FlowAvgPool):
            flow.dropped.weight.fill_(0.6)
            flow.dropped.bias.fill_(-0.3)
            flow.dropped.log_scale.fill_(-0.4)
        else:
            flow.gap_log_scale.fill_(-0.3)
    dim = math.prod(shape)
    total = grid_integral(_density(flow, shape), [(-7.0, 7.0)] * dim, points=points)
    assert abs(total - 1.0) < 5e-3, total


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_of_inverse_is_identity(name, dtype, batch):
    _, shape, flow = build(name, dtype)
    y = flow(torch.randn(batch, *shape, dtype=dtype))
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=1e-12, rtol=0)
    for sample in (False, True):
        x = flow.inverse(y, sample=sample)
        assert x.shape == (batch, *shape)
        torch.testing.assert_close(flow(x), y, **tol)
    noise = flow.draw_inverse_noise(y)
    a, b = flow.inverse(y, sample=True, noise=noise), flow.inverse(y, sample=True, noise=noise)
    assert torch.equal(a, b) and not torch.equal(a, flow.inverse(y, sample=True))


def test_maxpool_inverse_samples_every_position():
    flow = FlowMaxPool((1, 4), (4,)).double()
    y = torch.zeros(4000, 1, 1, dtype=torch.float64)
    x = flow.inverse(y, sample=True)
    counts = torch.bincount(x.reshape(4000, 4).argmax(-1), minlength=4).double() / 4000
    assert (counts - 0.25).abs().max() < 0.04, counts
    gaps = -x.reshape(4000, 4)
    gaps = gaps[gaps > 0]
    assert abs(gaps.mean().item() - math.sqrt(2 / math.pi)) < 0.03  # half-normal with scale 1


def test_inverse_mean_puts_mean_in_every_window():
    _, shape, flow = build("avg2d")
    y = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        flow.dropped.weight.zero_()
        flow.dropped.bias.zero_()
    torch.testing.assert_close(flow.inverse(y), torch.repeat_interleave(torch.repeat_interleave(y, 2, 2), 2, 3))


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.AvgPool2d(3, stride=2), (1, 5, 5)),
        (nn.AvgPool2d(2, padding=1), (1, 4, 4)),
        (nn.AvgPool2d(2), (1, 5, 4)),
        (nn.MaxPool2d(3, stride=1), (1, 4, 4)),
        (nn.MaxPool2d(2, dilation=2), (1, 8, 8)),
        (nn.MaxPool2d(2, return_indices=True), (1, 4, 4)),
        (nn.AdaptiveAvgPool2d(3), (1, 4, 4)),
        (nn.MaxPool2d(2, padding=1), (1, 4, 4)),
    ],
)
def test_overlapping_padded_or_ragged_pooling_is_refused(module, shape):
    cls = FlowMaxPool if isinstance(module, nn.MaxPool2d) else FlowAvgPool
    with pytest.raises(LayerConfigurationError) as err:
        cls.from_module(module, shape)
    assert err.value.code == "FC214" and "hint" in str(err.value)


def test_density_parameters_get_gradients():
    _, shape, avg = build("avg2d")
    x = torch.randn(4, *shape, dtype=torch.float64)
    y, ll = avg.call_and_ll(x)
    (base_log_prob(y) + ll).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in avg.dropped.parameters())
    _, shape, mx = build("max2d")
    y, ll = mx.call_and_ll(torch.randn(4, *shape, dtype=torch.float64))
    ll.sum().backward()
    assert mx.gap_log_scale.grad.abs().sum() > 0
