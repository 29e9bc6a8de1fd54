"""Substitution policies: the ReLU family under relu="leaky", named substitutes, per-node deviations."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import jacobian

import flowconvert as fc
from flowconvert.activations import FlowLeakyClamp
from flowconvert.registry import SUBSTITUTIONS, resolve_substitutions
from obligations import base_log_prob, grid_integral

D64 = torch.float64
CLAMPS = {
    "relu6": lambda: FlowLeakyClamp(0.0, 6.0, 0.1),
    "hardtanh": lambda: FlowLeakyClamp(-1.0, 1.0, 0.2),
    "hardsigmoid": lambda: FlowLeakyClamp(0.0, 1.0, 0.1, 1 / 6, 0.5),
    "min_only": lambda: FlowLeakyClamp(-0.5, None, 0.3),
    "max_only": lambda: FlowLeakyClamp(None, 0.5, 0.3),
}


@pytest.mark.parametrize("name", list(CLAMPS))
def test_leaky_clamp_is_an_exact_bijection(name):
    layer = CLAMPS[name]()
    x = 4 * torch.randn(5, 7, dtype=D64)
    y, ll = layer.call_and_ll(x)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-12, rtol=0)
    kept = x.clone()
    with torch.no_grad():  # the untracked path works in place on its own temporaries, never on x
        y0, ll0 = layer.call_and_ll(x)
    assert torch.equal(y0, y) and torch.equal(ll0, ll) and torch.equal(x, kept)
    for i in range(5):
        J = jacobian(lambda v: layer.call_and_ll(v.reshape(1, -1))[0].reshape(-1), x[i])
        torch.testing.assert_close(ll[i], torch.linalg.slogdet(J)[1], atol=1e-10, rtol=0)
    u = x * layer.scale + layer.shift
    inside = torch.ones_like(u, dtype=torch.bool)
    if layer.low is not None:
        inside &= u >= layer.low
    if layer.high is not None:
        inside &= u <= layer.high
    clamp = torch.clamp(u, min=layer.low, max=layer.high)
    assert torch.equal(y[inside], clamp[inside]) and inside.any() and (~inside).any()


@pytest.mark.parametrize("name", ["relu6", "hardsigmoid"])
def test_leaky_clamp_integrates_to_one(name):
    layer = CLAMPS[name]()
    log_p = lambda p: base_log_prob(layer.call_and_ll(p)[0]) + layer.call_and_ll(p)[1]
    lo, hi = (-60.0, 70.0) if name == "relu6" else (-200.0, 200.0)
    assert abs(grid_integral(log_p, [(lo, hi)], points=40000) - 1.0) < 2e-3


class Saturating(nn.Module):
    """Every spelling of the ReLU family, one after another between square linear maps."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.relu6, self.hardtanh, self.hardsigmoid = nn.ReLU6(), nn.Hardtanh(-2.0, 2.0), nn.Hardsigmoid()

    def forward(self, x):
        h = self.relu6(3 * self.l1(x))
        h = F.relu6(h - 3)
        h = self.hardtanh(self.l2(h))
        h = F.hardtanh(h, -0.5, 0.5)
        h = self.hardsigmoid(4 * self.l3(h))
        h = torch.clamp(h, 0.2, 0.8)
        h = h.clamp(min=0.3)
        h = torch.clip(h, max=0.7)
        h = h.clamp_min(0.35)
        return F.relu(h - 0.5) + F.hardsigmoid(h)


def test_relu_family_refused_by_default_with_the_policy_in_the_message():
    torch.manual_seed(0)
    report = fc.audit(Saturating(), torch.randn(4, 6))
    assert report.counts == {"FC101": 1, "FC106": 10}
    messages = [p.message for _, p in report.problems]
    assert all('relu="leaky"' in m for m in messages)
    assert all("relu=" in p.hint for _, p in report.problems)


