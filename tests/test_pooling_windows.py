"""Pooling as real networks use it (FlowWindowPool, FlowReduce) against SPEC section 8.

Overlapping, padded, ragged (ceil_mode), dilated, adaptive and global pooling; the
obligations: the deterministic output is the PyTorch op bit for bit; without duplicated cells
the layer is exact (log-det of the bijective part against autograd, integration to one,
forward(inverse(y)) == y); with duplicated cells the Tile stage's log-det matches autograd,
the importance-weighted estimate never exceeds the exact marginal and tightens with K, and
the mean of the copies recovers the input.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import jacobian

import flowconvert as fc
from flowconvert.densities import ConditionalDiagonalNormal
from flowconvert.pooling import FlowAvgPool, FlowMaxPool, FlowReduce, FlowWindowPool, helmert, pooling_layer
from obligations import base_log_prob, check_iw_bound, grid_integral

D64 = torch.float64

# (module, per-sample input shape, exact?)
CONFIGS = {
    "resnet_stem_max": (nn.MaxPool2d(3, 2, 1), (2, 7, 7), False),
    "alexnet_max": (nn.MaxPool2d(3, 2), (2, 7, 8), False),
    "googlenet_max_ceil": (nn.MaxPool2d(3, 2, ceil_mode=True), (2, 8, 8), False),
    "max_stride1": (nn.MaxPool2d(3, 1, 1), (1, 4, 5), False),
    "max_dilated": (nn.MaxPool2d(2, dilation=2), (1, 5, 5), False),
    "max_padded_tiling": (nn.MaxPool2d(2, 2, 1), (2, 5, 4), True),
    "max_ceil_ragged": (nn.MaxPool2d(2, ceil_mode=True), (2, 5, 5), True),
    "max1d_gapped": (nn.MaxPool1d(1, 2), (2, 7), True),
    "max1d_overlap": (nn.MaxPool1d(3, 2, 1), (2, 9), False),
    "nin_avg": (nn.AvgPool2d(3, 2, 1), (2, 7, 7), False),
    "avg_no_pad_count": (nn.AvgPool2d(3, 2, 1, count_include_pad=False), (2, 7, 7), False),
    "avg_ceil": (nn.AvgPool2d(3, 2, 1, ceil_mode=True), (1, 8, 8), False),
    "avg_padded_tiling": (nn.AvgPool2d(2, padding=1), (2, 4, 5), True),
    "avg_padded_divisor": (nn.AvgPool2d(2, padding=1, divisor_override=3), (2, 5, 5), True),
    "avg1d_overlap": (nn.AvgPool1d(3, 1, 1), (2, 6), False),
    "global_avg_stride1": (nn.AvgPool2d(8, stride=1), (3, 8, 8), True),
    "adaptive_avg_overlap": (nn.AdaptiveAvgPool2d(3), (2, 5, 7), False),
    "adaptive_avg_upsample": (nn.AdaptiveAvgPool2d(3), (2, 1, 2), False),
    "adaptive_max_global": (nn.AdaptiveMaxPool2d(1), (2, 5, 5), True),
    "adaptive_max_identity": (nn.AdaptiveMaxPool2d((4, 3)), (2, 4, 3), True),
    "adaptive_max1d": (nn.AdaptiveMaxPool1d(4), (2, 6), False),
}


def build(name, dtype=D64, seed=0):
    module, shape, _ = CONFIGS[name]
    layer = FlowWindowPool.from_module(module, shape).to(dtype)
    randomize(layer, seed)
    return module, shape, layer


def randomize(layer, seed=0):
    """Make every density and noise scale matter (they start at a standard normal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_deterministic_output_is_the_torch_op(name, dtype):
    module, shape, layer = build(name, dtype)
    x = torch.randn(3, *shape, dtype=dtype)
    y, ll = layer.call_and_ll(x)
    assert torch.equal(y, module(x)) and torch.equal(layer(x), module(x))
    assert ll.shape == (3,) and ll.dtype == dtype and torch.isfinite(ll).all()
    assert layer.exact == CONFIGS[name][2]
    noise = layer.draw_noise(x)
    y_noisy, ll_noisy = layer.call_and_ll(x, noise)
    assert y_noisy.shape == y.shape and torch.isfinite(ll_noisy).all()
    assert (noise is None) == layer.exact


def _split_map(layer, shape):
    """x -> (y, Helmert coordinates of every window, dropped cells): a bijection for exact avg pools."""

    def split(v):
        x = v.reshape(1, *shape)
        cells = layer._to_cells(x)
        copies, _ = layer._copies(cells, None)
        from flowconvert.pooling import helmert_apply

        pieces = [layer(x).reshape(-1)] + [helmert_apply(t).reshape(-1) for t in copies]
        pieces.append(cells[:, :, layer._drop_idx].reshape(-1))
        return torch.cat(pieces)

    return split


def _log_q(layer, x):
    """Sum of the dropped parts' log-densities (Helmert coordinates and unreached cells)."""
    cells = layer._to_cells(x)
    copies, _ = layer._copies(cells, None)
    y = layer._to_locations(layer(x))
    total = x.new_zeros(x.shape[0])
    from flowconvert.pooling import helmert_apply

    for K, t in zip(layer.group_sizes, copies):
        if K > 1:
            yk = y[:, :, getattr(layer, f"_loc{K}")].unsqueeze(-1)
            total = total + layer.dropped[str(K)].log_prob(helmert_apply(t), yk)
    if layer.dropped_pixels is not None:
        total = total + layer.dropped_pixels.log_prob(
            cells[:, :, layer._drop_idx].unsqueeze(-1), y[:, :, layer._drop_loc].unsqueeze(-1)
        )
    return total


@pytest.mark.parametrize("name", ["avg_padded_tiling", "avg_padded_divisor", "global_avg_stride1"])
def test_exact_avg_logdet_matches_autograd(name):
    _, shape, layer = build(name)
    if name == "global_avg_stride1":
        layer = FlowWindowPool(shape[:1] + (3, 3), "avg", kernel=3, stride=1).double()
        randomize(layer)
        shape = (3, 3, 3)
    x = torch.randn(2, *shape, dtype=D64)
    _, ll = layer.call_and_ll(x)
    logq = _log_q(layer, x)
    for i in range(2):
        J = jacobian(_split_map(layer, shape), x[i].reshape(-1))
        assert J.shape[0] == J.shape[1]
        logdet = torch.linalg.slogdet(J)[1]
        assert abs(logdet.item()) > 0.1
        torch.testing.assert_close(ll[i] - logq[i], logdet, atol=1e-10, rtol=0)


def _helmert_noise(layer, omega):
    """Forward noise whose copies of each cell sum to zero: eps = H_{N_p}^T omega_p per cell."""
    C = layer.channels
    eps = omega.new_zeros(C, layer.num_copies)
    slots = layer._all_idx
    k = 0
    for p in range(layer.num_cells):
        where = torch.nonzero(slots == p).reshape(-1)
        n = where.numel()
        if n > 1:
            eps[:, where] = omega[:, k : k + n - 1] @ helmert(n).to(omega.dtype)
            k += n - 1
    return eps.reshape(1, -1)


@pytest.mark.parametrize(
    "name", ["resnet_stem_max", "nin_avg", "max1d_overlap", "adaptive_avg_upsample", "max_dilated"]
)
def test_tile_logdet_matches_autograd(name):
    """(x, omega) -> copies is linear and square; L_tile + log phi(omega) == log|det J| (float64)."""
    module, shape, layer = build(name)
    C, S = layer.channels, layer.num_cells
    n_omega = layer._tile_extra
    x = torch.randn(1, *shape, dtype=D64)
    omega = torch.randn(C, n_omega, dtype=D64)

    def tile(v):
        xv, om = v[: C * S].reshape(1, *shape), v[C * S :].reshape(C, n_omega)
        cells = layer._to_cells(xv)
        copies, _ = layer._copies(cells, _helmert_noise(layer, om))
        dropped = cells[0, :, layer._drop_idx]  # cells no window reaches pass through (unit Jacobian)
        return torch.cat([t.reshape(C, -1) for t in copies] + [dropped], 1).reshape(-1)

    v = torch.cat([x.reshape(-1), omega.reshape(-1)])
    J = jacobian(tile, v)
    assert J.shape[0] == J.shape[1] == C * (layer.num_copies + layer.n_dropped)
    logdet = torch.linalg.slogdet(J)[1]
    # the Tile stage's contribution: total minus the pool stage (and unreached cells)
    eps = _helmert_noise(layer, omega)
    y, ll = layer.call_and_ll(x, eps)
    copies, _ = layer._copies(layer._to_cells(x), eps)
    pool_ll = layer._pool(copies, None)[1] + layer.log_gain
    if layer.dropped_pixels is not None:
        pool_ll = pool_ll + layer.dropped_pixels.log_prob(
            layer._to_cells(x)[:, :, layer._drop_idx].unsqueeze(-1),
            layer._to_locations(y)[:, :, layer._drop_loc].unsqueeze(-1),
        )
    log_phi = (-0.5 * omega * omega - 0.5 * math.log(2 * math.pi)).sum()
    torch.testing.assert_close(ll[0] - pool_ll[0] + log_phi, logdet, atol=1e-9, rtol=0)


def _density(layer, shape):
    def log_p(points):
        y, ll = layer.call_and_ll(points.reshape(-1, *shape))
        return base_log_prob(y) + ll

    return log_p


@pytest.mark.parametrize(
    "make,shape,points",
    [
        (lambda s: FlowWindowPool(s, "max", kernel=2, stride=2, padding=1), (1, 3), 90),
        (lambda s: FlowWindowPool(s, "avg", kernel=2, stride=2, padding=1), (1, 3), 90),
        (lambda s: FlowWindowPool(s, "avg", kernel=2, stride=2, padding=1, count_include_pad=False), (1, 3), 90),
        (lambda s: FlowWindowPool(s, "max", kernel=2, ceil_mode=True), (1, 3), 90),
        (lambda s: FlowWindowPool(s, "avg", kernel=3, stride=2), (1, 3), 90),
        (lambda s: FlowWindowPool(s, "max", kernel=1, stride=2), (1, 2), 400),
        (lambda s: FlowReduce(s, dims=(0, 1), how="mean"), (1, 3), 90),
        (lambda s: FlowReduce(s, dims=(1,), how="sum"), (1, 2), 400),
        (lambda s: FlowReduce(s, dims=(0,), how="amax"), (2, 1), 400),
    ],
    ids=[
        "max_padded",
        "avg_padded",
        "avg_padded_no_count",
        "max_ceil",
        "avg_global_stride",
        "max_gapped",
        "mean",
        "sum",
        "amax",
    ],
)
def test_exact_forms_integrate_to_one(make, shape, points):
    layer = make(shape).double()
    assert layer.exact
    randomize(layer, seed=3)
    dim = math.prod(shape)
    total = grid_integral(_density(layer, shape), [(-8.0, 8.0)] * dim, points=points)
    assert abs(total - 1.0) < 5e-3, total


@pytest.mark.parametrize("name", ["avg1d_overlap", "adaptive_avg_upsample"])
def test_tiled_avg_bound_below_exact_and_tightening(name):
    torch.manual_seed(0)
    module, shape, layer = build(name)
    x = torch.randn(2, *shape, dtype=D64)
    check_iw_bound(layer, x, ks=(1, 8, 64), repeats=100)


def test_tiled_max_bound_below_exact_and_tightening():
    """MaxPool1d(2, stride=1) on 3 cells: one duplicated cell, so the marginal is a 1-D integral."""
    torch.manual_seed(0)
    layer = FlowWindowPool((1, 3), "max", kernel=2, stride=1).double()
    randomize(layer, seed=1)
    x = torch.tensor([[[0.3, -0.2, 0.9]]], dtype=D64)
    slots = torch.nonzero(layer._all_idx == 1).reshape(-1)
    assert slots.numel() == 2

    def bound(w):  # L(x, omega) for a batch of omega (standard normal on the complement)
        eps = torch.zeros(w.numel(), layer.num_copies, dtype=D64)
        eps[:, slots[0]], eps[:, slots[1]] = w / math.sqrt(2), -w / math.sqrt(2)
        y, ll = layer.call_and_ll(x.expand(w.numel(), 1, 3), eps)
        return base_log_prob(y) + ll

    grid = torch.linspace(-12, 12, 24001, dtype=D64)
    h = grid[1] - grid[0]
    log_phi = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
    exact = (torch.logsumexp(bound(grid) + log_phi, 0) + h.log()).item()
    means, ses = [], []
    for k in (1, 4, 32):
        est = []
        for _ in range(300):
            w = torch.randn(k, dtype=D64)
            est.append((torch.logsumexp(bound(w), 0) - math.log(k)).item())
        est = torch.tensor(est)
        assert est.mean() <= exact + 4 * est.std() / math.sqrt(len(est)) + 1e-9, (k, est.mean(), exact)
        means.append(est.mean().item())
        ses.append(est.std().item() / math.sqrt(len(est)))
    # tightening: each K no looser than the previous beyond 3 standard errors, the last strictly tighter than K=1
    assert all(means[i + 1] > means[i] - 3 * (ses[i] + ses[i + 1]) for i in range(2)), (means, ses)
    assert means[0] + 3 * ses[0] < means[2] <= exact + 4 * ses[2], (means, exact)
    assert exact - means[2] < exact - means[0]


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[2]])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_exact_forms_forward_of_inverse(name, dtype):
    _, shape, layer = build(name, dtype)
    y = layer(torch.randn(3, *shape, dtype=dtype))
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=1e-12, rtol=0)
    for sample in (False, True):
        x = layer.inverse(y, sample=sample)
        assert x.shape == (3, *shape)
        torch.testing.assert_close(layer(x), y, **tol)
    noise = layer.draw_inverse_noise(y)
    if noise is not None:
        assert torch.equal(layer.inverse(y, sample=True, noise=noise), layer.inverse(y, sample=True, noise=noise))


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if not c[2]])
def test_tile_is_undone_by_the_mean_of_copies(name):
    """inverse(Tile(x)) == x (augmentation direction), with and without noise; inverse has the input's shape."""
    _, shape, layer = build(name)
    x = torch.randn(2, *shape, dtype=D64)
    cells = layer._to_cells(x)
    for eps in (None, layer.draw_noise(x)):
        copies, _ = layer._copies(cells, eps)
        back = cells.new_zeros(cells.shape)
        for K, t in zip(layer.group_sizes, copies):
            back = back.index_add(2, getattr(layer, f"_idx{K}").reshape(-1), t.reshape(2, layer.channels, -1))
        back = back * layer._inv_cov
        covered = layer._cov > 0
        torch.testing.assert_close(back[:, :, covered], cells[:, :, covered], atol=1e-12, rtol=0)
    y = layer(x)
    for sample in (False, True):
        assert layer.inverse(y, sample=sample).shape == x.shape


