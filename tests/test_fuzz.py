"""The fuzzer: random architectures from the supported vocabulary meet the SPEC's obligations.

Hypothesis draws an architecture (tests/architectures.py: linear maps of all three shapes,
1-D/2-D convolutions with random kernel, stride, padding, dilation and groups, every supported
activation, BatchNorm with random statistics, pooling, reshapes, residual sums,
concatenations, splits, two outputs) and tests/model_obligations.py checks each obligation
(outputs, log-det against autograd in float64, round trips in the stated direction, the
user's model untouched, save/load, ONNX parity). A failure shrinks to a small architecture
whose description is printed with every failed obligation.

Profiles (``FLOWCONVERT_FUZZ_PROFILE``): ``ci`` (default: a fixed, bounded set of examples,
well under two minutes), ``dev`` (more examples, random), ``long``. Thousands of models with
per-obligation counts: ``python benchmarks/fuzz.py N``.
"""

from __future__ import annotations

import collections
import contextlib
import os

import pytest
import torch
from architectures import Architecture, HypothesisChoices, RandomChoices, build
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from model_obligations import check, check_onnx
from torch import nn

import flowconvert as fc

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=120, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.register_profile("long", max_examples=3000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("FLOWCONVERT_FUZZ_PROFILE", "ci"))
_NAME = os.environ.get("FLOWCONVERT_FUZZ_PROFILE", "ci")
ONNX_EXAMPLES = {"ci": 2, "dev": 10, "long": 50}.get(_NAME, 2)
TRAIN_EXAMPLES = {"ci": 15, "dev": 60, "long": 300}.get(_NAME, 15)


def _failures(arch: Architecture, results) -> str:
    lines = [f"{name}: {out.detail}" for name, out in results.items() if out.status == "fail"]
    return f"{arch.describe()}\n{arch.model}\n" + "\n".join(lines)


@settings(PROFILE)
@given(st.data())
def test_random_architectures_meet_the_obligations(data):
    torch.set_num_threads(1)
    arch = build(HypothesisChoices(data))
    note(arch.describe())
    results = check(arch, onnx=False)
    event(f"flow is {'exact' if arch.exact else 'a bound'}")
    for name, out in results.items():
        if out.status == "skip" and name.startswith(("logdet", "round_trip")):
            event(f"{name}: {out.status}")
    failed = [name for name, out in results.items() if out.status == "fail"]
    assert not failed, _failures(arch, results)


@settings(PROFILE, max_examples=ONNX_EXAMPLES)
@given(st.data())
def test_onnx_parity_on_a_sample(data):
    """Export is slow (seconds per graph), so only a few architectures: both graphs, noise as inputs."""
    torch.set_num_threads(1)
    arch = build(HypothesisChoices(data))
    note(arch.describe())
    out = check_onnx(arch)
    assert out.status == "ok", f"{arch.describe()}\n{out.detail}"


@settings(PROFILE, max_examples=TRAIN_EXAMPLES)
@given(st.data())
def test_obligations_hold_after_calibration_and_training(data):
    """calibrate, then fit(train="all") for a few steps: the function, likelihood and inverse paths still agree."""
    torch.set_num_threads(1)
    arch = build(HypothesisChoices(data))
    note(arch.describe())
    results = check(arch, train=True)
    failed = [name for name, out in results.items() if out.status == "fail"]
    assert not failed, _failures(arch, results)


@pytest.mark.skipif(
    not (callable(getattr(fc, "save", None)) and callable(getattr(fc, "load", None))),
    reason="fc.save / fc.load (issue 11, the safe file format) are not available yet; the property then runs "
    "in test_random_architectures_meet_the_obligations as well",
)
@settings(PROFILE, max_examples=20)
@given(st.data())
def test_save_load_round_trip(data):
    arch = build(HypothesisChoices(data))
    note(arch.describe())
    results = check(arch)
    assert results["save_load"].status == "ok", results["save_load"].detail


