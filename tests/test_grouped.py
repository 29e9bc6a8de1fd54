"""Grouped and depthwise convolution (block-diagonal per-patch maps) against the obligations of docs/mathematics.md section 12."""

import pytest
import torch
import torch.nn as nn

from flowconvert import LayerConfigurationError
from flowconvert.conv import FlowConv
from flowconvert.grouped import FlowGroupedConv
from obligations import autograd_logdet, base_log_prob, check_iw_bound, grid_integral

# (module factory, per-sample input shape)
CASES = {
    "depthwise3x3": (lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (3, 5, 5)),
    "depthwise_multiplier": (lambda: nn.Conv2d(2, 4, 2, stride=2, groups=2), (2, 4, 4)),
    "groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 4, 4)),
    "conv1d_groups": (lambda: nn.Conv1d(4, 4, 3, padding=1, groups=2), (4, 6)),
    "pointwise_groups": (lambda: nn.Conv2d(4, 4, 1, groups=2), (4, 2, 2)),
    "conv1d_augment": (lambda: nn.Conv1d(2, 6, 2, padding=1, groups=2), (2, 5)),
    "dropped_pixels": (lambda: nn.Conv2d(4, 2, 1, stride=2, groups=2), (4, 5, 5)),
}


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    make, shape = CASES[name]
    module = make().to(dtype)
    return module, shape, FlowGroupedConv.from_module(module, shape)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch", [1, 3])
def test_equals_original(name, dtype, atol, batch):
    module, shape, flow = build(name, dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    y, ll = flow.call_and_ll(x)
    assert torch.equal(flow(x), module(x))
    torch.testing.assert_close(y, module(x), atol=atol, rtol=0)
    assert ll.shape == (batch,) and torch.isfinite(ll).all() and ll.dtype == dtype


def randomize(layer, seed=0):
    """Non-zero conditional weights and scales, so that every group's own parameters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def group_layer(flow, module, shape, g):
    """Group ``g`` of ``flow`` as a groups=1 FlowConv of its channel slice, with the group's density parameters."""
    G, cin, cout = module.groups, shape[0] // module.groups, module.out_channels // module.groups
    ref = nn.Conv2d if module.weight.dim() == 4 else nn.Conv1d
    block = ref(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation).double()
    with torch.no_grad():
        block.weight.copy_(module.weight[g * cout : (g + 1) * cout])
        block.bias.copy_(module.bias[g * cout : (g + 1) * cout])
    single = FlowConv.from_module(block, (cin, *shape[1:]))
    # the batched factorization chose the same coordinates as the group's own
    k = flow.kernel.dropped_features // G
    assert torch.equal(
        single.kernel.dropped_index, flow.kernel.dropped_index[g * k : (g + 1) * k] - g * single.kernel.in_features
    )
    with torch.no_grad():
        for name in ("pad_noise", "tile_noise"):
            if getattr(flow, name) is not None:
                getattr(single, name).log_scale.copy_(getattr(flow, name).log_scale[g * cin : (g + 1) * cin])
        for q, mine, rows in (
            (flow.kernel.dropped, single.kernel.dropped, k),
            (flow.dropped_pixels, single.dropped_pixels, cin),
        ):
            if q is None:
                continue
            mine.weight.copy_(q.weight[g * rows : (g + 1) * rows])
            mine.bias.copy_(q.bias[g * rows : (g + 1) * rows])
            mine.log_scale.copy_(q.log_scale[g * rows : (g + 1) * rows])
        if flow.kernel.noise is not None:
            a = flow.kernel.added_features // G
            single.kernel.noise.log_scale.copy_(flow.kernel.noise.log_scale[g * a : (g + 1) * a])
    return single


def cut(flow, noise, g, inverse=False):
    """Group ``g``'s part of the layer's noise: the forward noise segments are channel-major
    (padding, duplication, augmentation), the inverse ones position-major (kernel, dropped pixels)."""
    if noise is None:
        return None
    G, B = flow.groups, noise.shape[0]
    sizes = flow._inverse_noise_sizes if inverse else flow._noise_sizes
    rows = (flow.n_locations, flow.n_dropped) if inverse else (1, 1, 1)
    pieces = [
        p.reshape(B, r, G, -1)[:, :, g].reshape(B, -1) for p, n, r in zip(noise.split(list(sizes), 1), sizes, rows) if n
    ]
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_one_layer_equals_one_flowconv_per_group(name):
    """The batched layer is the sum over groups of independent groups=1 FlowConv layers (SPEC: the
    same formulas hold group by group): contributions in both modes, sampled inverses."""
    module, shape, flow = build(name)
    randomize(flow)
    G, cin = module.groups, shape[0] // module.groups
    x = torch.randn(2, *shape, dtype=torch.float64)
    y = flow(x)
    noise = flow.draw_noise(x)
    inv_noise = flow.draw_inverse_noise(y)
    singles = [group_layer(flow, module, shape, g) for g in range(G)]
    for eps in (None, noise):
        _, ll = flow.call_and_ll(x, eps)
        total = sum(s.call_and_ll(x[:, g * cin : (g + 1) * cin], cut(flow, eps, g))[1] for g, s in enumerate(singles))
        torch.testing.assert_close(ll, total, atol=1e-10, rtol=0)
    cout = module.out_channels // G
    for sample in (False, True):
        xs = flow.inverse(y, sample=sample, noise=inv_noise if sample else None)
        parts = [
            s.inverse(y[:, g * cout : (g + 1) * cout], sample, cut(flow, inv_noise, g, inverse=True))
            for g, s in enumerate(singles)
        ]
        torch.testing.assert_close(xs, torch.cat(parts, 1), atol=1e-10, rtol=0)


def test_depthwise_is_one_layer_with_batched_factors():
    """Not one module per group: a 64-channel depthwise conv has the same few submodules as a conv."""
    conv = nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64)
    flow = FlowGroupedConv.from_module(conv, (64, 9, 9))
    assert len(list(flow.modules())) <= 6 and flow.kernel.groups == 64
    assert flow.kernel.block_inverse().shape == (64, 1, 1)
    assert flow.kernel.dropped.weight.shape == (64 * 8, 1)  # A_g: 8 dropped taps given 1 output, per group
    with torch.no_grad():
        torch.testing.assert_close(
            flow.kernel.logdet(), torch.linalg.slogdet(flow.kernel.block().double())[1].sum().float()
        )


