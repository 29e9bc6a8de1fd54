"""Bad input gets a clear error, tiny data work, nothing is silently wrong (issue 11, defects 3, 5-9).

Each test names the defect it pins down.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowconvert as fc
import zoo
from flowconvert import conversion


def _flow(name="reducing_mlp", dtype=torch.float32):
    entry = next(e for e in zoo.ZOO if e.name == name)
    x = torch.randn(entry.shape, dtype=dtype)
    return fc.convert(zoo.make(entry, dtype), x), x


# -- validation at the boundary (defect 3) ----------------------------------------------------------
class Conv2x(nn.Module):
    """A flow for (2, 6, 4) images: a transposed batch used to run on 4x6 and give a finite log p."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 2, stride=2)

    def forward(self, x):
        return torch.flatten(F.leaky_relu(self.conv(x), 0.1), 1)


def test_shapes_and_dtypes_are_checked_at_every_entry_point():
    torch.manual_seed(0)
    flow = fc.convert(Conv2x().eval(), torch.randn(3, 2, 6, 4))
    wrong = torch.randn(3, 2, 4, 6)
    calls = {
        "flow": lambda: flow(wrong),
        "log_prob": lambda: flow.log_prob(wrong),
        "forward_with_log_prob": lambda: flow.forward_with_log_prob(wrong),
        "bits_per_dim": lambda: fc.bits_per_dim(flow, wrong),
        "calibrate": lambda: fc.calibrate(flow, wrong),
        "fit": lambda: fc.fit(flow, wrong, epochs=1, progress=False),
        "inverse": lambda: flow.inverse(torch.randn(3, 47)),
    }
    for name, call in calls.items():
        with pytest.raises(fc.InputError) as err:
            call()
        assert err.value.code == "FC601", name
        assert "(batch, 2, 6, 4)" in str(err.value) or "(batch, 48)" in str(err.value), name
    with pytest.raises(fc.InputError) as err:
        flow.log_prob(torch.randn(3, 2, 6, 4, dtype=torch.float64))
    assert err.value.code == "FC602" and "torch.float32" in str(err.value)
    with pytest.raises(fc.InputError) as err:
        flow(torch.zeros(3, 2, 6, 4, dtype=torch.long))
    assert err.value.code == "FC602"
    funnel, _ = _flow()
    assert funnel.inverse_noise_shapes()
    with pytest.raises(fc.InputError) as err:  # explicit noise of the wrong batch
        funnel.inverse(
            torch.randn(3, 4),
            sample=True,
            noise={k: torch.randn(2, *s) for k, s in funnel.inverse_noise_shapes().items()},
        )
    assert err.value.code == "FC601"
    assert issubclass(fc.InputError, fc.FlowConversionError) and issubclass(fc.InputError, ValueError)


def test_transposed_input_of_a_flatten_linear_flow_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 12))
    flow = fc.convert(net.eval(), torch.randn(2, 3, 4))
    with pytest.raises(fc.InputError):
        flow.log_prob(torch.randn(2, 4, 3))
    with pytest.raises(fc.InputError):
        flow.inverse(torch.randn(2, 11))


def test_checks_keep_the_likelihood_pass_cheap():
    """The checks are metadata comparisons: a wrong call fails before any layer runs."""
    flow, x = _flow()
    calls = []
    layer = next(iter(flow.layers.values()))
    original = layer.call_and_ll
    layer.call_and_ll = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(fc.InputError):
        flow.log_prob(torch.randn(4, 13))
    assert not calls


# -- defect 5: empty and tiny data ------------------------------------------------------------------
@pytest.mark.parametrize("entry", zoo.ZOO, ids=lambda e: e.name)
def test_empty_batches_give_empty_results(entry):
    flow = fc.convert(zoo.make(entry), torch.randn(entry.shape))
    x0 = torch.randn(0, *entry.shape[1:])
    y0 = flow(x0)
    assert y0.shape == (0, *flow.output_shapes[0])
    assert flow.log_prob(x0).shape == (0,) and flow.log_prob(x0, deterministic=True).shape == (0,)
    out, lp = flow.forward_with_log_prob(x0)
    assert out.shape == y0.shape and lp.shape == (0,)
    assert flow.inverse(y0).shape == x0.shape and flow.inverse(y0, sample=True).shape == x0.shape
    assert flow.sample(0).shape == x0.shape


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("holdout", [0.0, 0.2, 0.5])
def test_calibrate_on_tiny_data_and_without_holdout(n, holdout):
    flow, _ = _flow()
    report = fc.calibrate(flow, torch.randn(n, 12), holdout=holdout)
    assert report.fit_examples + report.heldout_examples == n and report.fit_examples >= 1
    assert torch.isfinite(flow.log_prob(torch.randn(4, 12))).all()