# -- the generator covers the vocabulary ----------------------------------------------------------------
def test_generator_covers_the_vocabulary():
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(400):
        arch = build(RandomChoices(seed))
        for m in arch.model.modules():
            name = type(m).__name__
            if isinstance(m, nn.Linear):
                name += {True: "_square", False: ""}[m.in_features == m.out_features]
                if m.in_features > m.out_features:
                    name += "_reducing"
                elif m.in_features < m.out_features:
                    name += "_increasing"
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                for attr in ("groups", "dilation", "stride"):
                    if max((getattr(m, attr),) if isinstance(getattr(m, attr), int) else getattr(m, attr)) > 1:
                        seen[f"{name}_{attr}"] += 1
                if isinstance(m.padding, str) or max(m.padding) > 0:
                    seen[f"{name}_padding"] += 1
            if type(m).__name__ == "Fn":
                name = f"fn_{m.name}"
            seen[name] += 1
        seen["exact" if arch.exact else "bound"] += 1
        seen["range_hazard"] += arch.range_hazard
    expected = [
        "Linear_square",
        "Linear_reducing",
        "Linear_increasing",
        "Conv1d",
        "Conv2d",
        "Conv1d_groups",
        "Conv2d_groups",
        "Conv2d_dilation",
        "Conv1d_stride",
        "Conv2d_padding",
        "LeakyReLU",
        "Tanh",
        "Sigmoid",
        "ELU",
        "SELU",
        "Softplus",
        "PReLU",
        "fn_leaky_relu",
        "fn_tanh",
        "fn_sigmoid",
        "fn_elu",
        "fn_selu",
        "fn_softplus",
        "BatchNorm1d",
        "BatchNorm2d",
        "MaxPool1d",
        "MaxPool2d",
        "AvgPool1d",
        "AvgPool2d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Unflatten",
        "fn_flatten",
        "fn_view_flat",
        "fn_reshape_flat",
        "fn_view",
        "fn_transpose",
        "fn_permute",
        "fn_affine",
        "Residual",
        "Branches",
        "SplitCat",
        "TwoOutputs",
        "Functional",
        "Sequential",
        "Net",
        "exact",
        "bound",
        "range_hazard",
    ]
    missing = [k for k in expected if seen[k] == 0]
    assert not missing, f"never generated: {missing}"


# -- the checks can fail: planted defects are caught ----------------------------------------------------
def _arch(model: nn.Module, shape, exact: bool, hazard: bool = False) -> Architecture:
    torch.manual_seed(0)
    return Architecture(model.double().eval(), tuple(shape), exact, hazard, [type(model).__name__])


def _tanh_funnel() -> Architecture:
    return _arch(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), (4,), True)


def test_planted_log_det_error_is_caught(monkeypatch):
    assert check(_tanh_funnel())["logdet_model"].status == "ok"
    original = fc.FlowTanh.log_derivative
    monkeypatch.setattr(fc.FlowTanh, "log_derivative", lambda self, x: original(self, x) + 1e-4)
    results = check(_tanh_funnel())
    assert results["logdet_model"].status == "fail" and results["logdet_layers"].status == "fail"


def test_planted_inverse_error_is_caught(monkeypatch):
    arch = _arch(nn.Sequential(nn.Linear(6, 3), nn.LeakyReLU(0.2)), (6,), True)
    assert check(arch)["round_trip_model"].status == "ok"
    original = fc.FlowLinear.inverse
    monkeypatch.setattr(fc.FlowLinear, "inverse", lambda self, y, *a, **k: original(self, y, *a, **k) * (1 + 1e-6))
    results = check(arch)
    assert results["round_trip_model"].status == "fail" and results["round_trip_layers"].status == "fail"


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


def test_planted_bound_and_funnel_errors_are_caught(monkeypatch):
    arch = _arch(_Res(), (4,), False)
    assert check(arch)["logdet_layers"].status == "ok"
    original = fc.FlowDuplicate.call_and_ll

    def wrong(self, x, noise=None):
        y, ll = original(self, x, noise)
        return y, ll + 0.01  # a wrong constant in the augmentation's bound

    monkeypatch.setattr(fc.FlowDuplicate, "call_and_ll", wrong)
    assert check(arch)["logdet_layers"].status == "fail"
    monkeypatch.setattr(fc.FlowDuplicate, "call_and_ll", original)
    original_sum = fc.FlowSum.inverse
    monkeypatch.setattr(
        fc.FlowSum,
        "inverse",
        lambda self, y, sample=False, noise=None: tuple(t * 1.001 for t in original_sum(self, y, sample, noise)),
    )
    assert check(arch)["round_trip_layers"].status == "fail"


def test_planted_output_and_aliasing_errors_are_caught(monkeypatch):
    arch = _arch(nn.Sequential(nn.Linear(3, 3), nn.ELU()), (3,), True)
    original = fc.FlowELU.forward
    monkeypatch.setattr(fc.FlowELU, "forward", lambda self, x: original(self, x) + 1e-9)
    results = check(arch)
    assert results["outputs"].status == "fail" and results["bitwise"].status == "fail"
    monkeypatch.setattr(fc.FlowELU, "forward", original)
    # a converter that edits the user's model (a parameter, a training flag) is caught
    convert = fc.convert

    def editing(model, x, **kwargs):
        flow = convert(model, x, **kwargs)
        with torch.no_grad():
            model[0].bias.add_(1e-12)
        return flow

    monkeypatch.setattr(fc, "convert", editing)
    assert check(arch)["untouched"].status == "fail"
    monkeypatch.setattr(fc, "convert", lambda model, x, **kw: (convert(model, x, **kw), model.train())[0])
    assert check(arch)["untouched"].status == "fail"


