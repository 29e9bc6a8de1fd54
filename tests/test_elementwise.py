"""Elementwise bijections (BatchNorm, ELU/SELU, Tanh, Sigmoid, Softplus, PReLU, scalar affine) against the obligations of docs/mathematics.md section 12."""

import math

import pytest
import torch

from flowconvert import LayerConfigurationError
from flowconvert.elementwise import (
    FlowBatchNorm,
    FlowELU,
    FlowPReLU,
    FlowScalarAffine,
    FlowSigmoid,
    FlowSoftplus,
    FlowTanh,
)
from obligations import autograd_logdet, grid_integral, log_density


def batchnorm(dims=2, channels=3, dtype=torch.float64, affine=True):
    torch.manual_seed(1)
    cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d}[dims]
    bn = cls(channels, affine=affine).to(dtype)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


def prelu(channels=3, dtype=torch.float64):
    m = torch.nn.PReLU(channels).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.1, 0.6, channels))
    return m


# (name, original module, flow layer, input shape per sample)
def cases(dtype):
    return {
        "batchnorm1d": (batchnorm(1, dtype=dtype), (3,)),
        "batchnorm1d_seq": (batchnorm(1, dtype=dtype), (3, 5)),
        "batchnorm2d": (batchnorm(2, dtype=dtype), (3, 2, 2)),
        "batchnorm2d_noaffine": (batchnorm(2, dtype=dtype, affine=False), (3, 2, 2)),
        "elu": (torch.nn.ELU(0.7), (4, 3)),
        "selu": (torch.nn.SELU(), (4, 3)),
        "tanh": (torch.nn.Tanh(), (4, 3)),
        "sigmoid": (torch.nn.Sigmoid(), (4, 3)),
        "softplus": (torch.nn.Softplus(), (4, 3)),
        "softplus_beta": (torch.nn.Softplus(beta=2.5, threshold=15.0), (4, 3)),
        "prelu": (prelu(dtype=dtype), (3, 2, 2)),
        "prelu_single": (torch.nn.PReLU(init=0.3).to(dtype), (3, 4)),
    }


def flow_of(module):
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return FlowBatchNorm.from_module(module)
    table = {
        torch.nn.ELU: FlowELU,
        torch.nn.SELU: FlowELU,
        torch.nn.Tanh: FlowTanh,
        torch.nn.Sigmoid: FlowSigmoid,
        torch.nn.Softplus: FlowSoftplus,
        torch.nn.PReLU: FlowPReLU,
    }
    return table[type(module)].from_module(module)


AFFINE = {
    "mul": (lambda x: x * 2.5, FlowScalarAffine("mul", 2.5)),
    "rmul_neg": (lambda x: -0.5 * x, FlowScalarAffine("mul", -0.5)),
    "add": (lambda x: x + 1.0, FlowScalarAffine("add", 1.0)),
    "sub": (lambda x: x - 3, FlowScalarAffine("sub", 3)),
    "rsub": (lambda x: 2.0 - x, FlowScalarAffine("rsub", 2.0)),
    "div": (lambda x: x / 3.0, FlowScalarAffine("div", 3.0)),
    "neg": (lambda x: -x, FlowScalarAffine("neg")),
    "mul_0d": (lambda x: x * torch.tensor(0.75), FlowScalarAffine("mul", torch.tensor(0.75))),
    "mul_channel": (
        lambda x: x * torch.tensor([[0.5], [-2.0], [3.0]], dtype=x.dtype),
        FlowScalarAffine("mul", torch.tensor([[0.5], [-2.0], [3.0]])),
    ),
}


@pytest.mark.parametrize("name", list(cases(torch.float64)))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch", [1, 5])
def test_equals_original(name, dtype, atol, batch):
    module, shape = cases(dtype)[name]
    module = module.to(dtype)
    flow = flow_of(module).to(dtype)
    x = 3 * torch.randn(batch, *shape, dtype=dtype)
    y, ll = flow.call_and_ll(x)
    torch.testing.assert_close(y, module(x), atol=atol, rtol=0)
    assert torch.equal(flow(x), module(x))
    assert ll.shape == (batch,) and torch.isfinite(ll).all() and ll.dtype == dtype


