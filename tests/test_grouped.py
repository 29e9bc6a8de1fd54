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


@pytest.mark.parametrize("name", list(CASES))
def test_contribution_is_the_sum_over_blocks(name):
    module, shape, flow = build(name)
    x = torch.randn(2, *shape, dtype=torch.float64)
    noise = flow.draw_noise(x)
    _, ll = flow.call_and_ll(x, noise)
    # each block is a groups=1 convolution of its channel slice
    G, cin, cout = module.groups, shape[0] // module.groups, module.out_channels // module.groups
    noises = FlowGroupedConv._cut(noise, flow._block_noise_shapes(False))
    total = 0
    for g in range(G):
        ref = nn.Conv2d if module.weight.dim() == 4 else nn.Conv1d
        block = ref(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation).double()
        with torch.no_grad():
            block.weight.copy_(module.weight[g * cout : (g + 1) * cout])
            block.bias.copy_(module.bias[g * cout : (g + 1) * cout])
        single = FlowConv.from_module(block, (cin, *shape[1:]))
        single.load_state_dict(flow.blocks[g].state_dict())
        total = total + single.call_and_ll(x[:, g * cin : (g + 1) * cin], noises[g])[1]
    torch.testing.assert_close(ll, total, atol=1e-10, rtol=0)


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
    _, shape, flow = build("conv1d_groups", dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    y, _ = flow.call_and_ll(x, flow.draw_noise(x))
    if all(b.kernel.kind != "funnel" for b in flow.blocks):
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
        for g, block in enumerate(layer.blocks):  # the blocks' kernels are the trained weights
            torch.testing.assert_close(
                block.kernel.weight.reshape(2, -1), layer.weight[2 * g : 2 * g + 2].reshape(2, -1)
            )
            torch.testing.assert_close(block.kernel.bias, layer.bias[2 * g : 2 * g + 2])
        z = flow(x[:5])
        for sample in (False, True):
            torch.testing.assert_close(flow(flow.inverse(z, sample=sample)), z, atol=1e-9, rtol=0)