def test_density_parts_are_declared_and_replaceable():
    _, shape, layer = build("nin_avg")
    x = torch.randn(4, *shape, dtype=D64)
    parts = layer.density_parts()
    names = {p.name for p in parts}
    assert names == {"dropped.4", "dropped.6", "dropped.9", "tile_noise"}
    rows = layer.observe(x)
    for part in parts:
        assert layer.get_submodule(part.name) is not None
        d, ctx = rows[part.name]
        assert d.shape[1] == part.features and (ctx is None) == (part.kind == "noise")
        if ctx is not None:
            assert ctx.shape == (d.shape[0], part.context)
    before = layer.call_and_ll(x)[1]
    generic = ConditionalDiagonalNormal(8, 1).double()
    with torch.no_grad():
        generic.log_scale.fill_(0.5)
    layer.set_submodule("dropped.9", generic)
    after = layer.call_and_ll(x)[1]
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
    y = layer(x)
    assert layer.inverse(y, sample=True).shape == x.shape
    _, shape, mx = build("max_ceil_ragged")
    assert mx.density_parts() == ()


def test_pooling_layer_keeps_the_tiling_layers_for_tiling_windows():
    assert isinstance(pooling_layer(nn.MaxPool2d(2), (1, 4, 4)), FlowMaxPool)
    assert isinstance(pooling_layer(nn.AdaptiveAvgPool2d(1), (1, 4, 4)), FlowAvgPool)
    assert isinstance(pooling_layer(nn.MaxPool2d(2, ceil_mode=True), (1, 5, 5)), FlowWindowPool)
    assert isinstance(pooling_layer(nn.AvgPool2d(8, stride=1), (1, 8, 8)), FlowWindowPool)
    with pytest.raises(fc.LayerConfigurationError) as err:
        pooling_layer(nn.MaxPool2d(2, return_indices=True), (1, 4, 4))
    assert err.value.code == "FC214"


