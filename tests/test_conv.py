"""FlowConv against the obligations of docs/mathematics.md section 12 for every Conv shape case.

Tolerances: deterministic outputs atol 1e-5 (float32) / 1e-10 (float64); log-determinants
and path agreement atol 1e-8 in float64; integrals within 2e-3 of one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowconvert as fc
from flowconvert import FlowConv, LayerConfigurationError, SingularWeightError, network_training
from flowconvert.densities import LOG_2PI
from tests.obligations import autograd_logdet, check_iw_bound, grid_integral, log_density

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

# name: (module factory, per-sample input shape, kernel kind, exact)
CASES = {
    "3x3_s1_p1": (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 5), "funnel", False),
    "3x3_s2_p1": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 6), "funnel", False),
    "2x2_s2_bijection": (lambda: nn.Conv2d(3, 12, 2, stride=2), (3, 6, 4), "bijection", True),
    "2x2_s2_funnel_dropped_row": (lambda: nn.Conv2d(3, 5, 2, stride=2), (3, 5, 4), "funnel", True),
    "1x1_s2_dropped": (lambda: nn.Conv2d(3, 2, 1, stride=2), (3, 5, 5), "funnel", True),
    "3x3_dil2_p2": (lambda: nn.Conv2d(2, 4, 3, dilation=2, padding=2), (2, 7, 7), "funnel", False),
    "3x3_dil2_s2_p1_all_stages": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1),
        (2, 7, 7),
        "funnel",
        False,
    ),
    "3x3_p1_augment": (lambda: nn.Conv2d(1, 16, 3, padding=1), (1, 5, 5), "augment", False),
    "3x3_p1_square_kernel": (lambda: nn.Conv2d(1, 9, 3, padding=1), (1, 4, 4), "bijection", False),
    "2x2_same_asymmetric": (lambda: nn.Conv2d(2, 3, 2, padding="same"), (2, 5, 5), "funnel", False),
    "rect_2x3_s12_p10": (lambda: nn.Conv2d(2, 4, (2, 3), stride=(1, 2), padding=(1, 0)), (2, 4, 7), "funnel", False),
    "conv1d_k3_p1": (lambda: nn.Conv1d(3, 4, 3, padding=1), (3, 10), "funnel", False),
    "conv1d_k4_same": (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 9), "funnel", False),
    "conv1d_k2_s3_dropped": (lambda: nn.Conv1d(2, 3, 2, stride=3), (2, 11), "funnel", True),
    "conv1d_k2_s2_bijection": (lambda: nn.Conv1d(2, 4, 2, stride=2), (2, 8), "bijection", True),
    "conv1d_valid_augment": (lambda: nn.Conv1d(1, 3, 2, padding="valid"), (1, 6), "augment", False),
}

ROUND_TRIP_INJECTIVE = [
    "2x2_s2_bijection",
    "3x3_p1_augment",
    "3x3_p1_square_kernel",
    "conv1d_k2_s2_bijection",
    "conv1d_valid_augment",
]
ROUND_TRIP_FUNNEL = ["2x2_s2_funnel_dropped_row", "1x1_s2_dropped", "conv1d_k2_s3_dropped"]


def randomize_densities(layer: FlowConv, gen: torch.Generator) -> FlowConv:
    """Non-zero conditional weights and scales, so conditioning and scales matter in every check."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def make(name: str, dtype=torch.float64, seed: int = 0):
    factory, shape, _, _ = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = factory().to(dtype)
    layer = randomize_densities(FlowConv.from_module(conv, shape), gen)
    return conv, layer, shape


def frozen(layer):
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