def test_relu_family_substituted_with_per_node_deviations():
    torch.manual_seed(0)
    model = Saturating().double().eval()
    x = torch.randn(64, 6, dtype=D64)
    flow = fc.convert(model, x, relu="leaky", negative_slope=0.05)
    report = flow.report
    subs = report.substitutions
    assert len(subs) == 11 and all(n.deviation is not None and n.accumulated_deviation is not None for n in subs)
    assert sum(n.deviation > 0 for n in subs) >= 8  # a node whose input stays inside its bounds deviates by 0
    # the overall output deviation is what the flow really does
    assert report.max_output_deviation == pytest.approx((flow(x) - model(x)).abs().max().item(), rel=1e-9, abs=1e-12)
    # a node's own deviation, by hand: the first ReLU6 on the original input 3 * l1(x)
    first = next(n for n in subs if n.name == "relu6")
    v = 3 * model.l1(x)
    own = (FlowLeakyClamp(0.0, 6.0, 0.05)(v) - F.relu6(v)).abs().max().item()
    assert first.deviation == pytest.approx(own, rel=1e-12) and first.accumulated_deviation == pytest.approx(
        own, rel=1e-12
    )
    # later nodes accumulate the earlier substitutions
    assert max(n.accumulated_deviation for n in subs) > 0
    text = str(report)
    assert "output deviation" in text and "accumulated" in text
    data = json.loads(report.to_json())
    assert len(data["substitutions"]) == 11 and all(s["deviation"] is not None for s in data["substitutions"])
    assert "accumulated" in report.to_markdown()
    assert torch.isfinite(flow.log_prob(x)).all()
    assert torch.isfinite(flow.inverse(flow(x))).all()  # h feeds two nodes (duplication): no exact round trip


class Smooth(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.gelu, self.hs = nn.GELU(), nn.Hardswish()

    def forward(self, x):
        return F.silu(self.l2(self.hs(self.gelu(self.l1(x))))) + F.mish(x)


def test_gelu_family_stays_refused_under_relu_leaky():
    report = fc.audit(Smooth(), torch.randn(2, 4), relu="leaky")
    assert report.counts == {"FC102": 4}
    assert all('substitute={"' in p.message for _, p in report.problems)
    assert "substitute=" in report.problems[0][1].hint


def test_gelu_family_substituted_when_named():
    torch.manual_seed(0)
    model = Smooth().double().eval()
    x = torch.randn(16, 4, dtype=D64)
    named = {"gelu": "leaky", "silu": "leaky", "hardswish": "leaky", "mish": "leaky"}
    flow = fc.convert(model, x, substitute=named)
    assert len(flow.report.substitutions) == 4
    assert all(n.deviation > 0 for n in flow.report.substitutions)
    assert (flow(x) - model(x)).abs().max().item() == pytest.approx(flow.report.max_output_deviation, rel=1e-9)
    partial = fc.audit(model, x, substitute={"gelu": "leaky"})
    assert partial.counts == {"FC102": 3}


def test_substitute_mapping_is_validated_and_can_opt_out():
    with pytest.raises(ValueError, match="unknown activation family"):
        resolve_substitutions(None, {"softmax": "leaky"})
    with pytest.raises(ValueError, match="must be one of"):
        resolve_substitutions(None, {"gelu": "tanh"})
    with pytest.raises(ValueError, match="relu must be"):
        fc.audit(nn.ReLU(), torch.randn(1, 2), relu="elu")
    assert set(resolve_substitutions("leaky")) == {f for f, s in SUBSTITUTIONS.items() if s.with_relu_leaky}
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU6(), nn.Linear(3, 3), nn.ReLU())
    assert fc.audit(model, torch.randn(2, 3), relu="leaky", substitute={"relu6": None}).counts == {"FC106": 1}


def test_clamp_with_tensor_bounds_is_refused():
    class TensorBound(nn.Module):
        def forward(self, x):
            return torch.clamp(x, min=x.mean(1, keepdim=True))

    report = fc.audit(TensorBound(), torch.randn(2, 3), relu="leaky")
    assert "FC106" in report.counts or "FC305" in report.counts


def test_attention_se_and_layernorm_stay_refused_with_their_codes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.se = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid())

        def forward(self, x):
            h, _ = self.attn(x, x, x)
            h = self.norm(h)
            return h * self.se(h.mean(1, keepdim=True))

    report = fc.audit(Block(), torch.randn(2, 5, 8), relu="leaky", substitute={"gelu": "leaky"})
    assert {"FC131", "FC103"} <= set(report.counts)


def test_substituted_flow_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.Linear(4, 4), nn.Hardsigmoid()).eval()
    x = torch.randn(8, 4)
    flow = fc.convert(model, x, relu="leaky")
    fc.save(flow, tmp_path / "flow.safetensors")
    loaded = fc.load(tmp_path / "flow.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), flow(x), atol=0, rtol=0)
        torch.testing.assert_close(loaded.log_prob(x, deterministic=True), flow.log_prob(x, deterministic=True))
