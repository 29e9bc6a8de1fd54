"""Closed-form calibration: known optimum, the held-out guard, the network left alone."""

import math

import torch

import flowconvert as fc
from chainflow import Chain, mlp_chain

LOG_2PI = math.log(2 * math.pi)


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov)
    return mean + torch.randn(n, mean.numel(), generator=g, dtype=torch.float64) @ L.mT


def _known_funnel_case():
    g = torch.Generator().manual_seed(1)
    n, m = 5, 2
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    cov = M @ M.mT + 0.3 * torch.eye(n, dtype=torch.float64)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    return mean, cov, W, b


def test_calibration_reaches_the_analytic_optimum_and_gain():
    mean, cov, W, b = _known_funnel_case()
    flow = Chain(fc.FlowLinear(W, b), out_shape=(2,)).double()
    lin = flow.layers[0]

    def joint(dropped):
        """Moments of (y, d): y = W x + b, d = x_S (the dropped input coordinates)."""
        P = torch.cat([W, torch.eye(5, dtype=torch.float64)[dropped]])
        mu = P @ mean + torch.cat([b, torch.zeros(3, dtype=torch.float64)])
        S = P @ cov @ P.mT
        return mu, S[:2, :2], S[2:, :2], S[2:, 2:]

    # before: N(0, 1) on the dropped coordinates the layer was built with
    mu, _, _, Sdd = joint(lin.dropped_index)
    before = (-0.5 * (torch.diagonal(Sdd) + mu[2:] ** 2) - 0.5 * LOG_2PI).sum().item()
    before += lin.logdet().item()

    x = _gaussian(20000, mean, cov, seed=2)
    report = fc.calibrate(flow, x, holdout=0.25)
    # after: the optimal linear Gaussian on the dropped coordinates calibration settled on
    mu, Syy, Sdy, Sdd = joint(lin.dropped_index)
    A = Sdy @ torch.linalg.inv(Syy)
    c = mu[2:] - A @ mu[:2]
    var = torch.diagonal(Sdd - A @ Sdy.mT)
    after = (-0.5 * torch.log(var) - 0.5 - 0.5 * LOG_2PI).sum().item() + lin.logdet().item()
    gain = after - before
    q = lin.dropped
    assert torch.allclose(q.weight, A, atol=0.03), (q.weight, A)
    assert torch.allclose(q.bias, c, atol=0.05), (q.bias, c)
    assert torch.allclose(q.log_scale.exp() ** 2, var, rtol=0.05)
    measured = report.heldout_after - report.heldout_before
    assert gain > 1.0  # the case is informative: the dropped part is far from N(0, 1)
    assert abs(measured - gain) < 0.03 * gain + 0.05, (measured, gain)


def test_guard_keeps_old_parameters_when_new_ones_are_worse_held_out():
    torch.manual_seed(0)
    W = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    flow = Chain(fc.FlowLinear(W), out_shape=(1,)).double()
    y = torch.randn(4000, 1, dtype=torch.float64)
    fit_data = torch.cat([y, 3 * y + 0.01 * torch.randn_like(y), torch.randn_like(y)], 1)
    val = torch.randn(1000, 3, dtype=torch.float64)  # the dropped part is exactly N(0, 1) here
    before = fc.log_likelihood(flow, val).mean().item()
    q = flow.layers[0].dropped
    report = fc.calibrate(flow, fit_data, val_data=val)
    after = fc.log_likelihood(flow, val).mean().item()
    assert after >= before - 1e-9
    assert report.heldout_after >= report.heldout_before
    # the coordinate that really is N(0, 1) may be refitted slightly; the other one must be kept
    kept = (q.weight.abs().sum(1) == 0) & (q.log_scale == 0)
    assert kept.any(), q.weight


