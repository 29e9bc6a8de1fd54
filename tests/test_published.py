"""Definitions nobody here wrote: torchvision and pytorchcv models (random weights, small inputs).

A few small published models convert with relu="leaky" (outputs within the reported
deviation, finite log_prob and inverse); transformer/SE models are refused cleanly with every
problem listed; diagnostics on installed models carry the model's file:line, collapse
follow-on problems under their cause, and treat torchvision's stochastic_depth as the
identity in eval mode. The larger architectures are in benchmarks/zoo.py.
"""

import sys

import pytest
import torch
import torch.nn as nn
from published import import_torchvision, pytorchcv_model, torchvision_model

import flowconvert as fc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

try:
    import_torchvision()
    HAVE_TORCHVISION = True
except ImportError:  # the test extra is not installed
    HAVE_TORCHVISION = False
try:
    import pytorchcv  # noqa: F401

    HAVE_PYTORCHCV = HAVE_TORCHVISION
except ImportError:
    HAVE_PYTORCHCV = False

needs_tv = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision (test extra) not installed")
needs_cv = pytest.mark.skipif(not HAVE_PYTORCHCV, reason="pytorchcv (test extra) not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_converted(model, x, name):
    flow = fc.convert(model, x, relu="leaky")
    report = flow.report
    assert report.convertible and report.substitutions, name
    with torch.no_grad():
        got, expected = flow(x), model(x)
        deviation = (got.double() - expected.double()).abs().max().item()
        assert deviation <= report.max_output_deviation * (1 + 1e-6) + 1e-6
        assert all(n.deviation is not None for n in report.substitutions)
        for deterministic in (True, False):
            lp = flow.log_prob(x, deterministic=deterministic)
            assert lp.shape == (x.shape[0],) and torch.isfinite(lp).all(), (name, deterministic)
        z = flow(x)
        for sample in (False, True):
            assert torch.isfinite(flow.inverse(z, sample=sample)).all(), (name, sample)
    # every node of an installed model has the model's own file:line
    located = [n for n in report.nodes if n.status == "converted"]
    assert located and all(n.location for n in located), [n.name for n in located if not n.location]
    return flow


def test_torchvision_import_helper_declares_only_the_missing_schemas():
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    tv = sys.modules["torchvision"]
    assert hasattr(tv.models, "resnet18")
    assert hasattr(torch.ops.torchvision, "nms")


@needs_cv
@pytest.mark.parametrize("name", ["resnet20_cifar10", "nin_cifar10"])
def test_pytorchcv_cifar_models_convert(name):
    model = pytorchcv_model(name)
    flow = check_converted(model, torch.randn(2, 3, 32, 32), name)
    assert all(n.location.startswith("pytorchcv/") for n in flow.report.nodes if n.status == "converted")


@needs_tv
def test_squeezenet_converts():
    model = torchvision_model("squeezenet1_1", num_classes=10)
    flow = check_converted(model, torch.randn(2, 3, 48, 48), "squeezenet1_1")
    assert any("torchvision/models/squeezenet.py:" in n.location for n in flow.report.nodes if n.location)


def small_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()


@needs_tv
def test_vit_refused_with_its_root_causes_at_the_model_file():
    report = fc.audit(small_vit(), torch.randn(2, 3, 32, 32), relu="leaky")
    assert not report.convertible
    counts = report.counts
    # per block: two LayerNorms, attention, GELU; plus the class token (cat with a constant),
    # the final LayerNorm, the class-token select and the zero-initialised head. The unused
    # attention weights (``x, _ = self.self_attention(...)``) add nothing: no FC132/FC306 per block.
    assert counts == {"FC102": 2, "FC103": 5, "FC131": 2, "FC132": 1, "FC201": 1, "FC305": 1}, counts
    assert all(
        p.location and p.location.startswith("torchvision/models/vision_transformer.py:") for _, p in report.problems
    )


@needs_tv
def test_mobilenet_v3_refused_cleanly():
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    torch.manual_seed(0)
    setting = [  # two blocks of mobilenet_v3_small's kinds: ReLU with SE, Hardswish with SE
        InvertedResidualConfig(16, 3, 16, 16, True, "RE", 2, 1, 0.5),
        InvertedResidualConfig(16, 3, 32, 16, True, "HS", 1, 1, 0.5),
    ]
    model = MobileNetV3(setting, last_channel=32, num_classes=10).eval()
    report = fc.audit(model, torch.randn(2, 3, 32, 32), relu="leaky")
    assert not report.convertible
    assert {"FC102", "FC131"} <= set(report.counts)  # Hardswish, squeeze-excitation products
    assert all(p.location and "torchvision/" in p.location for _, p in report.problems)


@needs_tv
def test_user_location_preferred_over_the_installed_model():
    from torchvision.models.squeezenet import Fire

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.fire = Fire(4, 2, 4, 4)

        def forward(self, x):
            return torch.std(self.fire(x), 1)  # refused (FC109) on this line

    report = fc.audit(Mine(), torch.randn(2, 4, 6, 6), relu="leaky")
    assert report.counts == {"FC109": 1}
    node, problem = report.problems[0]
    assert problem.location.startswith("tests/test_published.py:") or "test_published.py:" in problem.location
    assert "x.mean" in problem.hint
    # nodes inside the installed Fire block: at the user's line that calls it (the user's file wins)
    fire_nodes = [n for n in report.nodes if n.name.startswith("fire")]
    assert fire_nodes and all(n.location and "test_published.py:" in n.location for n in fire_nodes)


@needs_tv
def test_stochastic_depth_is_the_identity_in_eval_mode():
    from torchvision.ops import StochasticDepth, stochastic_depth

    class Residual(nn.Module):
        def __init__(self, training):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.sd = StochasticDepth(0.2, "row")
            self.training_flag = training

        def forward(self, x):
            h = stochastic_depth(self.lin(x), 0.1, "batch", self.training_flag)
            return self.sd(h) + x

    x = torch.randn(3, 4)
    model = Residual(False).eval()
    flow = fc.convert(model, x)
    torch.testing.assert_close(flow(x), model(x), atol=1e-6, rtol=0)
    assert flow.report.convertible and flow.report.counts == {}
    # called with training=True it draws a drop mask (torch.empty(...).bernoulli_(...)): refused
    refused = fc.audit(Residual(True), x)
    assert refused.counts == {"FC114": 1}, refused.counts
    assert "bernoulli_" in refused.problems[0][1].message


class TupleAttention(nn.Module):
    """``h, w = attention(...)`` with the weights unused, then a refused module's tuple indexed."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h, _ = self.attn(x, x, x)  # the weights are never used
        out = self.lstm(h)
        return self.lin(out[0])


def test_follow_on_problems_collapse_under_their_cause():
    report = fc.audit(TupleAttention(), torch.randn(2, 5, 8))
    assert not report.convertible
    assert report.counts == {"FC110": 1, "FC131": 1}, report.counts  # the root causes only
    follow = {(n.name, p.code, n.caused_by) for n, p in report.follow_ons}
    assert follow and all(code in ("FC132", "FC304", "FC305", "FC306") for _, code, _ in follow), follow
    assert all(cause in ("attn", "lstm") for _, _, cause in follow), follow
    text = str(report)
    assert "follow-on problem" in text and "then:" in text
    data = report.to_dict()
    assert len(data["follow_on_problems"]) == len(report.follow_ons)
    assert "then:" in report.to_markdown()


def test_a_zero_dimensional_result_is_reported_not_a_crash():
    class Total(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + x.sum()  # x.sum() mixes the whole batch into one number

    report = fc.audit(Total(), torch.randn(4, 3))
    assert not report.convertible and "FC113" in report.counts


def test_report_says_when_densities_are_uncalibrated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2))
    x = torch.randn(64, 6)
    audit = fc.audit(model, x)
    assert "uncalibrated" in str(audit)
    flow = fc.convert(model, x)
    assert "uncalibrated" in str(flow.report) and flow.report.to_dict()["calibrated"] is False
    fc.calibrate(flow, x)
    assert "uncalibrated" not in str(flow.report) and flow.report.to_dict()["calibrated"] is True
    square = nn.Sequential(nn.Linear(3, 3), nn.Tanh())  # with a standard-normal base: nothing to calibrate
    assert "uncalibrated" not in str(fc.audit(square, torch.randn(2, 3), base="standard"))
    assert "uncalibrated" in str(fc.audit(square, torch.randn(2, 3)))  # the default base is learnable


def test_reductions_without_a_flow_layer_get_the_pooling_hint():
    class Spread(nn.Module):
        def forward(self, x):
            return x.std((2, 3)), torch.amin(x, 1)

    report = fc.audit(Spread(), torch.randn(2, 3, 4, 4))
    assert report.counts == {"FC109": 2}
    assert all("x.mean(dims)" in p.hint for _, p in report.problems)


def test_stochastic_calibration_of_a_conv_with_dropped_pixels_and_noise():
    """ResNet downsampling: pixels no window reads (dropped) and padding noise in one FlowConv.

    The calibration observer used to recurse forever (FlowConv.observe calls call_and_ll).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 2, stride=3, padding=1)).eval()
    x = torch.randn(32, 4, 6, 6)
    flow = fc.convert(model, x[:2])
    assert flow.layers["_0"].dropped_pixels is not None and flow.layers["_0"].pad_noise is not None
    result = fc.calibrate(flow, x)
    assert result.heldout_after >= result.heldout_before
    assert "call_and_ll" not in flow.layers["_0"].__dict__  # the observer is removed again


