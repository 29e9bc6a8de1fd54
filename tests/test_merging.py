"""Fan-out (FlowDuplicate), sums (FlowSum), torch.cat/split (FlowCat, FlowSplit) against the obligations of docs/mathematics.md section 12."""

import math

import pytest
import torch

from flowconvert import LayerConfigurationError
from flowconvert.merging import FlowCat, FlowDuplicate, FlowSplit, FlowSum
from obligations import base_log_prob, check_iw_bound, grid_integral

TOL = {torch.float32: dict(atol=1e-5, rtol=0), torch.float64: dict(atol=1e-10, rtol=0)}


class Joined:
    """A multi-output layer seen as one layer whose output is the flattened concatenation (for the IW helpers)."""

    def __init__(self, layer):
        self.layer = layer

    def call_and_ll(self, x, noise=None):
        ys, ll = self.layer.call_and_ll(x, noise)
        return torch.cat([y.reshape(y.shape[0], -1) for y in ys], 1), ll

    def noise_shape(self, shape):
        return self.layer.noise_shape(shape)

    def draw_noise(self, x):
        return self.layer.draw_noise(x)


def make_sum(shape, dtype=torch.float64, subtract=False, seed=0):
    flow = FlowSum(shape, subtract=subtract).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.dropped.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=dtype))
    return flow


