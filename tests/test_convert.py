"""convert(): the zoo's flows compute the original function, a correct log-density and an inverse."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

import flowconvert as fc
from zoo import ZOO, IncreasingMLP, ReducingMLP, SquareMLP, make

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ids = [e.name for e in ZOO]


def _inputs(entry, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(entry.shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", ZOO, ids=ids)
def test_zoo_outputs_log_prob_and_inverse(entry, dtype):
    model = make(entry, dtype)
    x = _inputs(entry, dtype)
    flow = fc.convert(model, x[:1])
    assert flow.exact == entry.exact
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(flow(x), expected, atol=ATOL[dtype], rtol=0)
        out, lp = flow.forward_with_log_prob(x, deterministic=True)
        assert torch.allclose(out, expected, atol=ATOL[dtype], rtol=0)
        assert lp.shape == (x.shape[0],) and lp.dtype == dtype and torch.isfinite(lp).all()
        lp_stochastic = flow.log_prob(x)
        assert lp_stochastic.shape == (x.shape[0],) and torch.isfinite(lp_stochastic).all()
        assert flow.inverse(expected, sample=True).shape == x.shape
        assert flow.inverse(expected, sample=False).shape == x.shape
        assert flow.sample(2).shape == (2, *x.shape[1:])


def _square_entries():
    return [e for e in ZOO if e.square]


@pytest.mark.parametrize("entry", _square_entries(), ids=[e.name for e in _square_entries()])
def test_exact_bijections_match_autograd_logdet(entry):
    """float64: log p(x) = log N(f(x); 0, I) + log|det J_f(x)| with J from autograd."""
    model = make(entry, torch.float64)
    x = _inputs(entry, torch.float64)
    flow = fc.convert(model, x[:1])
    lp = flow.log_prob(x, deterministic=True)
    for i, xi in enumerate(x):
        fn = lambda v: model(v.reshape(1, *xi.shape)).reshape(-1)
        J = jacobian(fn, xi.reshape(-1).clone())
        z = fn(xi.reshape(-1))
        base = -0.5 * (z * z).sum() - 0.5 * math.log(2 * math.pi) * z.numel()
        expected = base + torch.linalg.slogdet(J)[1]
        assert lp[i].item() == pytest.approx(expected.item(), abs=1e-8)


def test_reducing_mlp_matches_the_funnel_formula():
    """A funnel chain is a bijection x -> (z, d1, d2) with densities on the dropped d_i:
    log p(x) = log N(z) + sum_i log q_i(d_i | y_i) + log|det J_{x -> (z, d1, d2)}|."""
    torch.manual_seed(0)
    model = ReducingMLP().double()
    x = torch.randn(3, 12, dtype=torch.float64)
    flow = fc.convert(model, x[:1])
    with torch.no_grad():  # give the conditional densities non-trivial parameters
        for layer in flow.layers.values():
            if getattr(layer, "dropped", None) is not None:
                layer.dropped.weight.normal_(0, 0.3)
                layer.dropped.bias.normal_(0, 0.3)
                layer.dropped.log_scale.normal_(0, 0.2)
    lin1, act, lin2 = model.net
    f1, f2 = flow.layers["net_0"], flow.layers["net_2"]
    s1, s2 = f1.dropped_index, f2.dropped_index  # the dropped input coordinates

    def augmented(v):
        h1 = lin1(v)
        d1 = v[..., s1]
        h2 = lin2(act(h1))
        d2 = act(h1)[..., s2]
        return torch.cat([h2, d1, d2], -1)

    lp = flow.log_prob(x, deterministic=True)
    for i, xi in enumerate(x):
        J = jacobian(augmented, xi.clone())
        with torch.no_grad():
            h1 = lin1(xi[None])
            y2 = lin2(act(h1))
            expected = (
                flow.bases["net_2"].log_prob(y2)
                + f1.dropped.log_prob(xi[None][..., s1], h1)
                + f2.dropped.log_prob(act(h1)[..., s2], y2)
                + torch.linalg.slogdet(J)[1]
            )
        assert lp[i].item() == pytest.approx(expected.item(), abs=1e-8)


def test_funnel_and_augment_round_trips():
    torch.manual_seed(0)
    reducing, increasing = ReducingMLP(), IncreasingMLP()
    flow_r = fc.convert(reducing, torch.randn(1, 12))
    flow_i = fc.convert(increasing, torch.randn(1, 3))
    with torch.no_grad():
        z = torch.randn(5, 4)
        assert torch.allclose(flow_r(flow_r.inverse(z, sample=True)), z, atol=1e-4)
        x = torch.randn(5, 3)
        assert torch.allclose(flow_i.inverse(flow_i(x), sample=False), x, atol=1e-4)


def test_importance_weighted_bound_is_logmeanexp_of_fresh_samples():
    torch.manual_seed(0)
    flow = fc.convert(IncreasingMLP(), torch.randn(1, 3))
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.manual_seed(5)
        singles = torch.stack([flow.log_prob(x) for _ in range(6)])
        torch.manual_seed(5)
        iw = flow.log_prob(x, num_samples=6)
    assert torch.allclose(iw, torch.logsumexp(singles, 0) - math.log(6), atol=1e-5)
    assert (iw >= singles.mean(0) - 1e-5).all()  # Jensen: the K-sample bound is above the mean single-sample one
    with pytest.raises(ValueError):
        flow.log_prob(x, num_samples=0)


def test_noise_protocol():
    torch.manual_seed(0)
    flow = fc.convert(IncreasingMLP(), torch.randn(1, 3))
    assert flow.noise_shapes() == {"fc1": (2,), "fc2": (3,)}
    assert flow.inverse_noise_shapes() == {}
    x = torch.randn(4, 3)
    noise = {k: torch.randn(4, *s) for k, s in flow.noise_shapes().items()}
    with torch.no_grad():
        a = flow.forward_with_log_prob(x, noise=noise)
        b = flow.forward_with_log_prob(x, noise=noise)
        zeros = {k: torch.zeros_like(v) for k, v in noise.items()}
        det = flow.forward_with_log_prob(x, deterministic=True)
        at_zero = flow.forward_with_log_prob(x, noise=zeros)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], det[0])  # the noise enters the augmented output
    assert torch.allclose(det[1], at_zero[1], atol=1e-5) and torch.allclose(det[0], at_zero[0], atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        flow.forward_with_log_prob(x, noise={"fc1": noise["fc1"]})
    with pytest.raises(ValueError, match="unknown"):
        flow.forward_with_log_prob(x, noise={**noise, "nope": noise["fc1"]})

    reducing = fc.convert(ReducingMLP(), torch.randn(1, 12))
    assert reducing.noise_shapes() == {}
    assert reducing.inverse_noise_shapes() == {"net_0": (4,), "net_2": (4,)}
    z = torch.randn(3, 4)
    inv_noise = {k: torch.randn(3, *s) for k, s in reducing.inverse_noise_shapes().items()}
    with torch.no_grad():
        assert torch.equal(reducing.inverse(z, noise=inv_noise), reducing.inverse(z, noise=inv_noise))
        assert torch.equal(reducing.inverse(z, sample=False), reducing.inverse(z, sample=False))


def test_generated_code_reads_as_a_likelihood_program():
    torch.manual_seed(0)
    flow = fc.convert(SquareMLP(), torch.randn(1, 6))
    code = flow.code
    assert (
        "fc1_layer.call_and_ll(x" in code and "log_terms = torch.stack([ll_fc1, ll_act, ll_fc2, log_base_fc2])" in code
    )
    inverse = flow.inverse_graph.code
    assert inverse.index("fc2_layer.inverse") < inverse.index("fc1_layer.inverse")
    assert "self.layers.fc1(x)" in flow.function_graph.code


def test_save_load_and_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ReducingMLP()
    flow = fc.convert(model, torch.randn(1, 12))
    with torch.no_grad():
        flow.layers["net_0"].dropped.log_scale.fill_(0.3)  # a trained-looking density
    x = torch.randn(5, 12)
    path = tmp_path / "flow.pt"
    torch.save(flow, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), flow(x))
        assert torch.allclose(loaded.log_prob(x), flow.log_prob(x), atol=1e-6)
    assert loaded.code == flow.code

    fresh = fc.convert(model, torch.randn(1, 12))
    with torch.no_grad():
        assert not torch.allclose(fresh.log_prob(x), flow.log_prob(x))
        fresh.load_state_dict(flow.state_dict())
        assert torch.allclose(fresh.log_prob(x), flow.log_prob(x), atol=1e-6)
    assert all(k.startswith(("layers.", "bases.")) for k in flow.state_dict())

    buf = io.BytesIO()
    torch.save(flow.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == set(flow.state_dict())


def test_dtype_and_device_follow_the_module():
    torch.manual_seed(0)
    flow = fc.convert(ReducingMLP(), torch.randn(1, 12))
    flow64 = copy.deepcopy(flow).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        lp64 = flow64.log_prob(x)
        assert lp64.dtype == torch.float64
        assert torch.allclose(lp64.float(), flow.log_prob(x.float()), atol=1e-4)
        assert flow64.sample(2).dtype == torch.float64
    assert flow(x.float()).device == x.device


def test_diagonal_base_adds_parameters():
    torch.manual_seed(0)
    standard = fc.audit(ReducingMLP(), torch.randn(1, 12), base="standard")
    diagonal = fc.audit(ReducingMLP(), torch.randn(1, 12), base="diagonal")
    assert diagonal.density_parameters == standard.density_parameters + 2 * 4
    flow = fc.convert(ReducingMLP(), torch.randn(1, 12), base="diagonal")
    assert isinstance(flow.bases["net_2"], fc.DiagonalNormal)
    with pytest.raises(ValueError):
        fc.convert(ReducingMLP(), torch.randn(1, 12), base="laplace")


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(3, 2)

    def forward(self, x, y):
        return self.a(x), F.leaky_relu(self.b(y), 0.1)


def test_several_inputs_and_outputs_each_get_a_base_density():
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    flow = fc.convert(model, (x[:1], y[:1]))
    with torch.no_grad():
        out = flow(x, y)
        assert isinstance(out, tuple) and all(torch.equal(o, e) for o, e in zip(out, model(x, y)))
        lp = flow.log_prob(x, y)
        assert lp.shape == (5,)
        xi, yi = flow.inverse(*out, sample=False)
        assert torch.allclose(xi, x, atol=1e-5) and yi.shape == y.shape
        sx, sy = flow.sample(3)
        assert sx.shape == (3, 4) and sy.shape == (3, 3)
    assert set(flow.bases) == {"a", "leaky_relu"}


def test_convert_raises_with_the_full_report():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU())
    with pytest.raises(fc.ConversionError) as info:
        fc.convert(model, torch.randn(1, 4))
    err = info.value
    assert isinstance(err, fc.FlowConversionError)
    assert err.code == "FC101" and err.report.counts == {"FC101": 1, "FC102": 1}
    assert "FC102" in str(err)


def test_gradients_flow_to_density_parameters():
    torch.manual_seed(0)
    flow = fc.convert(ReducingMLP(), torch.randn(1, 12))
    loss = -flow.log_prob(torch.randn(8, 12)).mean()
    loss.backward()
    assert flow.layers["net_0"].dropped.log_scale.grad is not None