def test_bijective_grouped_conv_logdet_matches_autograd():
    _, shape, flow = build("pointwise_groups")
    assert flow.exact
    x = torch.randn(2, *shape, dtype=torch.float64)
    expected = autograd_logdet(flow, x)
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(flow.call_and_ll(x)[1], expected, atol=1e-10, rtol=0)


def test_exact_grouped_conv_integrates_to_one():
    torch.manual_seed(3)
    module = nn.Conv1d(2, 2, 1, groups=2).double()
    flow = FlowGroupedConv.from_module(module, (2, 1))

    def log_p(pts):
        y, ll = flow.call_and_ll(pts.reshape(-1, 2, 1))
        return base_log_prob(y) + ll

    w = module.weight.reshape(-1).abs().min().item()
    centre = flow.inverse(torch.zeros(1, 2, 1, dtype=torch.float64)).reshape(-1).tolist()
    r = 9.0 / w
    total = grid_integral(log_p, [(c - r, c + r) for c in centre], points=500)
    assert abs(total - 1.0) < 2e-3, total


def test_exact_grouped_funnel_integrates_to_one():
    """The smallest grouped funnel (2 groups, 2 taps -> 1 output each: 4 dimensions) with a
    non-trivial block-diagonal density of the dropped taps; midpoint rule, 26 points per axis."""
    torch.manual_seed(3)
    module = nn.Conv1d(2, 2, 2, stride=2, groups=2).double()
    flow = FlowGroupedConv.from_module(module, (2, 2))
    assert flow.exact and flow.kernel.kind == "funnel"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q = flow.kernel.dropped
        q.weight.copy_(0.5 * torch.randn(q.weight.shape, generator=gen, dtype=torch.float64))
        q.log_scale.copy_(0.3 * torch.randn(q.log_scale.shape, generator=gen, dtype=torch.float64))

    def log_p(pts):
        y, ll = flow.call_and_ll(pts.reshape(-1, 2, 2))
        return base_log_prob(y) + ll

    with torch.no_grad():
        total = grid_integral(log_p, [(-7.0, 7.0)] * 4, points=26)
    assert abs(total - 1.0) < 3e-3, total


