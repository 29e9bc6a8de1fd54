"""Architecture zoo: real network shapes convert, keep their outputs and pass the flow checks.

The models are defined here, with random weights: a VGG-style net with BatchNorm and
max-pooling, a ResNet-style net with basic blocks (identity and projection shortcuts), a
depthwise-separable MobileNet-style block, a 1-D convolutional net for sequences and an
MLP-Mixer-style block with transposes (without LayerNorm, which is refused). Models that
use ReLU convert with ``relu="leaky"``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flowconvert as fc


def bn(c):
    m = nn.BatchNorm2d(c)
    with torch.no_grad():  # eval-mode statistics as if trained
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    return m


class VGGStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            bn(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            bn(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            bn(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8)  # identity shortcut
        self.layer2 = BasicBlock(8, 16, stride=2)  # projection shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MobileNetBlock(nn.Module):
    """Depthwise 3x3 + BN + activation, pointwise 1x1 + BN, inverted-residual skip."""

    def __init__(self, c=8):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = bn(c)
        self.act = nn.LeakyReLU(0.1)
        self.pointwise = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = bn(c)

    def forward(self, x):
        return x + self.bn2(self.pointwise(self.act(self.bn1(self.depthwise(x)))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, 8, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool1d(2),
            nn.Conv1d(8, 8, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool1d(2),
            nn.Flatten(),
            nn.Linear(8 * 4, 6),
        )

    def forward(self, x):
        return self.net(x)


class MixerBlock(nn.Module):
    """Token mixing across patches (via transposes) and channel mixing, each with a residual."""

    def __init__(self, tokens=4, channels=6):
        super().__init__()
        self.token1, self.token2 = nn.Linear(tokens, tokens), nn.Linear(tokens, tokens)
        self.channel1, self.channel2 = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):  # (B, tokens, channels)
        y = self.token2(self.act(self.token1(x.transpose(1, 2)))).transpose(1, 2)
        x = x + y
        return x + self.channel2(self.act(self.channel1(x)))


ZOO = {
    # name: (factory, example per-sample shape, relu policy)
    "vgg": (VGGStyle, (3, 8, 8), "leaky"),
    "resnet": (ResNetStyle, (3, 8, 8), "leaky"),
    "mobilenet": (MobileNetBlock, (8, 6, 6), None),
    "conv1d": (Conv1dNet, (4, 16), None),
    "mixer": (MixerBlock, (4, 6), None),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    factory, shape, relu = ZOO[name]
    model = factory().eval()
    return model, shape, relu


@pytest.fixture(scope="module")
def converted():
    out = {}
    for name in ZOO:
        model, shape, relu = make(name)
        example = torch.randn(8, *shape)
        flow = fc.convert(model, example, relu=relu)
        out[name] = (model, shape, relu, example, flow)
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_converts_and_keeps_outputs(converted, name):
    model, shape, relu, example, flow = converted[name]
    report = flow.report
    assert report.convertible
    with torch.no_grad():
        expected, got = model(example), flow(example)
        y, lp = flow.forward_with_log_prob(example, deterministic=True)
    if relu is None:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert report.max_output_deviation is None and not report.substitutions
    else:
        deviation = (got - expected).abs().max().item()
        assert report.substitutions and report.max_output_deviation == pytest.approx(deviation, rel=1e-6, abs=1e-9)
        assert 0 < deviation < 1.0
        assert "ReLU replaced by LeakyReLU" in str(report)
    torch.testing.assert_close(y, got, atol=1e-4, rtol=1e-4)  # the likelihood pass computes the same outputs
    assert lp.shape == (8,) and torch.isfinite(lp).all()


@pytest.mark.parametrize("name", list(ZOO))
def test_likelihood(converted, name):
    model, shape, relu, example, flow = converted[name]
    x = torch.randn(16, *shape)
    with torch.no_grad():
        det = flow.log_prob(x, deterministic=True)
        one = torch.stack([flow.log_prob(x) for _ in range(8)]).mean(0)
        many = flow.log_prob(x, num_samples=8)
    assert torch.isfinite(det).all() and torch.isfinite(one).all() and torch.isfinite(many).all()
    if flow.exact:
        torch.testing.assert_close(one, det)
    else:  # importance weighting tightens the bound on average
        assert many.mean() > one.mean()
    # gradients reach every density parameter that the likelihood uses
    lp = flow.log_prob(x[:4]).sum()
    lp.backward()
    grads = [p.grad for p in flow.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(ZOO))
def test_inverse(converted, name):
    model, shape, relu, example, flow = converted[name]
    with torch.no_grad():
        z = flow(torch.randn(4, *shape))
        for sample in (False, True):
            x = flow.inverse(z, sample=sample)
            assert x.shape == (4, *shape) and torch.isfinite(x).all()
        samples = flow.sample(3)
        assert samples.shape == (3, *shape)
        # the sampled inverse is reproducible from explicit noise
        noise = {k: torch.randn(4, *s) for k, s in flow.inverse_noise_shapes().items()}
        torch.testing.assert_close(flow.inverse(z, sample=True, noise=noise), flow.inverse(z, sample=True, noise=noise))


@pytest.mark.parametrize("name", list(ZOO))
def test_onnx_export_parity(converted, name, tmp_path):
    model, shape, relu, example, flow = converted[name]
    result = fc.export_onnx(flow, tmp_path / f"{name}.onnx", example[:2])
    assert result.verified, result.report()