def test_a_concatenation_of_one_tensor_is_the_identity():
    """DenseNet's first dense layer concatenates a list of one feature map."""

    class OneCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.cat([x], 1))

    torch.manual_seed(0)
    model, x = OneCat(), torch.randn(4, 3)
    flow = fc.convert(model, x)
    with torch.no_grad():
        torch.testing.assert_close(flow(x), model(x), atol=1e-6, rtol=0)
        assert torch.isfinite(flow.log_prob(x, deterministic=True)).all()
        assert torch.isfinite(flow.log_prob(x)).all()


def _inverse_growth(flow, x):
    fc.calibrate(flow, x, deterministic=True)
    with torch.no_grad():
        y = flow(x)
        return max(flow.inverse(y, sample=s).abs().max().item() for s in (False, True)) / x.abs().max().item()


@needs_tv
def test_fan_outs_of_published_blocks_are_inverted_through_the_copy_they_pass_on(monkeypatch):
    # torchvision's DenseNet concatenates every feature map again in each later layer and in the
    # transition; its inverse reads the transition's copy, the mean would read every dense layer's
    # inverse too (measured: growth 2e5 against 1e23 for this small DenseNet)
    import torchvision

    import flowconvert.analysis as analysis
    from flowconvert.merging import FlowDuplicate

    def dense():
        torch.manual_seed(0)
        return torchvision.models.DenseNet(
            growth_rate=8, block_config=(3, 3), num_init_features=8, bn_size=2, num_classes=10
        ).eval()

    x = torch.randn(16, 3, 32, 32)
    flow = fc.convert(dense(), x[:2], relu="leaky")
    fans = [layer for layer in flow.layers.values() if isinstance(layer, FlowDuplicate)]
    assert fans and all(f.weights == (0.0,) * (f.num_copies - 1) + (1.0,) for f in fans)  # the block's final cat
    nearest = _inverse_growth(flow, x)

    # torchvision's ResNet: every block's input is read back through its identity (or downsample) copy
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    resnet = fc.convert(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval(), x[:2], relu="leaky")
    blocks = [layer for layer in resnet.layers.values() if isinstance(layer, FlowDuplicate)]
    assert len(blocks) == 4 and all(f.weights == (0.0, 1.0) for f in blocks)  # copy 0 feeds conv1

    monkeypatch.setattr(analysis, "inverse_weights", lambda copies, distance: None)
    mean = _inverse_growth(fc.convert(dense(), x[:2], relu="leaky"), x)
    assert nearest < 1e8 < 1e15 < mean, (nearest, mean)
