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


def reference_ll(flow, x):
    """The contribution from scratch in float64: log|det| of the square block by slogdet, plus
    log q(x_S | y) written out (funnel) or the point u = 0 of the noise (augment)."""
    W, b = flow.weight.double(), flow.bias.double()
    x = x.double()
    y = x @ W.T + b
    if flow.kind == "funnel":
        block = W[:, flow.kept_index]
    elif flow.kind == "augment":
        block = W[flow.kept_index]
    else:
        block = W
    ll = torch.linalg.slogdet(block)[1].expand(x.shape[0])
    if flow.kind == "funnel":
        q = flow.dropped
        d = x[:, flow.dropped_index]
        mu = y @ q.weight.double().T + q.bias.double()
        ls = q.log_scale.double()
        ll = ll + (-0.5 * ((d - mu) / ls.exp()) ** 2 - ls - 0.5 * math.log(2 * math.pi)).sum(1)
    elif flow.kind == "augment":
        ls = flow.noise.log_scale.double().expand(flow.added_features)
        ll = ll + (ls + 0.5 * math.log(2 * math.pi)).sum()
    return ll


def test_funnel_logdet_part_matches_jacobian_of_split_map():
    # x -> (y, d) with d = x_S (the dropped input coordinates) is a bijection; its log|det|
    # is log|det W_{S^c}|, the funnel's log-determinant.
    _, flow = make("funnel")
    S, Sc = flow.dropped_index, flow.kept_index
    assert sorted(S.tolist() + Sc.tolist()) == list(range(6)) and len(S) == 3
    x = torch.randn(2, 6, dtype=torch.float64)
    split = lambda v: torch.cat([flow(v.unsqueeze(0))[0], v[S]])
    J = torch.autograd.functional.jacobian(split, x[0])
    assert torch.linalg.slogdet(J)[1].abs() > 1e-3
    torch.testing.assert_close(torch.linalg.slogdet(J)[1], flow.logdet(), atol=1e-10, rtol=0)
    torch.testing.assert_close(flow.logdet(), torch.linalg.slogdet(flow.weight[:, Sc])[1], atol=1e-12, rtol=0)
    # and the contribution is that plus the conditional log-density of d
    y, ll = flow.call_and_ll(x)
    d = x[:, S]
    q = flow.dropped
    logq = (-0.5 * ((d - q.mean(y)) / q.log_scale.exp()) ** 2 - q.log_scale - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(ll, flow.logdet() + logq, atol=1e-10, rtol=0)
    torch.testing.assert_close(ll, reference_ll(flow, x), atol=1e-10, rtol=0)
    # the kept weight-only parts follow an edit of the density (no gradient recorded: the cached path)
    with torch.no_grad():
        assert torch.allclose(flow.call_and_ll(x)[1], ll)
        q.bias.add_(0.3)
        q.log_scale.mul_(1.5)
        torch.testing.assert_close(flow.call_and_ll(x)[1], reference_ll(flow, x), atol=1e-10, rtol=0)


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
    radius = 9.0 / torch.linalg.svdvals(lin.weight).min().item() + 6.0
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
    assert flow.weight.grad is None and flow.bias.grad is None  # the network is frozen unless trained on purpose


@pytest.mark.parametrize("kind", SHAPES)
def test_network_training_trains_the_weight_and_refreshes(kind):
    _, flow = make(kind)
    x = torch.randn(32, flow.in_features, dtype=torch.float64)
    w0 = flow.weight.detach().clone()
    with network_training(flow) as params:
        assert any(p is flow.weight for p in params) and any(p is flow.bias for p in params)
        opt = torch.optim.SGD(params, lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            y, ll = flow.call_and_ll(x)
            (-(base_log_prob(y) + ll).mean()).backward()
            assert flow.weight.grad.abs().sum() > 0  # log|det| is differentiable in W
            opt.step()
            with torch.no_grad():  # inside the block the no-grad pass follows the current weight too
                torch.testing.assert_close(flow.call_and_ll(x)[1], reference_ll(flow, x), atol=1e-10, rtol=0)
    assert not torch.allclose(flow.weight, w0)
    assert not flow.weight.requires_grad and not flow.bias.requires_grad
    # after the block: the trained weight everywhere, caches consistent
    with torch.no_grad():
        y, ll = flow.call_and_ll(x)
    assert torch.equal(y, torch.nn.functional.linear(x, flow.weight, flow.bias))
    torch.testing.assert_close(ll, reference_ll(flow, x), atol=1e-10, rtol=0)
    torch.testing.assert_close(flow.call_and_ll(x)[1].detach(), ll, atol=1e-12, rtol=0)
    if kind == "bijection":
        torch.testing.assert_close(flow.inverse(flow(x)), x, atol=1e-10, rtol=0)
    if kind == "funnel":
        y = flow(x)
        torch.testing.assert_close(flow(flow.inverse(y, sample=True)), y, atol=1e-10, rtol=0)
    if kind == "augment":
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


def test_forward_follows_the_weight_during_network_training():
    _, flow = make("bijection")
    with network_training(flow):
        flow(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        assert flow.weight.grad is not None and flow.bias.grad is not None


def test_cache_follows_dtype_moves_and_replaced_parameters():
    _, flow = make("funnel", torch.float32)
    x = torch.randn(3, 6)
    with torch.no_grad():
        flow.call_and_ll(x)
        flow.double()  # tensors are replaced: the cache is rebuilt in float64
        y, ll = flow.call_and_ll(x.double())
        assert ll.dtype == torch.float64 and flow.block_inverse().dtype == torch.float64
        torch.testing.assert_close(ll, reference_ll(flow, x), atol=1e-10, rtol=0)
        flow.bias = torch.nn.Parameter(flow.bias + 1.0, requires_grad=False)  # a new parameter object
        torch.testing.assert_close(flow.call_and_ll(x.double())[1], reference_ll(flow, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", SHAPES)
def test_weight_edits_through_data_need_refresh(kind):
    """Regression (stale fast path): ``.data`` edits bypass the version counter.

    ``p.data = t`` is detected (the storage changes); ``p.data.mul_(2)`` is not, and the
    documented step is ``refresh()``: after it the no-grad pass, the grad pass and a
    from-scratch computation agree."""
    _, flow = make(kind)
    x = torch.randn(4, flow.in_features, dtype=torch.float64)
    flow.weight.data = flow.weight.data * 1.5  # replaced: detected without a refresh
    with torch.no_grad():
        torch.testing.assert_close(flow.call_and_ll(x)[1], reference_ll(flow, x), atol=1e-10, rtol=0)
    flow.weight.data.mul_(2.0)  # in place behind autograd's back
    flow.refresh()
    with torch.no_grad():
        no_grad = flow.call_and_ll(x)[1]
    flow.dropped is not None and flow.dropped.weight.requires_grad_(True)
    grad = flow.call_and_ll(x)[1]
    torch.testing.assert_close(no_grad, reference_ll(flow, x), atol=1e-10, rtol=0)
    torch.testing.assert_close(grad.detach(), no_grad, atol=1e-12, rtol=0)
    if kind == "bijection":
        torch.testing.assert_close(flow.inverse(flow(x)), x, atol=1e-10, rtol=0)
    # optimizer-style in-place steps (visible to the version counter) need nothing
    with torch.no_grad():
        flow.weight.add_(0.01)
        torch.testing.assert_close(flow.call_and_ll(x)[1], reference_ll(flow, x), atol=1e-10, rtol=0)


def test_load_state_dict_refreshes_and_keeps_the_coordinates():
    _, flow = make("funnel")
    _, other = make("funnel", seed=1)
    other.load_state_dict(flow.state_dict())
    assert torch.equal(other.dropped_index, flow.dropped_index)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other.call_and_ll(x)[1], flow.call_and_ll(x)[1], atol=1e-12, rtol=0)


def test_wide_layer_converts_fast_and_small():
    """Linear(8192, 1024): no n x n basis; well under a second; the flow holds < 3x the weight."""
    import time

    torch.manual_seed(0)
    lin = torch.nn.Linear(8192, 1024)
    start = time.perf_counter()
    flow = FlowLinear.from_module(lin)
    elapsed = time.perf_counter() - start
    held = sum(t.numel() for t in [*flow.parameters(), *flow.buffers()])
    assert held < 3 * lin.weight.numel(), held / lin.weight.numel()
    # time relative to one float64 LU of W^T (the unavoidable factorization), measured in the same
    # run so that machine load cancels; absolute figures are printed by benchmarks/layers.py
    start = time.perf_counter()
    torch.linalg.lu_factor(lin.weight.detach().double().mT)
    unit = time.perf_counter() - start
    assert elapsed < 6 * unit + 0.5, (elapsed, unit)
    x = torch.randn(4, 8192)
    with torch.no_grad():
        y, ll = flow.call_and_ll(x)
    assert torch.equal(y, lin(x)) and torch.isfinite(ll).all()
    torch.testing.assert_close(flow(flow.inverse(y, sample=True)), y, atol=1e-3, rtol=1e-4)


def test_ill_conditioned_is_not_called_singular():
    """FC201 distinguishes singular (no finite log|det|) from ill-conditioned but invertible."""
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    w = Q @ torch.diag(torch.tensor([1.0, 0.5, 0.1, 1.5e-7], dtype=torch.float64)) @ Q.T  # condition ~ 6.7e6
    with pytest.raises(SingularWeightError) as err:
        FlowLinear(w)
    msg = err.value.message  # the specific text (str() adds the catalogue's why and hint)
    assert err.value.code == "FC201" and "ill-conditioned but invertible" in msg and "-inf" not in msg
    assert "1/rtol = 1e+06" in msg and "rtol=" in msg
    # the rtol the message suggests accepts it, with the exact log|det|
    layer = FlowLinear(w, rtol=1e-8)
    torch.testing.assert_close(layer.logdet(), torch.linalg.slogdet(w)[1], atol=1e-9, rtol=0)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer.inverse(layer(x)), x, atol=1e-6, rtol=0)
    # a rank-deficient weight is singular, whatever rtol
    w2 = w.clone()
    w2[3] = w2[0] + w2[1]
    for rtol in (1e-6, 1e-12):
        with pytest.raises(SingularWeightError) as err:
            FlowLinear(w2, rtol=rtol)
        assert "is singular" in err.value.message and "ill-conditioned" not in err.value.message


def _full_funnel(seed=0):
    """A float64 funnel (9 -> 4) with a full-covariance density whose every part matters."""
    torch.manual_seed(seed)
    flow = FlowLinear.from_module(torch.nn.Linear(9, 4).double(), covariance="full")
    q = flow.dropped
    with torch.no_grad():
        q.weight.normal_(0, 0.5)
        q.bias.normal_(0, 0.5)
        q.log_scale.normal_(0, 0.3)
        q.tril.normal_(0, 0.3)
    return flow


def _generic_term(flow, x):
    """``rows * log|det| + log q(x_S | y)`` from its definition: gather, then the density."""
    rows = x.numel() // (x.shape[0] * flow.in_features)
    y = flow.forward(x)
    return rows * flow.logdet() + flow.dropped.log_prob(x.index_select(-1, flow.dropped_index), y)


@pytest.mark.parametrize("shape", [(5, 9), (3, 4, 9)])
def test_full_covariance_funnel_term_from_the_input_equals_the_definition(shape):
    """The composed ``r = G x + b'`` path (no grad recorded) gives the same term as the density on the
    gathered coordinates, to 1e-10 in float64, and follows edits of the density and the kink."""
    flow = _full_funnel()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        assert flow._input_whitening() is not None  # the composed path is the one taken
        torch.testing.assert_close(flow.call_and_ll(x)[1], _generic_term(flow, x), atol=1e-10, rtol=0)
        first = flow.call_and_ll(x)[1]
        flow.dropped.bias.add_(0.7)  # an in-place edit: the kept composition is recomputed
        edited = flow.call_and_ll(x)[1]
        assert not torch.allclose(first, edited)
        torch.testing.assert_close(edited, _generic_term(flow, x), atol=1e-10, rtol=0)
        flow.dropped.set_kink(0.5)  # a kink: not affine, the term comes from (d, y)
        assert flow._input_whitening() is None
        torch.testing.assert_close(flow.call_and_ll(x)[1], _generic_term(flow, x), atol=1e-10, rtol=0)
        flow.dropped.set_kink(1.0)
        assert flow._input_whitening() is not None


def test_full_covariance_funnel_with_a_gradient_takes_the_differentiable_path():
    flow = _full_funnel()
    x = torch.randn(6, 9, dtype=torch.float64)
    assert flow._input_whitening() is None  # the density's parameters require grad
    ll = flow.call_and_ll(x)[1]
    ll.sum().backward()
    assert flow.dropped.tril.grad is not None and flow.dropped.tril.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(ll.detach(), flow.call_and_ll(x)[1], atol=1e-10, rtol=0)
