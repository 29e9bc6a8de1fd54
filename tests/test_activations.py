"""FlowLeakyReLU against the obligations of docs/mathematics.md section 12."""

import math

import pytest
import torch

from flowconvert import FlowLeakyReLU, LayerConfigurationError
from obligations import autograd_logdet, grid_integral, log_density


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch", [1, 5])
def test_equals_original(dtype, atol, batch):
    module = torch.nn.LeakyReLU(0.2)
    flow = FlowLeakyReLU.from_module(module)
    x = torch.randn(batch, 3, 4, dtype=dtype)
    y, ll = flow.call_and_ll(x)
    torch.testing.assert_close(y, module(x), atol=atol, rtol=0)
    assert torch.equal(flow(x), module(x)) and ll.shape == (batch,)


def test_logdet_matches_autograd_jacobian():
    flow = FlowLeakyReLU(0.3)
    x = torch.randn(4, 6, dtype=torch.float64)
    x[:, 0] = -1.0  # at least one negative coordinate: the log-det is non-zero
    expected = autograd_logdet(flow, x)
    assert (expected.abs() > 0.1).all()
    torch.testing.assert_close(flow.call_and_ll(x)[1], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dim", [1, 2])
def test_integrates_to_one(dim):
    flow = FlowLeakyReLU(0.25)
    total = grid_integral(lambda p: log_density(flow, p), [(-40.0, 10.0)] * dim, points=20000 if dim == 1 else 800)
    assert abs(total - 1.0) < 2e-3, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trips(dtype):
    flow = FlowLeakyReLU(0.1)
    x = torch.randn(7, 5, dtype=dtype)
    torch.testing.assert_close(flow.inverse(flow(x)), x)
    torch.testing.assert_close(flow(flow.inverse(x)), x)


@pytest.mark.parametrize("slope", [0.0, -0.1, math.nan])
def test_non_positive_slope_is_refused(slope):
    with pytest.raises(LayerConfigurationError) as err:
        FlowLeakyReLU(slope)
    assert err.value.code == "FC202"


def test_log_det_counts_negatives_at_every_shape_dtype_and_empty_batch():
    """``n_-(x) log s`` per sample (the kept vector of ``-log s`` follows width and dtype); an empty
    batch gives an empty result."""
    flow = FlowLeakyReLU(0.1)
    for shape, dtype in (((3, 5), torch.float32), ((2, 3, 4, 4), torch.float64), ((3, 5), torch.float64)):
        x = torch.randn(*shape, dtype=dtype)
        expected = (x < 0).reshape(shape[0], -1).sum(1).to(dtype) * math.log(0.1)
        ll = flow.call_and_ll(x)[1]
        assert ll.dtype == dtype
        torch.testing.assert_close(ll, expected, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    y, ll = flow.call_and_ll(torch.randn(0, 3, 4))
    assert y.shape == (0, 3, 4) and ll.shape == (0,)