# -- every spelling of global pooling converts through the registry -----------------------------------
class Spelling(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 2, 1)
        self.pool = {
            "adaptive_module": nn.AdaptiveAvgPool2d(1),
            "avg_module_stride1": nn.AvgPool2d(4, stride=1),
            "adaptive_identity": nn.AdaptiveAvgPool2d((4, 4)),
            "adaptive_max": nn.AdaptiveMaxPool2d(1),
        }.get(how)

    def forward(self, x):
        h = self.conv(x)
        how = self.how
        if self.pool is not None:
            return torch.flatten(self.pool(h), 1)
        if how == "mean_tuple":
            return h.mean(dim=(2, 3))
        if how == "mean_keepdim":
            return h.mean([-2, -1], keepdim=True).flatten(1)
        if how == "torch_mean":
            return torch.mean(h, (2, 3))
        if how == "functional_adaptive":
            return F.adaptive_avg_pool2d(h, 1).flatten(1)
        if how == "sum":
            return h.sum(-1).flatten(1)
        if how == "amax":
            return h.amax((2, 3))
        if how == "token_mean":
            return h.flatten(2).transpose(1, 2).mean(1)
        raise AssertionError(how)


SPELLINGS = [
    "adaptive_module",
    "avg_module_stride1",
    "adaptive_identity",
    "adaptive_max",
    "mean_tuple",
    "mean_keepdim",
    "torch_mean",
    "functional_adaptive",
    "sum",
    "amax",
    "token_mean",
]