@pytest.mark.parametrize("name", list(CASES))
def test_structure(name):
    _, layer, _ = make(name)
    assert layer.kernel.kind == CASES[name][2]
    assert layer.exact == CASES[name][3]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_output_is_the_original(name, dtype, atol, batch):
    conv, layer, shape = make(name, dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    ref = conv(x)
    assert torch.equal(layer(x), ref)
    with torch.no_grad():  # fused path
        y, ll = layer.call_and_ll(x)
    assert torch.equal(y, ref)  # the likelihood pass returns the original convolution, bit for bit
    assert ll.shape == (batch,) and ll.dtype == dtype and torch.isfinite(ll).all()
    y2, ll2 = layer.call_and_ll(x)  # differentiable path
    torch.testing.assert_close(y2, ref, atol=atol, rtol=0)
    torch.testing.assert_close(ll2.detach(), ll, atol=1e-3 if dtype == torch.float32 else 1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_pass_never_unfolds(name, monkeypatch):
    _, layer, shape = make(name)
    x = torch.randn(2, *shape, dtype=torch.float64)

    def refuse(*args, **kwargs):
        raise AssertionError("deterministic likelihood pass unfolded its input")

    monkeypatch.setattr(F, "unfold", refuse)
    monkeypatch.setattr(FlowConv, "_windows", refuse)
    with torch.no_grad():
        layer.call_and_ll(x)
    layer.call_and_ll(x)  # the differentiable deterministic path too


@pytest.mark.parametrize("name", list(CASES))
def test_stochastic_paths_agree(name):
    _, layer, shape = make(name)
    x = torch.randn(3, *shape, dtype=torch.float64)
    noise = layer.draw_noise(x)
    assert (noise is None) == layer.exact
    with torch.no_grad():
        y, ll = layer.call_and_ll(x, noise)
    y2, ll2 = layer.call_and_ll(x, noise)
    torch.testing.assert_close(y2.detach(), y, atol=1e-10, rtol=0)
    torch.testing.assert_close(ll2.detach(), ll, atol=1e-8, rtol=0)
    if noise is not None:
        assert not torch.allclose(y, layer(x))


# -- log-determinants of bijective parts ----------------------------------------------------
@pytest.mark.parametrize("name", ["2x2_s2_bijection", "conv1d_k2_s2_bijection"])
def test_bijection_logdet_matches_autograd(name):
    _, layer, shape = make(name)
    x = torch.randn(2, *shape, dtype=torch.float64)
    _, ll = layer.call_and_ll(x)
    expected = autograd_logdet(layer, x)
    torch.testing.assert_close(ll.detach(), expected, atol=1e-8, rtol=0)
    assert expected.abs().min() > 0.1


def _copy_positions(layer: FlowConv):
    """For every padded pixel, the indices of its copies in the flat (C*k, L_o) patch layout."""
    Hp, Wp = layer._padded
    ids = torch.arange(Hp * Wp, dtype=torch.float64).reshape(1, 1, Hp, Wp)
    patch_ids = F.unfold(ids, **layer._fold_args)[0].reshape(-1)  # channel 0 rows come first
    return [torch.nonzero(patch_ids == p).reshape(-1) for p in range(Hp * Wp)]


@pytest.mark.parametrize("length,k", [(3, 2), (4, 3), (5, 3)])
def test_tile_logdet_matches_autograd(length, k):
    """(x, omega) -> copies -> square kernel: log|det| = tile log-det + L_o log|det W|."""
    torch.manual_seed(1)
    conv = nn.Conv1d(1, k, k).double()  # kernel k -> k: a bijection per window
    layer = FlowConv.from_module(conv, (1, length))
    with torch.no_grad():
        layer.tile_noise.log_scale.fill_(0.4)
    tau = math.exp(0.4)
    groups = [g for g in _copy_positions(layer) if g.numel() > 1]
    n_noise = layer.noise_shape(None)[0]
    basis = []  # columns: orthonormal basis of sum-zero vectors on each pixel's copies
    for g in groups:
        q, _ = torch.linalg.qr(torch.cat([torch.ones(g.numel(), 1), torch.eye(g.numel())[:, :-1]], 1).double())
        for j in range(1, g.numel()):
            col = torch.zeros(n_noise, dtype=torch.float64)
            col[g] = q[:, j]
            basis.append(col)
    basis = torch.stack(basis, 1)
    n_omega = basis.shape[1]
    assert length + n_omega == layer.n_locations * k  # the map is square

    def f(v):
        x, omega = v[:length].reshape(1, 1, length), v[length:]
        return layer.call_and_ll(x, (basis @ omega / tau).reshape(1, -1))[0].reshape(-1)

    v = torch.randn(length + n_omega, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(f, v)
    logdet = torch.linalg.slogdet(J)[1]
    kernel_logdet = layer.n_locations * layer.kernel.logdet()
    tile = logdet - kernel_logdet
    counts = [g.numel() for g in _copy_positions(layer) if g.numel() >= 1]
    assert abs(tile.item() - sum(0.5 * n * math.log(n) for n in counts)) < 1e-10
    assert abs(tile.item() - layer.tile_logdet) < 1e-10 and layer.tile_logdet > 0.5
    # the layer's contribution is log|det J| - log q(omega)
    omega = v[length:]
    _, ll = layer.call_and_ll(v[:length].reshape(1, 1, length), (basis @ omega / tau).reshape(1, -1))
    neg_log_q = 0.5 * (omega**2).sum() / tau**2 + n_omega * (math.log(tau) + 0.5 * LOG_2PI)
    assert abs(ll.item() - (logdet + neg_log_q).item()) < 1e-9


# -- exact layers integrate to one -------------------------------------------------------------
@pytest.mark.parametrize(
    "conv,shape,bound,points",
    [
        (lambda: nn.Conv1d(1, 1, 1, stride=2), (1, 3), 9.0, 48),  # pixel 1 dropped
        (lambda: nn.Conv1d(1, 1, 2, stride=2), (1, 2), 9.0, 200),  # funnel 2 -> 1
        (lambda: nn.Conv2d(1, 1, (1, 2), stride=(1, 3)), (1, 1, 3), 9.0, 48),  # funnel + dropped pixel
        (lambda: nn.Conv1d(1, 2, 2, stride=2), (1, 2), 9.0, 200),  # bijection 2 -> 2
    ],
)
def test_exact_layer_integrates_to_one(conv, shape, bound, points):
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    m = conv().double()
    with torch.no_grad():
        m.weight.mul_(3.0)  # keep the density inside the box
    layer = frozen(randomize_densities(FlowConv.from_module(m, shape), gen))
    assert layer.exact
    for q in (layer.kernel.dropped, layer.dropped_pixels):
        if q is not None:
            assert q.weight.abs().min() > 0  # the conditioning matters
    dim = math.prod(shape)
    total = grid_integral(lambda pts: log_density(layer, pts.reshape(-1, *shape)), [(-bound, bound)] * dim, points)
    assert abs(total - 1) < 2e-3, total


# -- bound layers: importance-weighted estimates ------------------------------------------------
@pytest.mark.parametrize(
    "conv,shape",
    [
        (lambda: nn.Conv1d(1, 2, 2, stride=2, padding=1), (1, 2)),  # padding only
        (lambda: nn.Conv1d(1, 2, 2), (1, 3)),  # overlapping windows only
        (lambda: nn.Conv1d(1, 2, 1), (1, 2)),  # augmenting kernel only
        (lambda: nn.Conv2d(1, 2, 3, padding=1), (1, 2, 2)),  # padding + overlap + funnel kernel
    ],
)
def test_bound_layer_iw_estimates(conv, shape):
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    layer = frozen(randomize_densities(FlowConv.from_module(conv().double(), shape), gen))
    assert not layer.exact
    x = torch.randn(2, *shape, dtype=torch.float64)
    means = check_iw_bound(layer, x, ks=(1, 8, 64), repeats=60)
    assert means[0] < means[-1]


# -- inverses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROUND_TRIP_INJECTIVE)
def test_inverse_of_forward(name):
    _, layer, shape = make(name)
    x = torch.randn(3, *shape, dtype=torch.float64)
    y, _ = layer.call_and_ll(x)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-9, rtol=0)
    noise = layer.draw_noise(x)
    if noise is not None:
        ys, _ = layer.call_and_ll(x, noise)
        assert not torch.allclose(ys, y)
        torch.testing.assert_close(layer.inverse(ys), x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ROUND_TRIP_FUNNEL)
def test_forward_of_inverse(name):
    conv, layer, shape = make(name)
    y = conv(torch.randn(3, *shape, dtype=torch.float64)).detach() + 0.1
    x_mean = layer.inverse(y)
    torch.testing.assert_close(layer(x_mean), y, atol=1e-9, rtol=0)
    torch.testing.assert_close(layer.call_and_ll(x_mean)[0], y, atol=1e-9, rtol=0)
    noise = layer.draw_inverse_noise(y)
    assert noise is not None
    x1 = layer.inverse(y, sample=True, noise=noise)
    x2 = layer.inverse(y, sample=True, noise=noise)
    torch.testing.assert_close(x1, x2)  # explicit noise is reproducible
    assert not torch.allclose(x1, x_mean)
    torch.testing.assert_close(layer(x1), y, atol=1e-9, rtol=0)
    x3 = layer.inverse(y, sample=True)  # noise drawn internally
    torch.testing.assert_close(layer(x3), y, atol=1e-9, rtol=0)


def test_inverse_fills_dropped_pixels_from_their_density():
    _, layer, shape = make("1x1_s2_dropped")
    y = torch.randn(2, *layer.output_shape, dtype=torch.float64)
    x = layer.inverse(y)
    q = layer.dropped_pixels
    # pixel (0, 1) is dropped; its nearest output location is (0, 0) or (0, 1)
    assert (0 * shape[2] + 1) in layer._drop_idx.tolist()
    loc = layer._drop_loc[layer._drop_idx.tolist().index(1)]
    expected = q.mean(y.reshape(2, layer.out_channels, -1)[:, :, loc])
    torch.testing.assert_close(x[:, :, 0, 1], expected)


# -- gradients --------------------------------------------------------------------------------
def test_gradients_reach_densities_and_noise_scales():
    _, layer, shape = make("3x3_dil2_s2_p1_all_stages")
    assert layer.pad_noise is not None and layer.tile_noise is not None and layer.dropped_pixels is not None
    x = torch.randn(4, *shape, dtype=torch.float64)
    for noise in (None, layer.draw_noise(x)):
        layer.zero_grad()
        _, ll = layer.call_and_ll(x, noise)
        ll.sum().backward()
        params = [
            layer.kernel.dropped.weight, layer.kernel.dropped.bias, layer.kernel.dropped.log_scale,
            layer.dropped_pixels.weight, layer.dropped_pixels.bias, layer.dropped_pixels.log_scale,
            layer.pad_noise.log_scale, layer.tile_noise.log_scale,
        ]  # fmt: skip
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradients_reach_augment_noise_scale():
    _, layer, shape = make("3x3_p1_augment")
    x = torch.randn(2, *shape, dtype=torch.float64)
    _, ll = layer.call_and_ll(x, layer.draw_noise(x))
    ll.sum().backward()
    assert layer.kernel.noise.log_scale.grad.abs().sum() > 0


def test_network_training_keeps_the_function_in_sync():
    conv, layer, shape = make("3x3_s1_p1")
    x = torch.randn(4, *shape, dtype=torch.float64)
    with network_training(layer) as params:
        assert params  # the kernel's factors
        opt = torch.optim.SGD(params, lr=1e-3)
        loss = -layer.call_and_ll(x, layer.draw_noise(x))[1].mean() + layer(x).square().mean()
        loss.backward()
        assert layer.kernel.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.allclose(layer.weight, conv.weight)
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), ref)
    with torch.no_grad():
        y, ll = layer.call_and_ll(x)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.call_and_ll(x)[1].detach(), ll, atol=1e-8, rtol=0)


