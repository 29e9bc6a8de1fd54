"""The rule registry: spellings, refusals, extension, and rules that fail to build."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowconvert as fc
from flowconvert.registry import REGISTRY, Registry, Rejection
from flowconvert.shapes import FlowIdentity, Permute, Reshape


def layers_of(model, x):
    flow = fc.convert(model, x)
    return {name: type(layer) for name, layer in flow.layers.items()}


@pytest.mark.parametrize(
    "key, kind",
    [
        (nn.Linear, "module"),
        (nn.Conv1d, "module"),
        (nn.Conv2d, "module"),
        (nn.LeakyReLU, "module"),
        (nn.Flatten, "module"),
        (nn.Identity, "module"),
        (nn.Dropout, "module"),
        (F.linear, "function"),
        (F.conv1d, "function"),
        (F.conv2d, "function"),
        (F.leaky_relu, "function"),
        (torch.flatten, "function"),
        (torch.reshape, "function"),
        (torch.permute, "function"),
        ("view", "method"),
        ("reshape", "method"),
        ("squeeze", "method"),
        ("unsqueeze", "method"),
        ("permute", "method"),
        ("transpose", "method"),
        ("contiguous", "method"),
    ],
)
def test_supported_spellings_have_rules(key, kind):
    table = {"module": REGISTRY.modules, "function": REGISTRY.functions, "method": REGISTRY.methods}[kind]
    assert key in table


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) + 3 * torch.eye(6))

    def forward(self, x):  # x: (B, 2, 3)
        h = torch.flatten(x, 1)
        h = F.leaky_relu(F.linear(h, self.w), negative_slope=0.2)
        h = h.reshape(h.size(0), 3, 2).transpose(1, 2)
        return h.permute(0, 2, 1).contiguous().view(h.shape[0], -1)


def test_functional_and_method_spellings_convert():
    torch.manual_seed(0)
    model = Spellings()
    layers = layers_of(model, torch.randn(1, 2, 3))
    assert layers == {
        "flatten": Reshape,
        "linear": fc.FlowLinear,
        "leaky_relu": fc.FlowLeakyReLU,
        "reshape": Reshape,
        "transpose": Permute,
        "permute": Permute,
        "contiguous": FlowIdentity,
        "view": Reshape,
    }
    flow = fc.convert(model, torch.randn(1, 2, 3))
    x = torch.randn(4, 2, 3)
    assert torch.equal(flow(x), model(x))
    assert torch.equal(flow.layers["linear"].weight, model.w.detach())
    assert flow.layers["leaky_relu"].negative_slope == 0.2


@pytest.mark.parametrize(
    "layer, code",
    [
        (nn.ReLU(), "FC101"),
        (nn.GELU(), "FC102"),
        (nn.SiLU(), "FC102"),
        (nn.LayerNorm(4), "FC103"),
        (nn.Softmax(dim=1), "FC104"),
        (nn.ReLU6(), "FC106"),
        (nn.Softsign(), "FC110"),
        (nn.LeakyReLU(0.0), "FC202"),
        (nn.LeakyReLU(-0.1), "FC202"),
    ],
)
def test_refused_modules_get_their_codes(layer, code):
    report = fc.audit(nn.Sequential(nn.Linear(4, 4), layer), torch.randn(1, 4))
    assert report.counts == {code: 1}
    ((node, problem),) = report.problems
    assert node.name == "_1" and node.status == "rejected" and problem.hint


class FunctionalRefusals(nn.Module):
    def forward(self, x):
        a = torch.relu(x)
        b = F.gelu(a)
        c = torch.cumsum(b, 1)
        d = c.cumsum(1)
        e = F.lp_pool1d(d, 2.0, 2)
        return F.dropout(e, 0.5, training=True)


def test_refused_functions_and_methods_get_their_codes():
    report = fc.audit(FunctionalRefusals(), torch.randn(1, 2, 4))
    codes = {n.name: n.code for n in report.nodes if n.status == "rejected"}
    assert codes == {
        "relu": "FC101",
        "gelu": "FC102",
        "cumsum": "FC111",
        "cumsum_1": "FC112",
        "lp_pool1d": "FC105",
        "dropout": "FC114",
    }


def test_permuting_the_batch_dimension_is_refused():
    class Swap(nn.Module):
        def forward(self, x):
            return x.transpose(0, 1)

    report = fc.audit(Swap(), torch.randn(3, 3))
    assert report.counts == {"FC113": 1}


def test_singular_weight_is_a_rejected_node_not_a_crash():
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight[1] = lin.weight[0]  # rank 3
    report = fc.audit(nn.Sequential(lin, nn.LeakyReLU()), torch.randn(1, 4))
    assert report.counts == {"FC201": 1}
    assert "singular value" in report.nodes[1].reason


def test_a_rule_that_crashes_is_reported_as_fc120():
    registry = Registry(dict(REGISTRY.modules), dict(REGISTRY.functions), dict(REGISTRY.methods))

    @registry.add_module(nn.Linear)
    def broken(ctx):
        raise RuntimeError("boom")

    report = fc.audit(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2), registry=registry)
    assert report.counts == {"FC120": 1} and "boom" in report.nodes[1].reason


class Scale(nn.Module):
    """A user's own layer: y = 2 x (spelled with a function that has no rule)."""

    def forward(self, x):
        return torch.ldexp(x, torch.tensor(1.0))


class FlowScale(fc.FlowLayer):
    def call_and_ll(self, x, noise=None):
        return 2 * x, x.new_full((x.shape[0],), x[0].numel() * torch.log(torch.tensor(2.0)).item())

    def inverse(self, y, sample=False, noise=None):
        return y / 2


def test_registering_a_rule_extends_support():
    registry = Registry(dict(REGISTRY.modules), dict(REGISTRY.functions), dict(REGISTRY.methods))
    model = nn.Sequential(nn.Linear(3, 3), Scale())
    assert fc.audit(model, torch.randn(1, 3), registry=registry).counts == {"FC111": 1}  # traced: torch.ldexp
    registry.add_module(Scale)(lambda ctx: FlowScale())
    flow = fc.convert(model, torch.randn(1, 3), registry=registry)
    assert isinstance(flow.layers["_1"], FlowScale)
    x = torch.randn(2, 3)
    assert torch.equal(flow(x), model(x))
    assert REGISTRY.lookup_module(Scale()) is None  # the default registry is untouched


def test_rejection_carries_code_and_message():
    registry = Registry()
    registry.reject("FC107", "activation", methods=["tanh"])
    with pytest.raises(Rejection) as info:
        registry.methods["tanh"].build(type("Ctx", (), {"node": type("N", (), {"name": "t"})()})())
    assert info.value.code == "FC107" and "`t`" in info.value.message
    assert registry.lookup_function(operator.add) is None