@pytest.mark.parametrize("name", list(AFFINE))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_scalar_affine_equals_original(name, dtype, atol):
    fn, flow = AFFINE[name]
    flow = flow.to(dtype)
    x = torch.randn(4, 3, 2, dtype=dtype)
    y, ll = flow.call_and_ll(x)
    assert torch.equal(y, fn(x)) and ll.shape == (4,) and ll.dtype == dtype


@pytest.mark.parametrize("name", list(cases(torch.float64)))
def test_logdet_matches_autograd_jacobian(name):
    module, shape = cases(torch.float64)[name]
    flow = flow_of(module)
    x = 2 * torch.randn(3, *shape, dtype=torch.float64)
    x.reshape(3, -1)[:, 0] = -1.0  # a negative coordinate: the piecewise maps have a non-zero log-det
    expected = autograd_logdet(flow, x)
    assert (expected.abs() > 1e-3).all()
    torch.testing.assert_close(flow.call_and_ll(x)[1], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", [n for n in AFFINE if n not in ("add", "sub")])
def test_scalar_affine_logdet_matches_autograd_jacobian(name):
    _, flow = AFFINE[name]
    flow = flow.to(torch.float64)
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    expected = autograd_logdet(flow, x)
    torch.testing.assert_close(flow.call_and_ll(x)[1], expected, atol=1e-10, rtol=0)
    if name not in ("rsub", "neg"):
        assert (expected.abs() > 1e-3).all()


def _phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


# (layer, x-range holding all but a negligible part of the mass, base mass of the layer's range)
INTEGRATION = {
    "tanh": (FlowTanh(), (-12.0, 12.0), _phi(1) - _phi(-1)),
    "sigmoid": (FlowSigmoid(), (-40.0, 40.0), _phi(1) - _phi(0)),
    "elu": (FlowELU(0.6), (-40.0, 10.0), 1 - _phi(-0.6)),
    "softplus": (FlowSoftplus(beta=1.5), (-60.0, 10.0), 0.5),
    "prelu": (FlowPReLU(torch.tensor([0.3])), (-40.0, 10.0), 1.0),
    "div": (FlowScalarAffine("div", 0.4), (-5.0, 5.0), 1.0),
}


@pytest.mark.parametrize("name", list(INTEGRATION))
@pytest.mark.parametrize("dim", [1, 2])
def test_integrates_to_base_mass_of_range(name, dim):
    # p(x) = N(f(x)) |f'(x)| integrates to the base probability of f's range: 1 for maps onto
    # the real line, less for tanh (-1, 1), sigmoid (0, 1), ELU (-alpha, inf), softplus (0, inf).
    flow, (lo, hi), mass = INTEGRATION[name]
    flow = flow.to(torch.float64)
    total = grid_integral(lambda p: log_density(flow, p), [(lo, hi)] * dim, points=20000 if dim == 1 else 500)
    assert abs(total - mass**dim) < 2e-3 * dim, (total, mass**dim)


def test_batchnorm_integrates_to_one():
    flow = FlowBatchNorm.from_module(batchnorm(1, channels=2))
    a, b = flow._affine()
    centre = (-b / a).tolist()
    radius = (8 / a.abs()).tolist()
    bounds = [(c - r, c + r) for c, r in zip(centre, radius)]
    total = grid_integral(lambda p: log_density(flow, p), bounds, points=400)
    assert abs(total - 1.0) < 2e-3, total


@pytest.mark.parametrize("name", list(cases(torch.float64)) + ["affine_" + n for n in AFFINE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 6])
def test_round_trips(name, dtype, batch):
    if name.startswith("affine_"):
        flow = AFFINE[name[7:]][1].to(dtype)
        shape = (3, 2)
    else:
        module, shape = cases(dtype)[name]
        flow = flow_of(module.to(dtype)).to(dtype)
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    x = 2 * torch.randn(batch, *shape, dtype=dtype)
    torch.testing.assert_close(flow.inverse(flow(x)), x, **tol)
    y = flow(2 * torch.randn(batch, *shape, dtype=dtype))  # a point in the range
    torch.testing.assert_close(flow(flow.inverse(y)), y, **tol)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 30.0), (torch.float64, 300.0)])