# ---- duplicate --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 4])
def test_duplicate_deterministic_copies_are_exact(n, dtype, batch):
    flow = FlowDuplicate(n).to(dtype)
    x = torch.randn(batch, 3, 2, dtype=dtype)
    ys, ll = flow.call_and_ll(x)
    assert len(ys) == n and all(torch.equal(y, x) for y in ys)
    assert ll.shape == (batch,) and ll.dtype == dtype
    # L = D (N/2) log N - log q(0)
    D = 6
    expected = D * (0.5 * n * math.log(n) + (n - 1) * 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(ll, torch.full((batch,), expected, dtype=dtype))


def test_duplicate_logdet_matches_jacobian():
    # (x, v) -> copies is linear; log|det| = D (N/2) log N
    n, D = 3, 2
    flow = FlowDuplicate(n).double()
    with torch.no_grad():
        flow.noise.log_scale.fill_(0.0)  # tau = 1: noise = v

    def copies(z):
        x, eps = z[:D].reshape(1, D), z[D:].reshape(1, D, n - 1)
        return torch.cat(flow.call_and_ll(x, eps)[0], 1).reshape(-1)

    J = torch.autograd.functional.jacobian(copies, torch.randn(D * n, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.slogdet(J)[1], torch.tensor(D * 0.5 * n * math.log(n), dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 3])
def test_duplicate_importance_weighted_bound(n):
    flow = FlowDuplicate(n).double()
    with torch.no_grad():
        flow.noise.log_scale.fill_(0.5)  # wider than the posterior of the noise: a visible gap that K closes
    torch.manual_seed(n)
    check_iw_bound(Joined(flow), torch.randn(2, 2, dtype=torch.float64), repeats=60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5])
def test_duplicate_inverse_of_noisy_forward_is_identity(dtype, batch):
    flow = FlowDuplicate(3).to(dtype)
    x = torch.randn(batch, 4, 2, dtype=dtype)
    ys, _ = flow.call_and_ll(x, flow.draw_noise(x))
    assert not torch.allclose(ys[0], ys[1])
    torch.testing.assert_close(
        flow.inverse(*ys), x, **({"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else TOL[dtype])
    )
    torch.testing.assert_close(flow.inverse(ys), flow.inverse(*ys))  # a tuple is accepted too
    torch.testing.assert_close(sum(ys) / 3, x, **({"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else TOL[dtype]))


def test_duplicate_noise_scale_gets_gradient():
    flow = FlowDuplicate(2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    ys, ll = flow.call_and_ll(x, flow.draw_noise(x))
    (sum(base_log_prob(y) for y in ys) + ll).sum().backward()
    assert flow.noise.log_scale.grad.abs() > 0


#: inverse weights: the copies nearest to the output (one-hot), a mixture, one copy unread out of three
WEIGHTS = [(0.0, 1.0), (0.25, 0.75), (0.2, 0.0, 0.8), (1.0, 1.0, 2.0)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_weighted_duplicate_logdet_matches_jacobian(weights):
    # (x, v) -> c = 1 x + sqrt(N) B^T v, B orthogonal to a: log|det| = D ((N-1)/2 log N - log|a|)
    n, D = len(weights), 2
    flow = FlowDuplicate(n, weights=weights).double()
    a = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    expected = D * (0.5 * (n - 1) * math.log(n) - math.log(a.norm().item()))
    assert flow.log_gain * D == pytest.approx(expected, abs=1e-12)

    def copies(z):
        x, eps = z[:D].reshape(1, D), z[D:].reshape(1, D, n - 1)
        return torch.cat(flow.call_and_ll(x, eps)[0], 1).reshape(-1)

    J = torch.autograd.functional.jacobian(copies, torch.randn(D * n, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.slogdet(J)[1], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_duplicate_inverse_of_noisy_forward_is_identity(weights, dtype):
    n = len(weights)
    flow = FlowDuplicate(n, weights=weights).to(dtype)
    x = torch.randn(5, 4, 2, dtype=dtype)
    ys, _ = flow.call_and_ll(x, flow.draw_noise(x))
    assert not torch.allclose(ys[0], ys[1])
    a = [w / sum(weights) for w in weights]
    torch.testing.assert_close(flow.inverse(*ys), x, **TOL[dtype])
    torch.testing.assert_close(sum(w * y for w, y in zip(a, ys)), x, **TOL[dtype])
    det, _ = flow.call_and_ll(x)
    assert all(torch.equal(y, x) for y in det)  # deterministic copies stay exact


def test_a_copy_of_weight_zero_is_not_read():
    flow = FlowDuplicate(3, weights=(0.5, 0.0, 0.5)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    ys = list(flow.call_and_ll(x, flow.draw_noise(x))[0])
    ys[1] = torch.full_like(x, float("inf"))  # an unread copy whose own inverse path overflowed
    torch.testing.assert_close(flow.inverse(*ys), x, **TOL[torch.float64])
    one_hot = FlowDuplicate(2, weights=(0.0, 1.0)).double()
    assert torch.equal(one_hot.inverse(torch.full_like(x, float("nan")), x), x)


@pytest.mark.parametrize("weights", [(0.0, 1.0), (0.2, 0.0, 0.8)])
def test_weighted_duplicate_importance_weighted_bound(weights):
    flow = FlowDuplicate(len(weights), weights=weights).double()
    with torch.no_grad():
        flow.noise.log_scale.fill_(0.5)
    torch.manual_seed(len(weights))
    check_iw_bound(Joined(flow), torch.randn(2, 2, dtype=torch.float64), repeats=60)


def test_uniform_weights_are_the_mean():
    x = torch.randn(3, 4, dtype=torch.float64)
    plain, even = FlowDuplicate(3).double(), FlowDuplicate(3, weights=(2.0, 2.0, 2.0)).double()
    noise = plain.draw_noise(x)
    (ya, la), (yb, lb) = plain.call_and_ll(x, noise), even.call_and_ll(x, noise)
    assert all(torch.equal(a, b) for a, b in zip(ya, yb)) and torch.equal(la, lb)
    assert "weights" not in repr(even) and "weights=(0.0, 1.0)" in repr(FlowDuplicate(2, weights=(0, 1)))


@pytest.mark.parametrize("weights", [(1.0,), (0.0, 0.0), (-1.0, 2.0), (float("nan"), 1.0), (1.0, 2.0, 3.0)])
def test_duplicate_refuses_weights_that_are_not_a_distribution(weights):
    with pytest.raises(LayerConfigurationError, match="weights"):
        FlowDuplicate(2, weights=weights)


# ---- sum --------------------------------------------------------------------------------
@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 4])
def test_sum_equals_original(subtract, dtype, batch):
    flow = make_sum((3, 2), dtype, subtract)
    a, b = torch.randn(2, batch, 3, 2, dtype=dtype)
    y, ll = flow.call_and_ll(a, b)
    assert torch.equal(y, a - b if subtract else a + b) and torch.equal(flow(a, b), y)
    assert ll.shape == (batch,) and torch.isfinite(ll).all() and ll.dtype == dtype


@pytest.mark.parametrize("subtract", [False, True])
def test_sum_logdet_matches_jacobian_of_split_map(subtract):
    flow = make_sum((3,), subtract=subtract)
    a, b = torch.randn(2, 2, 3, dtype=torch.float64)
    y, ll = flow.call_and_ll(a, b)
    logq = flow.dropped.log_prob(flow.to_rows(flow.dropped_coordinates(a, b)), flow.to_rows(y))
    split = lambda z: torch.cat(
        [flow(z[:3][None], z[3:][None])[0], flow.dropped_coordinates(z[:3][None], z[3:][None])[0]]
    )
    for i in range(2):
        J = torch.autograd.functional.jacobian(split, torch.cat([a[i], b[i]]))
        logdet = torch.linalg.slogdet(J)[1]
        assert logdet.abs() > 0.1
        torch.testing.assert_close(ll[i] - logq[i], logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("subtract", [False, True])
def test_sum_integrates_to_one(subtract):
    flow = make_sum((1,), subtract=subtract, seed=3)

    def log_p(pts):
        y, ll = flow.call_and_ll(pts[:, :1], pts[:, 1:])
        return base_log_prob(y) + ll

    total = grid_integral(log_p, [(-9.0, 9.0)] * 2, points=500)
    assert abs(total - 1.0) < 2e-3, total


@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_sum_forward_of_inverse_is_identity(subtract, dtype, batch):
    flow = make_sum((2, 3), dtype, subtract)
    y = torch.randn(batch, 2, 3, dtype=dtype)
    for sample in (False, True):
        a, b = flow.inverse(y, sample=sample)
        torch.testing.assert_close(flow(a, b), y, **TOL[dtype])
    noise = flow.draw_inverse_noise(y)
    torch.testing.assert_close(flow.inverse(y, True, noise)[0], flow.inverse(y, True, noise)[0])


def test_sum_refuses_broadcasting():
    with pytest.raises(ValueError):
        FlowSum((3,)).call_and_ll(torch.randn(2, 3), torch.randn(2, 1))


# ---- cat / split ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dim", [1, 2, -1])
def test_cat_and_split_are_exact_bijections(dtype, batch, dim):
    parts = [
        torch.randn(batch, 3, 4, dtype=dtype)[..., :k] if dim in (2, -1) else torch.randn(batch, k, 4, dtype=dtype)
        for k in (1, 3)
    ]
    cat = FlowCat(dim, [p.shape[dim] for p in parts])
    y, ll = cat.call_and_ll(*parts)
    assert torch.equal(y, torch.cat(parts, dim)) and torch.equal(ll, torch.zeros(batch, dtype=dtype))
    back = cat.inverse(y)
    assert all(torch.equal(p, q) for p, q in zip(back, parts))
    split = FlowSplit(dim, cat.sizes)
    ys, ll = split.call_and_ll(y)
    assert all(torch.equal(p, q) for p, q in zip(ys, parts)) and torch.equal(ll, torch.zeros(batch, dtype=dtype))
    assert torch.equal(split.inverse(*ys), y) and torch.equal(split.inverse(ys), y)


def test_chunk_and_split_sizes_follow_torch():
    x = torch.randn(2, 7, 3)
    for chunks in (2, 3, 4):
        flow = FlowSplit.from_chunk(1, chunks, 7)
        assert all(torch.equal(a, b) for a, b in zip(flow(x), x.chunk(chunks, 1)))
        assert len(flow(x)) == len(x.chunk(chunks, 1))
    flow = FlowSplit.from_split(1, 3, 7)
    assert flow.sizes == (3, 3, 1) and torch.equal(flow.inverse(*flow(x)), x)


def test_cat_integrates_to_one():
    cat = FlowCat(1, [1, 1])

    def log_p(pts):
        y, ll = cat.call_and_ll(pts[:, :1], pts[:, 1:])
        return base_log_prob(y) + ll

    assert abs(grid_integral(log_p, [(-8.0, 8.0)] * 2, points=300) - 1.0) < 1e-3


def test_batch_dimension_is_refused():
    for make in (lambda: FlowCat(0, [1, 1]), lambda: FlowSplit(0, [1, 1])):
        with pytest.raises(LayerConfigurationError) as err:
            make()
        assert err.value.code == "FC215"
    with pytest.raises(LayerConfigurationError):
        FlowCat(-2, [1, 1]).call_and_ll(torch.ones(1, 3), torch.ones(1, 3))