def test_calibration_never_touches_the_network_and_never_hurts():
    torch.manual_seed(0)
    x = torch.randn(1500, 6) @ torch.randn(6, 6) + 2
    for sizes in [(6, 3, 2), (6, 9, 3)]:  # exact, and with an augmenting (bound) layer
        flow = mlp_chain(sizes, base="diagonal")
        net = [p.clone() for m in flow.modules() if isinstance(m, fc.FlowLayer) for p in m.network_parameters()]
        out = flow(x)
        report = fc.calibrate(flow, x)
        assert torch.equal(flow(x), out)
        after = [p for m in flow.modules() if isinstance(m, fc.FlowLayer) for p in m.network_parameters()]
        assert all(torch.equal(a, b) for a, b in zip(net, after))
        assert report.heldout_after >= report.heldout_before
        assert report.heldout_after > report.heldout_before + 1.0, str(report)  # data far from N(0, I)


def test_calibration_reaches_the_true_density_of_a_linear_gaussian():
    """A Gaussian x inside the model class: y = W x ~ N(m, diag) and, given y, the dropped input
    coordinates x_S ~ N(A y + c, diag); funnel W, diagonal base. Calibration must reach the truth.

    (The dropped coordinates are input coordinates, so the data is built in (y, x_S) and mapped
    to x through the funnel's own bijection x -> (y, x_S).)"""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    W = Q[:, :2].mT.clone()
    flow = Chain(fc.FlowLinear(W), out_shape=(2,), base="diagonal").double()
    lin = flow.layers[0]
    S, Sc = lin.dropped_index, lin.kept_index
    A = torch.tensor([[0.7, -0.4], [0.2, 0.5]], dtype=torch.float64)
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    m_y, s_y, s_d = (
        torch.tensor([1.0, -1.0], dtype=torch.float64),
        torch.tensor([2.0, 0.5], dtype=torch.float64),
        torch.tensor([0.3, 0.2], dtype=torch.float64),
    )
    # x = P [y; x_S]: x_S = x_S, x_Sc = W_Sc^{-1} (y - W_S x_S)
    inv = torch.linalg.inv(W[:, Sc])
    P = torch.zeros(4, 4, dtype=torch.float64)
    P[Sc, :2], P[Sc, 2:], P[S, 2:] = inv, -inv @ W[:, S], torch.eye(2, dtype=torch.float64)
    # (y, x_S) jointly Gaussian: y ~ N(m_y, diag s_y^2), x_S = A y + c + s_d eps
    L = torch.zeros(4, 4, dtype=torch.float64)
    L[:2, :2], L[2:, :2], L[2:, 2:] = torch.diag(s_y), A @ torch.diag(s_y), torch.diag(s_d)
    mu = P @ torch.cat([m_y, A @ m_y + c])
    cov = P @ L @ L.mT @ P.mT
    train = _gaussian(20000, mu, cov, seed=4)
    test = _gaussian(5000, mu, cov, seed=5)
    true = torch.distributions.MultivariateNormal(mu, cov).log_prob(test).mean().item()
    fc.calibrate(flow, train)
    model = fc.log_likelihood(flow, test).mean().item()
    assert abs(model - true) < 0.02, (model, true)


class _SmallCNN(torch.nn.Module):
    def __init__(self, padding: int, kernel: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 3, kernel, stride=stride, padding=padding)
        self.act = torch.nn.LeakyReLU(0.5)
        self.conv2 = torch.nn.Conv2d(3, 4, 2, stride=2)
        self.flat = torch.nn.Flatten()

    def forward(self, x):
        return self.flat(self.conv2(self.act(self.conv1(x.reshape(-1, 1, 6, 6)))))