@pytest.mark.parametrize("how", SPELLINGS)
def test_global_pooling_spellings_convert_exactly(how):
    torch.manual_seed(0)
    model = Spelling(how).double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=D64)
    flow = fc.convert(model, x)
    assert flow.exact and flow.report.exact
    torch.testing.assert_close(flow(x), model(x), atol=1e-12, rtol=0)
    assert torch.isfinite(flow.log_prob(x)).all()
    z = flow(x)
    torch.testing.assert_close(flow(flow.inverse(z, sample=True)), z, atol=1e-10, rtol=0)


def test_mean_over_the_batch_is_refused():
    class BatchMean(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    report = fc.audit(BatchMean(), torch.randn(3, 4))
    assert "FC113" in report.counts


def test_overlapping_pool_in_a_network_is_a_bound_with_the_original_output():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(4, 4, 1),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True),
        nn.Flatten(),
    ).eval()
    x = torch.randn(2, 2, 9, 9)
    flow = fc.convert(model, x)
    assert not flow.exact
    assert torch.equal(flow(x), model(x))
    assert torch.isfinite(flow.log_prob(x)).all() and torch.isfinite(flow.log_prob(x, deterministic=True)).all()
    assert torch.isfinite(flow.inverse(flow(x), sample=True)).all()


MAX_CONFIGS = [name for name, (module, _, _) in CONFIGS.items() if "Max" in type(module).__name__]