# -- configuration errors ----------------------------------------------------------------------
def test_groups_that_do_not_fit_the_channels_are_refused():
    # groups > 1 is one layer with a block-diagonal kernel (tests/test_grouped.py); a weight whose
    # groups do not fit the input's channels is a configuration error
    with pytest.raises(LayerConfigurationError) as err:
        FlowConv(torch.randn(4, 2, 3, 3), input_shape=(6, 8, 8), groups=2)
    assert err.value.code == "FC203" and "groups" in str(err.value)


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_mode_refused(mode):
    with pytest.raises(LayerConfigurationError) as err:
        FlowConv.from_module(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), (2, 8, 8))
    assert err.value.code == "FC203" and mode in str(err.value)


def test_singular_kernel_refused():
    conv = nn.Conv2d(2, 3, 2)
    with torch.no_grad():
        conv.weight[2] = conv.weight[0] + conv.weight[1]  # rank 2 as a 3 x 8 matrix
    with pytest.raises(SingularWeightError) as err:
        FlowConv.from_module(conv, (2, 5, 5))
    assert err.value.code == "FC201" and "3 x 8" in str(err.value)


def test_wrong_input_shape_refused():
    with pytest.raises(LayerConfigurationError):
        FlowConv.from_module(nn.Conv2d(2, 3, 3), (3, 8, 8))
    with pytest.raises(LayerConfigurationError):
        FlowConv.from_module(nn.Conv1d(2, 3, 3), (2, 8, 8))