def _smooth_images(n, seed):
    """6x6 images: a 3x3 random field upsampled (neighbouring pixels strongly correlated) plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 3, 3, generator=g)
    img = torch.nn.functional.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    return (img + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).reshape(n, 36) + 1.0


def test_calibration_of_converted_cnns_improves_heldout_log_prob():
    x, heldout = _smooth_images(1500, 0), _smooth_images(500, 1)
    # no padding, non-overlapping windows (exact); 3x3 with padding 1 (padding and tiling noise: a bound)
    for padding, kernel, stride, exact in [(0, 2, 2, True), (1, 3, 1, False)]:
        torch.manual_seed(0)
        net = _SmallCNN(padding, kernel, stride)
        flow = fc.convert(net, x[:2], base="diagonal")
        assert flow.exact is exact
        assert any(isinstance(m, fc.FlowConv) for m in flow.modules())
        out = flow(heldout)

        def heldout_ll():
            torch.manual_seed(123)  # the same noise draws before and after
            return fc.log_likelihood(flow, heldout, num_samples=1).mean().item()

        before = heldout_ll()
        report = fc.calibrate(flow, x)
        after = heldout_ll()
        assert torch.equal(flow(heldout), out)  # the network's outputs are untouched
        assert report.heldout_after >= report.heldout_before, str(report)
        assert after > before + 5.0, (padding, before, after)  # an untrained density is far off
        assert any(p.kind == "conditional" and p.updated for p in report.parts), str(report)


def test_calibrating_a_conv_with_noise_and_dropped_pixels_does_not_recurse():
    """Regression (found by the fuzzer): FlowConv.observe computes its output with call_and_ll
    when it adds noise (overlapping windows) and drops pixels; calibration's recording patch of
    call_and_ll then observed again, without end (RecursionError). Now the parts are fitted."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.LeakyReLU(0.5), nn.Conv1d(1, 2, 2, stride=2, dilation=2)).double().eval()
    x = torch.randn(64, 1, 6, dtype=torch.float64)
    flow = fc.convert(net, x[:3])
    conv = next(m for m in flow.modules() if isinstance(m, fc.FlowConv))
    kinds = {p.kind for p in conv.density_parts()}
    assert {"noise", "conditional"} <= kinds  # the case: noise in, pixels dropped
    report = fc.calibrate(flow, x)
    assert any(p.name.endswith("dropped_pixels") and p.updated for p in report.parts)
    assert report.heldout_after >= report.heldout_before
    with torch.no_grad():
        assert torch.equal(flow(x), net(x))


def test_calibration_finds_the_kink_of_inputs_a_leaky_relu_produced():
    """d = leaky(u) with u | y linear Gaussian: the kink at slope s undoes it, and is found held out."""
    g = torch.Generator().manual_seed(0)
    n, slope = 6000, 0.1
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    u = y @ torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64).mT + 0.5 * torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    d = torch.where(u < 0, slope * u, u)
    W = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    layer = fc.FlowLinear(W, covariance="full").double()
    assert list(layer.dropped_index) == [2, 3]
    flow = Chain(layer, out_shape=(2,)).double()
    x = torch.cat([y, d], 1)
    before = fc.log_likelihood(flow, x[-1000:]).mean().item()
    report = fc.calibrate(flow, x[:-1000], val_data=x[-1000:])
    after = fc.log_likelihood(flow, x[-1000:]).mean().item()
    assert float(layer.dropped.kink) == slope
    assert "kink slope 0.1" in str(report) and after > before
    # the kinked Gaussian is the true conditional: its held-out log q is the truth's, within noise
    truth = torch.distributions.Normal(0.0, 0.5).log_prob(
        torch.where(d < 0, d / slope, d) - y @ torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64).mT
    ).sum(1) - (d < 0).sum(1) * math.log(slope)
    q = layer.dropped.log_prob(d[-1000:], y[-1000:]).mean().item()
    assert abs(q - truth[-1000:].mean().item()) < 0.05


def test_first_calibration_drops_the_inputs_without_spread_and_keeps_the_function():
    torch.manual_seed(0)
    W = torch.randn(3, 5, dtype=torch.float64)
    layer = fc.FlowLinear(W, covariance="full").double()
    flow = Chain(layer, out_shape=(3,)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 5, generator=g, dtype=torch.float64)
    constant = [i for i in range(5) if i not in layer.dropped_index.tolist()][:2]  # two kept inputs...
    x[:, constant] = 0.3 + 1e-3 * torch.rand(4000, 2, generator=g, dtype=torch.float64)  # ...carry no spread
    out = flow.layers[0](x)
    report = fc.calibrate(flow, x, holdout=0.25)
    assert sorted(layer.dropped_index.tolist()) == sorted(constant) and report.rechosen == ["layers.0"]
    assert torch.equal(flow.layers[0](x), out)  # the function is the same, bit for bit
    # the caches follow the new block: log|det| and the inverse
    torch.testing.assert_close(layer.logdet(), torch.linalg.slogdet(W[:, layer.kept_index])[1])
    y = flow.layers[0](x[:5])
    torch.testing.assert_close(flow.layers[0](layer.inverse(y)), y)
    # a calibrated flow keeps its choice: calibrating again re-chooses nothing
    flow.density_state = "calibrated"
    assert fc.calibrate(flow, x, holdout=0.25).rechosen == []