def test_empty_data_sets_are_clear_errors():
    flow, _ = _flow()
    empty = torch.randn(0, 12)
    cases = {
        "calibrate": lambda: fc.calibrate(flow, empty),
        "calibrate val": lambda: fc.calibrate(flow, torch.randn(8, 12), val_data=empty),
        "fit": lambda: fc.fit(flow, empty, epochs=1, progress=False),
        "fit val": lambda: fc.fit(flow, torch.randn(8, 12), val_data=empty, epochs=1, progress=False),
        "bits_per_dim": lambda: fc.bits_per_dim(flow, empty),
        "fit loader": lambda: fc.fit(
            flow, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(empty)), epochs=1, progress=False
        ),
    }
    for name, call in cases.items():
        with pytest.raises(fc.InputError) as err:
            call()
        assert err.value.code == "FC604" and ("empty" in err.value.message or "none" in err.value.message), name


def test_non_finite_data_are_refused_before_they_reach_linear_algebra():
    flow, _ = _flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    x = torch.randn(40, 12)
    x[7, 3] = float("inf")
    for call in (
        lambda: fc.calibrate(flow, x),
        lambda: fc.fit(flow, x, epochs=1, progress=False),
        lambda: fc.bits_per_dim(flow, x),
        lambda: fc.calibrate(flow, torch.randn(9, 12), val_data=x),
    ):
        with pytest.raises(fc.InputError) as err:
            call()
        assert err.value.code == "FC603" and "row 7" in err.value.message
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_export_batch_zero_is_a_usage_error(tmp_path, capsys):
    from flowconvert import cli

    flow, x = _flow("square_mlp")
    fc.save(flow, tmp_path / "f")
    assert cli.main(["export", str(tmp_path / "f"), "-o", str(tmp_path / "m.onnx"), "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err
    with pytest.raises(fc.InputError):
        fc.export_onnx(flow, tmp_path / "m.onnx", x[:0])
    assert not list(tmp_path.glob("m*"))


# -- defect 6: float64 export -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["padded_cnn", "view_flatten_cnn"])
def test_float64_export_runs_in_onnxruntime(name, tmp_path):
    flow, x = _flow(name, torch.float64)
    result = fc.export_onnx(flow, tmp_path / "m.onnx", x)
    assert result.verified and result.input_dtypes["x"] == "float64"
    assert "Conv" in result.float32_ops  # onnxruntime has no double Conv: an island of float32, reported
    assert max(result.max_abs_diff.values()) < 1e-4
    assert "float32" in result.report()


def test_float64_export_of_activations_without_double_kernels(tmp_path):
    torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4), nn.PReLU(4), nn.Linear(4, 4), nn.LeakyReLU(0.1))
        .double()
        .eval()
    )
    x = torch.randn(5, 4, dtype=torch.float64)
    flow = fc.convert(net, x)
    for graph in ("likelihood", "inverse"):
        result = fc.export_onnx(flow, tmp_path / f"{graph}.onnx", x, graph=graph, verify=False)
        import onnxruntime as ort

        ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])  # loadable without verify
    assert fc.export_onnx(flow, tmp_path / "v.onnx", x).verified


def test_failed_export_writes_nothing(tmp_path):
    flow, x = _flow("square_mlp")
    with pytest.raises(fc.ExportError) as err:  # a negative tolerance: parity fails for sure
        fc.export_onnx(flow, tmp_path / "m.onnx", x, atol=-1.0, rtol=0.0, report=True)
    assert err.value.code == "FC404" and err.value.result is not None and "nothing was written" in str(err.value)
    assert not list(tmp_path.iterdir())
    (tmp_path / "keep.onnx").write_text("old")
    with pytest.raises(fc.ExportError):
        fc.export_onnx(flow, tmp_path / "keep.onnx", x, atol=-1.0, rtol=0.0)
    assert (tmp_path / "keep.onnx").read_text() == "old"  # a failed export does not replace a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def test_fc404_hint_no_longer_recommends_something_that_fails():
    hint = fc.DIAGNOSTICS["FC404"].hint
    assert "float32_ops" in hint and "rounding" in hint