def test_overlapping_grouped_conv_is_a_bound():
    torch.manual_seed(1)
    module = nn.Conv1d(2, 4, 2, groups=2).double()  # the middle pixel is in two windows: duplicated
    flow = FlowGroupedConv.from_module(module, (2, 3))
    assert not flow.exact
    check_iw_bound(flow, torch.randn(2, 2, 3, dtype=torch.float64), repeats=60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_round_trips(dtype, batch):
    tol = dict(atol=1e-4, rtol=0) if dtype == torch.float32 else dict(atol=1e-9, rtol=0)
    # funnel blocks: forward(inverse(y)) == y, with means and with draws
    _, shape, flow = build("depthwise_multiplier", dtype)
    flow = flow.to(dtype)
    y = flow(torch.randn(batch, *shape, dtype=dtype))
    for sample in (False, True):
        torch.testing.assert_close(flow(flow.inverse(y, sample=sample)), y, **tol)
    noise = flow.draw_inverse_noise(y)
    torch.testing.assert_close(flow.inverse(y, True, noise), flow.inverse(y, True, noise))
    # bijective blocks: both directions
    _, shape, flow = build("pointwise_groups", dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    torch.testing.assert_close(flow.inverse(flow(x)), x, **tol)
    # augmenting blocks (padding, overlapping windows): inverse(noisy forward(x)) == x
    _, shape, flow = build("conv1d_augment", dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    y, _ = flow.call_and_ll(x, flow.draw_noise(x))
    assert flow.kernel.kind == "augment"
    torch.testing.assert_close(flow.inverse(y), x, **tol)


def test_groups_must_divide_channels():
    with pytest.raises(LayerConfigurationError):
        FlowGroupedConv(torch.randn(3, 2, 3, 3), input_shape=(4, 5, 5), groups=2)


def test_full_training_keeps_forward_likelihood_and_inverse_on_the_same_weights():
    """Regression (silent corruption after fit(train="all") with grouped convolutions): the
    trained kernels and biases are used by flow(x), by the likelihood pass and by the inverse."""
    import flowconvert as fc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, stride=2, groups=2), nn.Flatten()).double()
    x = torch.randn(64, 2, 4, 4, dtype=torch.float64)
    flow = fc.convert(model, x[:1])
    layer = next(m for m in flow.modules() if isinstance(m, FlowGroupedConv))
    w0, b0 = layer.weight.clone(), layer.bias.clone()
    fc.fit(flow, x, epochs=3, lr=1e-2, train="all", progress=False)
    assert not torch.allclose(layer.weight, w0) and not torch.allclose(layer.bias, b0)
    trained = torch.nn.functional.conv2d(x, layer.weight, layer.bias, stride=2, groups=2).flatten(1)
    with torch.no_grad():
        y, _ = flow.forward_with_log_prob(x, deterministic=True)
        assert torch.equal(flow(x), trained)
        torch.testing.assert_close(y, trained, atol=1e-10, rtol=0)
        # the kernel is the trained convolution (a view, nothing to copy back)
        assert layer.kernel.weight.data_ptr() == layer.weight.data_ptr() and layer.kernel.bias is layer.bias
        torch.testing.assert_close(
            layer.kernel.logdet(), torch.linalg.slogdet(layer.kernel.block())[1].sum(), atol=1e-12, rtol=0
        )
        z = flow(x[:5])
        for sample in (False, True):
            torch.testing.assert_close(flow(flow.inverse(z, sample=sample)), z, atol=1e-9, rtol=0)


GEOMETRY_CASES = {
    **CASES,
    "dense_padded": (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 5)),
    "dense_augment": (lambda: nn.Conv2d(1, 16, 3, padding=1), (1, 5, 5)),
    "dense_dropped": (lambda: nn.Conv2d(3, 2, 1, stride=2), (3, 5, 5)),
}


@pytest.mark.parametrize("name", list(GEOMETRY_CASES))
def test_the_audit_verdict_is_the_built_layer(name):
    """audit decides from the geometry alone: exactness and the densities' size equal the built layer's."""
    import flowconvert as fc
    from flowconvert.conv import conv_geometry
    from flowconvert.reporting import density_parameters

    make, shape = GEOMETRY_CASES[name]
    module = make()
    geo = conv_geometry(
        module.weight.shape, shape, module.stride, module.padding, module.dilation, module.groups, module.padding_mode
    )
    layer = FlowConv.from_module(module, shape)
    assert geo.exact == layer.exact
    assert geo.density_parameters() == density_parameters([layer])
    report = fc.audit(nn.Sequential(module), torch.randn(1, *shape), base="standard")  # no base parameters
    assert report.convertible and report.density_parameters == density_parameters([layer])


def test_calibration_fits_each_group_on_its_own_outputs():
    """The block-diagonal density is calibrated in closed form group by group: A_g, c_g, sigma_g are the
    least squares of each group's dropped taps on that group's outputs (2 groups of 3 outputs, 5 dropped taps)."""
    import flowconvert as fc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 2, stride=2, groups=2), nn.Flatten()).double()
    x = torch.randn(400, 4, 4, 4, dtype=torch.float64) * torch.linspace(0.5, 2.0, 4, dtype=torch.float64)[:, None, None]
    x[:, 1] += 0.8 * x[:, 0]  # correlated channels: the dropped taps depend on the outputs
    flow = fc.convert(model, x[:1])
    layer = next(m for m in flow.modules() if isinstance(m, FlowGroupedConv))
    q = layer.kernel.dropped
    assert q.linear_regressors().shape == (10, 3)
    fc.calibrate(flow, x[:300], val_data=x[300:], deterministic=True, ridge=0.0)
    d, y = layer.observe(x[:300])["kernel.dropped"]
    for g in range(2):
        yg = torch.cat([y[:, 3 * g : 3 * g + 3], torch.ones(len(y), 1, dtype=y.dtype)], 1)
        sol = torch.linalg.lstsq(yg, d[:, 5 * g : 5 * g + 5]).solution
        torch.testing.assert_close(q.weight[5 * g : 5 * g + 5].detach(), sol[:3].mT, atol=1e-8, rtol=0)
        torch.testing.assert_close(q.bias[5 * g : 5 * g + 5].detach(), sol[3], atol=1e-8, rtol=0)
        resid = d[:, 5 * g : 5 * g + 5] - yg @ sol
        torch.testing.assert_close(
            q.log_scale[5 * g : 5 * g + 5].detach(), 0.5 * resid.square().mean(0).log(), atol=1e-8, rtol=0
        )