def test_a_mixture_prior_inside_a_spline_base_is_calibrated_once_in_its_own_coordinates():
    """The ``"flow"`` family's base is a spline on standardized outputs over a mixture prior:
    calibration fits the prior by EM to the *standardized* outputs, as part of the base (not
    again as a base of its own on the raw outputs)."""
    from flowconvert.families import FlowBase, GaussianMixture

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g) @ torch.randn(5, 5, generator=g) * 3 + 2
    torch.manual_seed(0)
    flow = fc.convert(torch.nn.Sequential(torch.nn.Linear(5, 3)), x[:2], density="flow")
    report = fc.calibrate(flow, x[:500], val_data=x[500:])
    (base,) = flow.bases.values()
    assert isinstance(base, FlowBase) and isinstance(base.prior, GaussianMixture)
    assert "prior" not in str(report)
    with torch.no_grad():
        z = flow(x[:500])
        u = (z - base.loc) * torch.exp(-base.log_scale)
        torch.testing.assert_close(u.mean(0), torch.zeros(3), atol=1e-4, rtol=0)  # standardized
        again = GaussianMixture((3,), components=base.prior.components)
        (part,) = [p for p in report.parts if p.kind == "base"]
        again.fit_single(u) if part.note == "one Gaussian" else again.fit_closed_form(u)
        torch.testing.assert_close(base.log_prob(z), again.log_prob(u) - base.log_scale.sum(), atol=1e-4, rtol=1e-4)


def test_a_mixture_base_is_calibrated_as_one_gaussian_and_by_em_and_keeps_the_better_held_out():
    """Calibration scores both closed forms of a mixture held out: clustered outputs take EM's
    mixture, Gaussian ones the single Gaussian (exactly a fitted FullNormal), and the kept fit is
    never worse held out than the one Gaussian (float64, to 1e-9)."""
    from flowconvert.families import GaussianMixture

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]], dtype=torch.float64)
    sets = {
        "clustered": centres[torch.randint(3, (400,), generator=g)]
        + torch.randn(400, 2, generator=g, dtype=torch.float64),
        "gaussian": torch.randn(400, 2, generator=g, dtype=torch.float64)
        @ torch.tensor([[2.0, 0.5], [0.0, 1.0]], dtype=torch.float64),
    }
    for kind, x in sets.items():
        torch.manual_seed(0)
        lin = torch.nn.Linear(2, 2).double()
        flow = fc.convert(lin, x[:2])
        report = fc.calibrate(flow, x[:60] if kind == "gaussian" else x[:300], val_data=x[300:])
        (base,) = flow.bases.values()
        (part,) = [p for p in report.parts if p.kind == "base"]
        assert type(base) is GaussianMixture
        with torch.no_grad():
            z_fit, z_held = lin(x[:60] if kind == "gaussian" else x[:300]), lin(x[300:])
            single = fc.FullNormal((2,)).double()
            assert single.fit_closed_form(z_fit)
            gain = (base.log_prob(z_held) - single.log_prob(z_held)).mean().item()
            assert gain >= -1e-9, (kind, gain)
            if kind == "clustered":
                assert part.note.startswith("EM") and gain > 0.5, (part, gain)
            else:
                assert part.note == "one Gaussian", part
                torch.testing.assert_close(base.log_prob(z_held), single.log_prob(z_held), atol=1e-9, rtol=0)
