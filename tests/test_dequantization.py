"""Dequantization convention, bits/dim and the importance-weighted bound."""

import math

import torch

import flowconvert as fc
from chainflow import Chain


class UniformCube(torch.nn.Module):
    """Uniform density on [0, 1)^D: log p = 0 inside."""

    exact = True

    def log_prob(self, x, deterministic=False):
        inside = ((x >= 0) & (x < 1)).all(1)
        return torch.where(inside, 0.0, -math.inf)


def test_dequantized_points_stay_in_their_cell():
    deq = fc.Dequantize(levels=17)
    k = torch.randint(0, 17, (1000, 5))
    x = deq(k)
    assert torch.equal(deq.quantize(x), k)
    assert torch.equal(deq.quantize(deq.center(k)), k)
    assert x.min() >= 0 and x.max() < 1


def test_uniform_density_scores_log2_levels_bits_per_dim():
    deq = fc.Dequantize(levels=17)
    k = torch.randint(0, 17, (64, 8))
    bpd = fc.bits_per_dim(UniformCube(), k, dequantize=deq)
    assert abs(bpd - math.log2(17)) < 1e-5


def test_affine_scale_enters_the_log_det():
    deq = fc.Dequantize(levels=4, scale=2.0, shift=-1.0)
    assert math.isclose(deq.log_det(3), 3 * (math.log(2.0) - math.log(4)))
    assert deq(torch.tensor([[0, 3]]), noise=torch.zeros(1, 2)).tolist() == [[-1.0, 0.5]]


def _augment_model(offset: float) -> Chain:
    """1 -> 2 augmenting linear map and a standard-normal base, float64.

    W = (0, 1.5)^T: the noise goes on output 0 (the row that is not kept, W_0 = 0), so
    y_0 = offset + tau * eps, and the exact marginal is log p(x) = log 1.5 + log N(y_1; 0, 1).
    """
    w = torch.tensor([[0.0], [1.5]], dtype=torch.float64)
    layer = fc.FlowLinear(w, torch.tensor([offset, 0.3], dtype=torch.float64))
    assert layer.noise_index.tolist() == [0] and layer.kept_index.tolist() == [1]
    return Chain(layer, out_shape=(2,)).double()


def test_importance_weighting_tightens_with_more_samples():
    torch.manual_seed(0)
    flow = _augment_model(offset=1.5)
    assert not flow.exact
    x = torch.randn(2000, 1, dtype=torch.float64)
    lin = flow.layers[0]
    y = x @ lin.weight.mT + lin.bias
    y_kept = y[:, 1]
    exact = (math.log(1.5) + (-0.5 * y_kept**2 - 0.5 * math.log(2 * math.pi))).mean().item()
    bounds = [fc.log_likelihood(flow, x, num_samples=k).mean().item() for k in (1, 8, 64)]
    # the gap at K=1 is KL(q || posterior) = offset^2 / 2 = 1.125 nats; it must shrink with K
    assert abs(exact - bounds[0] - 1.125) < 0.1, (exact, bounds)
    assert bounds[0] < bounds[1] - 0.3 and bounds[1] < bounds[2], bounds
    assert bounds[2] <= exact + 0.01 and exact - bounds[2] < 0.1, (exact, bounds)


def test_deterministic_evaluation_ignores_num_samples():
    flow = _augment_model(offset=0.5)
    x = torch.randn(10, 1, dtype=torch.float64)
    a = fc.log_likelihood(flow, x, deterministic=True)
    b = fc.log_likelihood(flow, x, deterministic=True, num_samples=5)
    assert torch.equal(a, b)


def test_flow_model_bits_per_dim_method_matches_the_function():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LeakyReLU(0.5), torch.nn.Linear(4, 3))
    flow = fc.convert(net, torch.rand(2, 6), base="diagonal")
    x = torch.randint(0, 5, (40, 6)).float()
    deq = fc.Dequantize(5)
    torch.manual_seed(1)
    via_method = flow.bits_per_dim(x, dequantize=deq, batch_size=16)
    torch.manual_seed(1)
    via_function = fc.bits_per_dim(flow, x, dequantize=deq, batch_size=16)
    assert via_method == via_function
    assert flow.bits_per_dim(x / 4, deterministic=True) == fc.bits_per_dim(flow, x / 4, deterministic=True)