def test_noise_shapes():
    _, layer, shape = make("3x3_s1_p1")
    C, H, W = shape
    n_pad = (H + 2) * (W + 2) - H * W
    assert layer.noise_shape(shape) == (C * n_pad + C * 9 * H * W,)
    assert layer.inverse_noise_shape(layer.output_shape) == ((C * 9 - layer.out_channels) * H * W,)
    _, exact, _ = make("2x2_s2_bijection")
    assert exact.noise_shape(None) is None and exact.inverse_noise_shape(None) is None


def test_kernel_patches_are_what_the_kernel_multiplies():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layer = FlowConv.from_module(conv, (2, 5, 5))
    x = torch.randn(4, 2, 5, 5)
    clean = layer.kernel_patches(x)
    assert torch.equal(clean, F.unfold(F.pad(x, (1, 1, 1, 1)), 3))
    noise = layer.draw_noise(x)
    y, _ = layer.call_and_ll(x, noise)
    patches = layer.kernel_patches(x, noise)  # padding and duplication noise included
    W, b = layer.kernel.weight, layer.kernel.bias
    assert torch.allclose(F.linear(patches.mT, W, b).mT.reshape(y.shape), y, atol=1e-5)


def test_calibrating_a_conv1d_with_dropped_pixels():
    """Regression (fuzzer models 620, 890, 1270, 1360, 1410): observe() ran the 1-d convolution on
    the 4-d view of its input, so calibrate crashed on every Conv1d that leaves pixels uncovered."""
    torch.manual_seed(0)
    x = torch.randn(60, 2, 5)
    flow = fc.convert(nn.Conv1d(2, 3, 3, dilation=2), x[:2])
    assert flow.layers[next(iter(flow.layers))].dropped_pixels is not None
    report = fc.calibrate(flow, x)
    assert report is not None and torch.isfinite(flow.log_prob(x)).all()


