"""FlowLinear against the obligations of docs/mathematics.md section 12, in each of its three shapes."""

import math

import pytest
import torch

from flowconvert import FlowLinear, SingularWeightError, network_training

from obligations import autograd_logdet, base_log_prob, check_iw_bound, grid_integral, log_density

SHAPES = {"bijection": (4, 4), "funnel": (6, 3), "augment": (3, 5)}  # (in, out)


def make(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    n, m = SHAPES[kind]
    lin = torch.nn.Linear(n, m).to(dtype)
    flow = FlowLinear.from_module(lin)
    if flow.dropped is not None:  # make the conditional density matter
        with torch.no_grad():
            flow.dropped.weight.normal_(0, 0.5)
            flow.dropped.bias.normal_(0, 0.5)
            flow.dropped.log_scale.normal_(0, 0.3)
    if flow.noise is not None:
        with torch.no_grad():
            flow.noise.log_scale.fill_(-0.5)
    return lin, flow


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch", [1, 7])
def test_deterministic_output_equals_original(kind, dtype, atol, batch):
    lin, flow = make(kind, dtype)
    x = torch.randn(batch, lin.in_features, dtype=dtype)
    expected = lin(x)
    assert torch.equal(flow(x), expected)  # forward is the original layer, bit for bit
    for grad in (True, False):  # differentiable path and fused cached path
        with torch.set_grad_enabled(grad):
            y, ll = flow.call_and_ll(x)
        torch.testing.assert_close(y, expected, atol=atol, rtol=0)
        assert ll.shape == (batch,) and torch.isfinite(ll).all()


@pytest.mark.parametrize("kind", SHAPES)
def test_fused_and_differentiable_paths_agree(kind):
    _, flow = make(kind)
    x = torch.randn(5, flow.in_features, dtype=torch.float64)
    noise = flow.draw_noise(x)
    y1, ll1 = flow.call_and_ll(x, noise)
    with torch.no_grad():
        y2, ll2 = flow.call_and_ll(x, noise)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    torch.testing.assert_close(ll1, ll2, atol=1e-10, rtol=0)


def test_extra_leading_dimensions():
    _, flow = make("funnel")
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    y, ll = flow.call_and_ll(x)
    per_row = torch.stack([flow.call_and_ll(x[:, i])[1] for i in range(4)]).sum(0)
    assert y.shape == (2, 4, 3)
    torch.testing.assert_close(ll, per_row)


def test_bijection_logdet_matches_autograd_jacobian():
    _, flow = make("bijection")
    x = torch.randn(3, 4, dtype=torch.float64)
    _, ll = flow.call_and_ll(x)
    expected = autograd_logdet(flow, x)
    assert expected.abs().min() > 1e-3  # a non-trivial log-determinant
    torch.testing.assert_close(ll, expected, atol=1e-10, rtol=0)


def test_funnel_logdet_part_matches_jacobian_of_split_map():
    # x -> (y, d) with d = V_perp^T x is a bijection; its log|det| is the funnel's sum log s.
    _, flow = make("funnel")
    x = torch.randn(2, 6, dtype=torch.float64)
    split = lambda v: torch.cat([flow(v.unsqueeze(0))[0], v @ flow.V[:, flow.rank:]])
    J = torch.autograd.functional.jacobian(split, x[0])
    torch.testing.assert_close(torch.linalg.slogdet(J)[1], flow.log_s.sum(), atol=1e-10, rtol=0)
    # and the contribution is that plus the conditional log-density of d
    y, ll = flow.call_and_ll(x)
    d = x @ flow.V[:, flow.rank:]
    q = flow.dropped
    logq = (-0.5 * ((d - q.mean(y)) / q.log_scale.exp()) ** 2 - q.log_scale - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(ll, flow.log_s.sum() + logq, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,m", [(1, 1), (2, 2), (2, 1), (3, 1), (3, 2)])
def test_exact_layers_integrate_to_one(n, m):
    torch.manual_seed(n * 10 + m)
    lin = torch.nn.Linear(n, m).double()
    flow = FlowLinear.from_module(lin)
    if flow.dropped is not None:
        with torch.no_grad():
            flow.dropped.weight.normal_(0, 0.7)
            flow.dropped.log_scale.fill_(-0.3)
    # the mass sits where W x + b and the dropped part are within a few units of 0
    x0 = flow.inverse(torch.zeros(1, m, dtype=torch.float64))[0]
    radius = 9.0 / flow.log_s.exp().min().item() + 6.0
    bounds = [(c - radius, c + radius) for c in x0.tolist()]
    total = grid_integral(lambda pts: log_density(flow, pts), bounds, points={1: 4000, 2: 600, 3: 120}[n])
    assert abs(total - 1.0) < 5e-3, total


def test_augment_importance_weighted_bound():
    _, flow = make("augment")
    x = torch.randn(2, 3, dtype=torch.float64)
    check_iw_bound(flow, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 6])
def test_round_trips(dtype, batch):
    tol = dict(atol=1e-4, rtol=0) if dtype == torch.float32 else dict(atol=1e-10, rtol=0)
    # bijection: both directions
    _, flow = make("bijection", dtype)
    x = torch.randn(batch, 4, dtype=dtype)
    torch.testing.assert_close(flow.inverse(flow(x)), x, **tol)
    torch.testing.assert_close(flow(flow.inverse(x)), x, **tol)
    # augment: inverse(forward(x)) == x, also with stochastic noise
    _, flow = make("augment", dtype)
    x = torch.randn(batch, 3, dtype=dtype)
    y, _ = flow.call_and_ll(x, flow.draw_noise(x))
    torch.testing.assert_close(flow.inverse(y), x, **tol)
    # funnel: forward(inverse(y)) == y, with means and with draws
    _, flow = make("funnel", dtype)
    y = torch.randn(batch, 3, dtype=dtype)
    for sample in (False, True):
        torch.testing.assert_close(flow(flow.inverse(y, sample=sample)), y, **tol)


def test_funnel_inverse_samples_dropped_coordinates():
    _, flow = make("funnel")
    y = torch.randn(4, 3, dtype=torch.float64)
    a, b = flow.inverse(y, sample=True), flow.inverse(y, sample=True)
    assert not torch.allclose(a, b)
    noise = flow.draw_inverse_noise(y)
    torch.testing.assert_close(flow.inverse(y, sample=True, noise=noise), flow.inverse(y, sample=True, noise=noise))


def test_singular_weight_is_refused():
    w = torch.randn(3, 5)
    w[2] = w[0] + w[1]  # rank 2
    with pytest.raises(SingularWeightError) as err:
        FlowLinear(w)
    assert err.value.code == "FC201" and "hint" in str(err.value)


def test_user_tensors_are_not_touched():
    lin = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    flow = FlowLinear.from_module(lin)
    with torch.no_grad():
        flow.bias.add_(1.0)
        flow.weight.mul_(2.0)
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


def test_cache_follows_density_parameters():
    _, flow = make("funnel")
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        before = flow.call_and_ll(x)[1]
        flow.dropped.bias.add_(1.0)
        after = flow.call_and_ll(x)[1]
    reference = flow.call_and_ll(x)[1]  # differentiable path, computed from scratch
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference)


@pytest.mark.parametrize("kind", SHAPES)
def test_gradients_reach_densities_and_noise(kind):
    _, flow = make(kind)
    x = torch.randn(4, flow.in_features, dtype=torch.float64)
    y, ll = flow.call_and_ll(x, flow.draw_noise(x))
    if kind == "bijection":  # no density parameters, and the network is frozen by default
        assert not ll.requires_grad
        return
    (base_log_prob(y) + ll).sum().backward()
    if flow.dropped is not None:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.dropped.parameters())
    if flow.noise is not None:
        assert flow.noise.log_scale.grad.abs().sum() > 0
    assert flow.log_s.grad is None  # the network is frozen unless trained on purpose