# -- defect 7: train mode ----------------------------------------------------------------------------
def test_train_mode_batchnorm_is_refused_with_fc211():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    net.train()
    report = fc.audit(net, torch.randn(3, 4))
    assert report.counts == {"FC211": 1}
    with pytest.raises(fc.ConversionError) as err:
        fc.convert(net, torch.randn(3, 4))
    assert err.value.code == "FC211" and "training mode" in str(err.value)
    assert net.training and net[1].training  # the user's model is untouched
    net.eval()
    assert fc.convert(net, torch.randn(3, 4)).exact


def test_train_mode_dropout_warns_that_the_flow_follows_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)).train()
    with pytest.warns(fc.FlowConversionWarning, match="eval-mode"):
        flow = fc.convert(net, torch.randn(3, 4))
    x = torch.randn(3, 4)
    assert torch.equal(flow(x), net.eval()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.convert(net.eval(), torch.randn(3, 4))  # eval mode: silent


# -- defect 8: range-limited activations before a funnel --------------------------------------------
@pytest.mark.parametrize("act", [nn.Tanh(), nn.Sigmoid(), nn.ELU(), nn.Softplus()], ids=lambda a: type(a).__name__)
def test_range_limited_activation_before_a_funnel_is_marked(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), act, nn.Linear(6, 3)).eval()
    flow = fc.convert(net, torch.randn(2, 6))
    assert flow.exact and not flow.exact_inverse
    (layer,) = flow.approximate_inverse_layers()
    assert flow.layers[layer].output_range is not None
    assert sum("flow.exact_inverse is False" in (e.note or "") for e in flow.report.nodes) == 1
    # the condition is real: sampled inverses leave the range and do not map back
    y = flow(torch.randn(200, 6))
    with torch.no_grad():
        again = flow(flow.inverse(y, sample=True))
    assert not torch.allclose(again, y, atol=1e-4)


def test_range_limited_activation_without_a_later_funnel_has_an_exact_inverse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 3)).eval()  # the funnel comes first
    flow = fc.convert(net, torch.randn(2, 6))
    assert flow.exact_inverse
    y = flow(torch.randn(50, 6))
    with torch.no_grad():
        assert torch.allclose(flow(flow.inverse(y, sample=True)), y, atol=1e-5)


# -- defect 9 ---------------------------------------------------------------------------------------
def test_integer_inputs_are_a_clear_error():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 8))
    with pytest.raises(fc.TracingError) as err:
        fc.convert(net, torch.randint(0, 10, (3, 2)))
    assert err.value.code == "FC309" and "torch.int64" in str(err.value)


def test_fit_arguments_and_val_nan():
    flow, _ = _flow()
    x = torch.randn(64, 12)
    for kwargs in ({"epochs": -3}, {"lr": 0.0}, {"batch_size": 0}, {"patience": -1}, {"max_steps": -1}):
        with pytest.raises(fc.InputError) as err:
            fc.fit(flow, x, progress=False, **kwargs)
        assert err.value.code == "FC604"
    val = torch.randn(16, 12)
    val[3, 0] = float("nan")
    with pytest.raises(fc.InputError) as err:  # used to discard all training silently
        fc.fit(flow, x, val_data=val, epochs=2, progress=False)
    assert err.value.code == "FC603"


def test_export_path_and_opset_errors(tmp_path):
    flow, x = _flow("square_mlp")
    with pytest.raises(fc.ExportError) as err:
        fc.export_onnx(flow, "/dev/null/x.onnx", x)
    assert err.value.code == "FC405"
    with pytest.raises(fc.InputError) as err:
        fc.export_onnx(flow, tmp_path / "m.onnx", x, opset=5)
    assert "18" in err.value.message
    assert not list(tmp_path.iterdir())


class _Interrupting(torch.utils.data.Dataset):
    def __init__(self, n, at):
        self.n, self.at = n, at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return torch.randn(12)