def test_a_conv1d_on_a_transposed_length_one_view():
    """Regression (fuzzer model 600): PyTorch's CPU convolutions segfault on a length-1 input whose
    last stride is not 1 (here a transposed view, passed through by an identity layer) with stride 3,
    padding 2, dilation 2 (and the fused residual's channels-last conv2d too); the layer makes a dense
    copy first, so both paths return."""
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 3, 1, stride=3, padding=2, dilation=2)
    layer = FlowConv.from_module(conv, (6, 1))
    x = torch.randn(3, 1, 6).transpose(1, 2)  # (3, 6, 1) with strides (6, 1, 6)
    assert x.stride(-1) != 1
    y = layer(x)
    torch.testing.assert_close(y, conv(x.clone(memory_format=torch.contiguous_format)), atol=0, rtol=0)
    assert torch.equal(layer.call_and_ll(x)[0], y)


def test_the_fused_residual_on_a_map_of_width_one():
    """Regression (fuzzer model 1615): the fused residual's channels-last conv2d segfaulted on a
    (6, 2, 1) map with stride 3, padding (0, 2), dilation 2; on maps of width or height 1 it runs
    row-major. The float32 log-likelihood agrees with float64 to 1e-4 (relative)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 1, 1, stride=3, padding=(0, 2), dilation=2)
    layer = FlowConv.from_module(conv, (6, 2, 1))
    assert layer.kernel.kind == "funnel" and layer.kernel.fused()
    x = torch.randn(3, 6, 2, 1)
    y, ll = layer.call_and_ll(x)
    y64, ll64 = FlowConv.from_module(copy.deepcopy(conv).double(), (6, 2, 1)).call_and_ll(x.double())
    torch.testing.assert_close(y, conv(x), atol=0, rtol=0)
    torch.testing.assert_close(ll.double(), ll64, atol=0, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][2] == "funnel"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "gathered"])
def test_both_residual_strategies_give_the_log_density(name, fuse, monkeypatch):
    """The deterministic funnel's log q(x_S | y) by the fused convolution with M and by the gather with
    A y agree with the unfolded (stochastic, zero-noise) reference to 1e-10 in float64, with and
    without gradients; which one runs is a cost decision only."""
    _, layer, shape = make(name)
    x = torch.randn(4, *shape, dtype=torch.float64)
    noise = layer.draw_noise(x)
    reference = layer.call_and_ll(x, torch.zeros_like(noise))[1].detach() if noise is not None else None
    monkeypatch.setattr(FlowConv, "_fuse", lambda self, batch: fuse)
    with torch.no_grad():
        ll = layer.call_and_ll(x)[1]
    ll_grad = layer.call_and_ll(x)[1]
    torch.testing.assert_close(ll_grad.detach(), ll, atol=1e-10, rtol=0)
    monkeypatch.setattr(FlowConv, "_fuse", lambda self, batch: not fuse)
    with torch.no_grad():
        torch.testing.assert_close(layer.call_and_ll(x)[1], ll, atol=1e-10, rtol=0)
    if reference is not None:  # the tiled or padded cases: zero noise is the deterministic point
        torch.testing.assert_close(ll, reference, atol=1e-10, rtol=0)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "gathered"])
@pytest.mark.parametrize("groups", [1, 4])
def test_weight_only_quantities_are_kept_without_gradient_and_follow_every_edit(fuse, groups, monkeypatch):
    """Without gradients the constant and the residual's weights are built once and reused; an
    in-place edit of a density parameter (as calibration makes) or of the kernel rebuilds them; with
    gradients they are built on every call and the gradient reaches the density's parameters.
    Reference: a deep copy (no cache), to 1e-12 in float64."""
    layer = FlowConv.from_module(nn.Conv2d(4, 4, 3, padding=1, groups=groups).double(), (4, 6, 6))
    q = layer.kernel.dropped
    with torch.no_grad():
        q.weight.normal_(), q.bias.normal_(), q.log_scale.normal_(0.0, 0.3)
    monkeypatch.setattr(FlowConv, "_fuse", lambda self, batch: fuse)
    builds = []
    for name in ("_fused_weights", "_gather_weights", "_constant"):
        original = getattr(FlowConv, name)
        monkeypatch.setattr(FlowConv, name, lambda self, *a, _f=original, _n=name: builds.append(_n) or _f(self, *a))
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)

    def fresh() -> torch.Tensor:
        return copy.deepcopy(layer).call_and_ll(x)[1]

    with torch.no_grad():
        first = layer.call_and_ll(x)[1]
        n = len(builds)
        again = layer.call_and_ll(x)[1]
        assert len(builds) == n and torch.equal(again, first)  # nothing rebuilt
        q.log_scale.add_(0.25)  # calibration's kind of edit
        torch.testing.assert_close(layer.call_and_ll(x)[1], fresh(), atol=1e-12, rtol=0)
        assert len(builds) > n
        layer.kernel.bias.add_(0.5)  # the network's
        torch.testing.assert_close(layer.call_and_ll(x)[1], fresh(), atol=1e-12, rtol=0)
    n = len(builds)
    ll = layer.call_and_ll(x)[1]
    layer.call_and_ll(x)
    assert len(builds) >= n + 2  # built on every call that records a gradient
    ll.sum().backward()
    assert q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_the_residual_strategy_follows_the_cost():
    """Deep layers (many channels, few locations) gather; a stem (few channels, a wide map) fuses."""
    deep = FlowConv.from_module(nn.Conv2d(256, 256, 3, padding=1), (256, 4, 4))
    stem = FlowConv.from_module(nn.Conv2d(3, 16, 7, stride=2, padding=3), (3, 64, 64))
    assert not deep._fuse(8) and stem._fuse(8)