@pytest.mark.parametrize("kind", SHAPES)
def test_network_training_keeps_factors_orthogonal(kind):
    _, flow = make(kind)
    x = torch.randn(32, flow.in_features, dtype=torch.float64)
    with network_training(flow) as params:
        opt = torch.optim.SGD(params, lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            y, ll = flow.call_and_ll(x)
            (-(base_log_prob(y) + ll).mean()).backward()
            opt.step()
    for Q in (flow.U, flow.V):
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=Q.dtype), atol=1e-10, rtol=0)
    r = flow.rank
    torch.testing.assert_close(flow.weight, (flow.U[:, :r] * flow.log_s.exp()) @ flow.V[:, :r].T)
    assert not flow.log_s.requires_grad and not flow.U.requires_grad
    # the trained layer is still consistent: fused path == differentiable path, inverse exact
    with torch.no_grad():
        fused = flow.call_and_ll(x)
    torch.testing.assert_close(fused[1], flow._call_graph(x, None, 1)[1])
    if kind == "bijection":
        torch.testing.assert_close(flow.inverse(flow(x)), x, atol=1e-10, rtol=0)


def test_state_dict_round_trip():
    _, flow = make("funnel")
    _, other = make("funnel", seed=1)
    other.load_state_dict(flow.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(other.call_and_ll(x)[1], flow.call_and_ll(x)[1])
    assert torch.equal(other(x), flow(x))


@pytest.mark.parametrize("kind", SHAPES)
def test_likelihood_pass_output_is_bit_for_bit(kind):
    lin, flow = make(kind, torch.float32)
    x = torch.randn(2, 5, lin.in_features)
    with torch.no_grad():
        assert torch.equal(flow.call_and_ll(x)[0], lin(x))


def test_forward_follows_factors_during_network_training():
    _, flow = make("bijection")
    with network_training(flow):
        flow(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        assert flow.parametrizations.U.original.grad is not None and flow.log_s.grad is not None


def test_cache_follows_dtype_moves_and_replaced_parameters():
    _, flow = make("funnel", torch.float32)
    x = torch.randn(3, 6)
    with torch.no_grad():
        flow.call_and_ll(x)
        flow.double()  # buffers are replaced: the cache must be rebuilt in float64
        y, ll = flow.call_and_ll(x.double())
        assert ll.dtype == torch.float64
        torch.testing.assert_close(ll, flow._call_graph(x.double(), None, 1)[1])
        flow.bias = torch.nn.Parameter(flow.bias + 1.0, requires_grad=False)  # a new parameter object
        torch.testing.assert_close(flow.call_and_ll(x.double())[1], flow._call_graph(x.double(), None, 1)[1])