@pytest.mark.parametrize("train", ["densities", "all"])
def test_interrupted_fit_leaves_mode_and_grads_clean_and_the_global_rng_alone(train):
    flow, _ = _flow()
    flow.eval()
    loader = torch.utils.data.DataLoader(_Interrupting(40, 30), batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        fc.fit(flow, loader, epochs=1, progress=False, train=train)
    assert not flow.training and all(p.grad is None for p in flow.parameters())
    data = torch.randn(32, 12)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fc.fit(flow, data, epochs=1, progress=False, seed=11, train=train)
    assert torch.equal(torch.rand(3), expected)  # fit does not reseed the caller's generator
    assert all(p.grad is None for p in flow.parameters())


def test_interrupted_calibrate_restores_the_mode():
    flow, _ = _flow()
    flow.train()
    calls = []

    def interrupt(*args, **kwargs):  # the user presses Ctrl-C during the second pass
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return type(flow).log_prob(flow, *args, **kwargs)

    flow.log_prob = interrupt
    with pytest.raises(KeyboardInterrupt):
        fc.calibrate(flow, torch.randn(64, 12))
    assert flow.training and len(calls) == 2


def test_fit_with_no_step_changes_nothing():
    for name in ("reducing_mlp", "padded_cnn"):
        flow, x = _flow(name)
        data = torch.randn(16, *x.shape[1:])
        with torch.no_grad():
            y, lp = flow(data), flow.log_prob(data, deterministic=True)
        fc.fit(flow, data, epochs=0, train="all", progress=False)
        fc.fit(flow, data, epochs=2, max_steps=0, train="all", progress=False)
        with torch.no_grad():
            assert torch.equal(flow(data), y) and torch.equal(flow.log_prob(data, deterministic=True), lp)


def test_ill_conditioned_composition_warns():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):  # each layer has condition 1e3 (accepted), the chain up to 1e12
        lin = nn.Linear(4, 4, bias=False)
        q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
        r, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
        lin.weight.data = (q @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-3], dtype=torch.float64)) @ r).float()
        layers.append(lin)
    net = nn.Sequential(*layers).eval()
    with pytest.warns(fc.FlowConversionWarning, match="numerically unreliable"):
        fc.convert(net, torch.randn(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.convert(net.double(), torch.randn(3, 4, dtype=torch.float64))  # fine in float64


def test_an_inverse_that_overflows_warns_even_for_a_bound():
    """A flow with an augmentation (a bound: no round trip promised) whose inverse still overflows
    float32 on the example inputs says so at conversion: 30 layers that each contract by 100 (rounding
    errors of 1e-8 grow to 1e52)."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8)]
    for _ in range(30):
        lin = nn.Linear(8, 8)
        lin.weight.data = 0.01 * torch.eye(8) + 1e-4 * torch.randn(8, 8)
        layers.append(lin)
    net = nn.Sequential(*layers).eval()
    with pytest.warns(fc.FlowConversionWarning, match="overflows torch.float32") as caught:
        flow = fc.convert(net, torch.randn(3, 4))
    assert not flow.exact and "negative_slope" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.convert(net.double(), torch.randn(3, 4, dtype=torch.float64))  # 1e44 is finite in float64


def test_an_inverse_that_leaves_the_data_scale_warns_with_its_growth_and_substitutions():
    """A funnel's deterministic inverse is not x, but it must stay data-like: three ReLU substitutes
    of slope 0.001 before a 8 -> 2 funnel carry the error of the conditional mean to 1e10 (finite),
    and the warning names the growth, the substitutes and what to change."""
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(8, 2)).eval()
    x = torch.randn(16, 8)
    with pytest.warns(fc.FlowConversionWarning, match="amplifies") as caught:
        flow = fc.convert(net, x, relu="leaky", negative_slope=0.001)
    message = str(caught[0].message)
    assert "3 substituted activations of slope 0.001" in message and "negative_slope" in message
    with torch.no_grad():
        back = flow.inverse(flow(x))
    assert torch.isfinite(back).all() and back.abs().max() > conversion.INVERSE_GROWTH_LIMIT * x.abs().max()
    with warnings.catch_warnings():  # the same network with slope 0.5 inverts within the limit
        warnings.simplefilter("error")
        flow = fc.convert(net, x, relu="leaky", negative_slope=0.5)
        with torch.no_grad():
            assert flow.inverse(flow(x)).abs().max() < conversion.INVERSE_GROWTH_LIMIT * x.abs().max()


class _SigmoidThenGlobalMax(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x).amax(dim=(2, 3))


def test_a_layer_dropping_coordinates_without_a_density_part_counts_too():
    """Global max pooling drops every non-maximal value without declaring a density part; an
    activation before it still has an approximate inverse, and the exact pooling flow is not
    reported as ill-conditioned."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4)
    flow = fc.convert(_SigmoidThenGlobalMax(), x)
    assert flow.exact and not flow.exact_inverse and len(flow.approximate_inverse_layers()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.convert(nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()), x)