@pytest.mark.parametrize("name", MAX_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_max_gaps_by_window_sums_equal_the_gathered_windows(name, dtype):
    # deterministic max pooling sums its gaps' squares through one window sum and the cells'
    # window counts instead of gathering every window; the result must be the entry-by-entry
    # sum, also for values far from zero (centred on each channel's mean: nothing cancels)
    module, shape, layer = build(name, dtype)
    x = 3 * torch.randn(5, *shape, dtype=dtype) + 50
    y_fast, ll_fast = layer.call_and_ll(x)
    by_sums = layer._sum_pool
    layer._sum_pool = False
    y_slow, ll_slow = layer.call_and_ll(x)
    assert by_sums == ("dilated" not in name and "adaptive" not in name)
    assert torch.equal(y_fast, y_slow) and torch.equal(y_fast, module(x))
    tol = dict(atol=1e-9, rtol=1e-12) if dtype == D64 else dict(atol=2e-3, rtol=1e-6)
    torch.testing.assert_close(ll_fast, ll_slow, **tol)
    if dtype == D64 and layer._size_terms[0] > 0:  # and the gradients of the gap scales (where there are gaps)
        layer._sum_pool = by_sums
        grads = []
        for fast in (by_sums, False):
            layer._sum_pool = fast
            layer.zero_grad()
            layer.call_and_ll(x)[1].sum().backward()
            grads.append(layer.gap_log_scale.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=1e-10)