@pytest.mark.parametrize(
    "flow", [FlowTanh(), FlowSigmoid(), FlowSoftplus(), FlowELU()], ids=["tanh", "sigmoid", "softplus", "elu"]
)
def test_saturated_inputs_have_finite_log_derivative(flow, dtype, big):
    x = torch.tensor([[-big, big, 0.0]], dtype=dtype)
    y, ll = flow.call_and_ll(x)
    assert torch.isfinite(ll).all() and torch.isfinite(flow.log_derivative(x)).all()
    ref = flow.log_derivative(torch.tensor([[-big, big, 0.0]], dtype=torch.float64))
    if isinstance(flow, FlowTanh):  # log tanh'(x) = log 4 - 2|x| - 2 log(1 + e^{-2|x|})
        expected = torch.tensor([[math.log(4) - 2 * big, math.log(4) - 2 * big, 0.0]], dtype=torch.float64)
        torch.testing.assert_close(ref, expected, atol=1e-9, rtol=1e-12)
    if isinstance(flow, FlowSigmoid):  # log sigmoid'(x) ~ -|x| in the tails
        torch.testing.assert_close(ref[0, :2], torch.tensor([-big, -big], dtype=torch.float64), atol=1e-9, rtol=1e-12)
    inv = flow.inverse(y)
    assert torch.isfinite(inv).all()


def test_inverses_clamp_saturated_outputs():
    for flow, y in [
        (FlowTanh(), [1.0, -1.0]),
        (FlowSigmoid(), [0.0, 1.0]),
        (FlowSoftplus(), [0.0]),
        (FlowELU(), [-1.0]),
    ]:
        assert torch.isfinite(flow.inverse(torch.tensor([y]))).all(), flow


def test_batchnorm_refusals():
    bn = batchnorm(2)
    with torch.no_grad():
        bn.weight[1] = 0.0
    with pytest.raises(LayerConfigurationError) as err:
        FlowBatchNorm.from_module(bn)
    assert err.value.code == "FC210" and "channel(s) [1]" in str(err.value)
    with pytest.raises(LayerConfigurationError) as err:
        FlowBatchNorm.from_module(batchnorm(2).train())
    assert err.value.code == "FC211" and "training mode" in str(err.value) and "eval()" in str(err.value)
    with pytest.raises(LayerConfigurationError) as err:
        FlowBatchNorm.from_module(torch.nn.BatchNorm2d(3, track_running_stats=False).eval())
    assert err.value.code == "FC211" and "running statistics" in str(err.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlowELU(0.0),
        lambda: FlowELU(-1.0),
        lambda: FlowPReLU(torch.tensor([0.2, 0.0, 0.1])),
        lambda: FlowPReLU(torch.tensor([-0.25])),
        lambda: FlowSoftplus(beta=0.0),
        # torch's switch to the identity at beta * x = threshold jumps down: not injective unless negligible
        lambda: FlowSoftplus(threshold=5.0),
        lambda: FlowSoftplus(beta=2.0, threshold=1.0),
        lambda: FlowSoftplus(threshold=-3.0),
    ],
)
def test_non_injective_parameters_are_refused(make):
    with pytest.raises(LayerConfigurationError) as err:
        make()
    assert err.value.code == "FC212"


@pytest.mark.parametrize(
    "op,c", [("mul", 0.0), ("div", 0), ("mul", math.inf), ("add", math.nan), ("mul", torch.tensor([1.0, 0.0]))]
)
def test_zero_or_non_finite_constant_is_refused(op, c):
    with pytest.raises(LayerConfigurationError) as err:
        FlowScalarAffine(op, c)
    assert err.value.code == "FC213"


def test_broadcasting_constant_is_refused_at_call():
    flow = FlowScalarAffine("mul", torch.ones(2, 1, 3))
    with pytest.raises(LayerConfigurationError):
        flow.call_and_ll(torch.ones(4, 3))


def test_batchnorm_log_det_cache_follows_its_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
    flow = FlowBatchNorm.from_module(bn).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def expected():
        a, _ = flow._affine()
        return 16 * a.abs().log().sum()

    torch.testing.assert_close(flow.call_and_ll(x)[1], expected().expand(2))
    with torch.no_grad():
        flow.running_var.mul_(3.0)  # an in-place edit: the version counter moves
    torch.testing.assert_close(flow.call_and_ll(x)[1], expected().expand(2))
    state = {k: v * 2 if k == "weight" else v for k, v in flow.state_dict().items()}
    flow.load_state_dict(state)
    torch.testing.assert_close(flow.call_and_ll(x)[1], expected().expand(2))
    flow.float()  # moved: recomputed in the new dtype
    assert flow.call_and_ll(x.float())[1].dtype == torch.float32