def test_a_bounded_activation_before_a_funnel_is_declared_not_excused(monkeypatch):
    """Defect 8 in the fuzzer: a flow with the hazard says so (flow.exact_inverse False), and its
    failed round trip is then a declared skip; the same failure undeclared is a failure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    arch = Architecture(model, (6,), True, True, ["linear", "tanh", "linear(6->3)"])
    results = check(arch)
    assert (
        results["round_trip_model"].status == "skip" and "exact_inverse is False" in results["round_trip_model"].detail
    )
    assert not [n for n, out in results.items() if out.status == "fail"], _failures(arch, results)
    monkeypatch.setattr(fc.FlowModel, "exact_inverse", property(lambda self: True))  # a flow that does not declare it
    results = check(arch)
    assert results["round_trip_model"].status == "fail" and "exact_inverse" in results["round_trip_model"].detail


# -- regressions for defects the fuzzer found ---------------------------------------------------------
@pytest.mark.parametrize("requires_grad", [True, False], ids=["parameter", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_linear_on_a_strided_input_is_bit_for_bit(requires_grad, dtype):
    """Found by the fuzzer (34 of 2000 models): F.linear multiplies a non-contiguous input of 3 or more
    dims by another path when the weight requires grad; the flow's frozen copy follows the user's weight."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).to(dtype).requires_grad_(requires_grad)
    inputs = [
        torch.randn(3, 5, 2, dtype=dtype).transpose(1, 2),  # e.g. after a transpose
        torch.randn(2, 3, 5, 4, dtype=dtype).transpose(2, 3),
        torch.randn(3, 2, 7, dtype=dtype)[..., 1:6],  # a slice
    ]
    for x in inputs:
        flow = fc.convert(lin, x[:1])
        with torch.no_grad():
            assert torch.equal(flow(x), lin(x))
            assert torch.equal(flow.forward_with_log_prob(x, deterministic=True)[0], lin(x))


def test_softplus_with_a_low_threshold_is_refused():
    """Found by the fuzzer: Softplus(threshold=1) is not injective (softplus(0.9) = 1.241 > softplus(1.2) = 1.2,
    torch switches to the identity at beta * x = threshold), yet it converted as an exact bijection whose
    inverse maps 1.241 to 1.241 instead of 0.9."""
    model = nn.Sequential(nn.Softplus(beta=1.0, threshold=1.0)).double()
    x = torch.tensor([[0.9], [1.2]], dtype=torch.float64)
    assert model(x)[0] > model(x)[1]  # the map is not monotone
    with pytest.raises(fc.ConversionError) as err:
        fc.convert(model, x[:1])
    assert err.value.code == "FC212" and "threshold" in str(err.value)
    fc.convert(nn.Sequential(nn.Softplus(beta=2.0, threshold=15.0)), torch.zeros(1, 3))  # negligible jump: fine


@pytest.mark.parametrize("pool", [nn.MaxPool2d(1), nn.AvgPool2d(1)], ids=["max", "avg"])
def test_fit_of_a_flow_whose_parameters_do_not_enter_the_loss(pool):
    """Found by the fuzzer: a pool with window 1 keeps a density part that never enters the loss;
    fit must train the rest (or say there is nothing to train), not crash in autograd."""
    flow = fc.convert(nn.Sequential(pool, nn.LeakyReLU(2.0)), torch.randn(1, 2, 2, 2))
    # a clear library error is fine; a raw RuntimeError from autograd is not
    with contextlib.suppress(ValueError, fc.FlowConversionError):
        fc.fit(flow, torch.randn(32, 2, 2, 2), epochs=1, progress=False)


def test_softplus_inverse_exports_accurately_for_small_outputs(tmp_path):
    """Found by the fuzzer: ONNX has no Expm1, so log(-expm1(-t)) exported as log(1 - exp(-t)) - ... gave an
    inverse of -inf for Softplus outputs below ~6e-8 in float32 (inputs below -16.6) and 8e-4 off at -12."""
    import onnxruntime as ort

    from flowconvert.export import export_onnx

    flow = fc.convert(nn.Sequential(nn.Softplus()), torch.zeros(1, 4))
    x = torch.tensor([[-20.0, -12.0, -3.0, 1.0]])
    with torch.no_grad():
        y = flow(x)
    result = export_onnx(flow, tmp_path / "softplus.onnx", x, graph="inverse", noise="zero", verify=False)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {result.input_names[0]: y.numpy()})[0])
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(flow.inverse(y, sample=False), x, atol=1e-5, rtol=1e-6)
