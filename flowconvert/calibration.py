r"""Closed-form calibration of a flow's density parts, without touching the network.

A converted network computes :math:`z = f(x)` with its original weights; what conversion
leaves untrained are the *density parts*. Their forward values never depend on them, so
they can be fitted from one pass of statistics:

* **Dropped coordinates** of every funnel (reducing linear map, or a convolution kernel):
  :math:`d = V_\perp^\top x` given the kept output :math:`y`, modelled as
  :math:`q(d\mid y) = \mathcal N(Ay + c, \operatorname{diag}\sigma^2)`. Maximum likelihood is
  least squares: with :math:`\tilde y = [y; 1]`, :math:`S = \sum \tilde y\tilde y^\top`,
  :math:`T = \sum \tilde y d^\top`,

  .. math:: [A\; c]^\top = (S + \lambda I')^{-1} T, \qquad
            \sigma_j^2 = \max\Big(\tfrac1N \sum (d_j - A_j y - c_j)^2,\ \epsilon\,\mathrm{Var}(d_j)\Big),

  (:math:`\lambda` a tiny ridge on :math:`A`, :math:`\epsilon` the floor ``min_var``).
* **A diagonal base** :math:`\mathcal N(\mu, \operatorname{diag} s^2)` on an output: moment
  matching, :math:`\mu = \bar z`, :math:`s^2 = \max(\mathrm{Var}\, z, \epsilon)`.
* **Noise scales** :math:`\tau` of bound layers: moment matching sets :math:`\tau^2` to the
  average variance of the signal the noise is added to (per range direction for a linear
  augmentation, per element of the input otherwise). The best multiple of it (from
  ``noise_factors``) is chosen on held-out data, since the bound's optimum depends on the
  layers downstream.

**Guard.** Statistics are accumulated separately on a fit part and a held-out part of the
data (``holdout`` fraction, or ``val_data``). Every Gaussian part's held-out log-likelihood
is available in closed form from the held-out statistics, *per coordinate*, so each
coordinate keeps its old parameters unless the new ones score higher on held-out data. For
an exact flow, :math:`\log p` is a sum of these per-coordinate terms plus terms the
calibration does not touch, so the held-out log-likelihood can only go up. For a flow with
noise, the candidate noise settings and the uncalibrated model are compared on the held-out
part with the same random draws, and the best is kept.

>>> import torch, flowconvert as fc
>>> class Funnel(torch.nn.Module):          # one 2 -> 1 funnel with a standard-normal base
...     exact = True
...     def __init__(self):
...         super().__init__()
...         self.lin = fc.FlowLinear(torch.tensor([[1.0, 0.0]]))
...     def log_prob(self, x, deterministic=False):
...         y, ll = self.lin.call_and_ll(x)
...         return ll + fc.StandardNormal((1,)).log_prob(y)
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.randn(4000, 1, generator=g)
>>> x = torch.cat([y, 0.5 * y + 0.1 * torch.randn(4000, 1, generator=g)], 1)   # d = 0.5 y + noise
>>> flow = Funnel()
>>> report = calibrate(flow, x)
>>> d = flow.lin.dropped
>>> round(abs(d.weight.item()), 2), round(d.log_scale.exp().item(), 2)
(0.5, 0.1)
>>> report.heldout_after > report.heldout_before
True
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ._data import iter_inputs
from .densities import LOG_2PI, DiagonalNormal, GaussianNoise
from .dequantization import Dequantize, warn_if_discrete
from .linear import FlowLinear

__all__ = ["calibrate", "CalibrationReport", "PartReport"]


@dataclass
class PartReport:
    """One density part: held-out log-likelihood (nats per sample) before and after."""

    name: str
    kind: str  # "conditional", "base" or "noise"
    coords: int
    updated: int  # coordinates that took the new parameters
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did. ``heldout_*`` are mean ``log p`` per sample on the held-out part."""

    parts: list[PartReport] = field(default_factory=list)
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    noise_factor: float | None = None  # chosen multiple of the moment-matched noise scale; None = unchanged
    fit_examples: int = 0
    heldout_examples: int = 0

    def __str__(self) -> str:
        lines = [
            f"calibrated on {self.fit_examples} examples, checked on {self.heldout_examples} held out: "
            f"held-out log p {self.heldout_before:.3f} -> {self.heldout_after:.3f} nats/sample"
        ]
        if self.noise_factor is not None:
            lines.append(f"  noise scales: {self.noise_factor:g} x moment-matched")
        for p in self.parts:
            if p.kind == "noise":
                lines.append(f"  {p.kind:<11} {p.name:<32} {'rescaled' if p.updated else 'unchanged'}")
                continue
            lines.append(
                f"  {p.kind:<11} {p.name:<32} {p.updated}/{p.coords} coords updated, "
                f"held-out {p.heldout_before:.3f} -> {p.heldout_after:.3f}"
            )
        return "\n".join(lines)


# -- sufficient statistics -----------------------------------------------------------------
class _Moments:
    """Fit/held-out sums of [y, 1] [y, 1]^T, [y, 1] d^T and d*d for a linear-Gaussian regression."""

    def __init__(self, context: int, features: int):
        self.S = [torch.zeros(context + 1, context + 1, dtype=torch.float64) for _ in range(2)]
        self.T = [torch.zeros(context + 1, features, dtype=torch.float64) for _ in range(2)]
        self.dd = [torch.zeros(features, dtype=torch.float64) for _ in range(2)]
        self.n = [0, 0]

    def add(self, y: Tensor, d: Tensor, part: int) -> None:
        d = d.reshape(-1, d.shape[-1]).double()
        y = y.reshape(d.shape[0], -1).double()
        z = torch.cat([y, y.new_ones(y.shape[0], 1)], 1)
        self.S[part] += z.mT @ z
        self.T[part] += z.mT @ d
        self.dd[part] += (d * d).sum(0)
        self.n[part] += y.shape[0]

    def solve(self, ridge: float, min_var: float) -> tuple[Tensor, Tensor] | None:
        """Least-squares coefficients ``B`` (``(context+1) x features``, bias last) and variances."""
        S, T, dd, n = self.S[0], self.T[0], self.dd[0], self.n[0]
        if n == 0:
            return None
        reg = torch.zeros_like(S)
        idx = torch.arange(S.shape[0] - 1)
        reg[idx, idx] = ridge * (S.diagonal()[:-1].mean() / n + 1e-12) * n
        B = torch.linalg.lstsq(S + reg, T).solution
        resid = self._sq_err(B, 0) / n
        mean_d = T[-1] / n
        var_d = (dd / n - mean_d**2).clamp_min(0)
        var = torch.maximum(resid, min_var * var_d).clamp_min(1e-30)
        return B, var

    def _sq_err(self, B: Tensor, part: int) -> Tensor:
        """Per-coordinate sum of squared residuals of ``d - B^T [y, 1]`` on one part."""
        S, T, dd = self.S[part], self.T[part], self.dd[part]
        return (dd - 2 * (B * T).sum(0) + (B * (S @ B)).sum(0)).clamp_min(0)

    def heldout_ll(self, B: Tensor, var: Tensor) -> Tensor | None:
        """Per-coordinate held-out mean Gaussian log-likelihood."""
        n = self.n[1]
        if n == 0:
            return None
        return -0.5 * self._sq_err(B, 1) / n / var - 0.5 * var.log() - 0.5 * LOG_2PI


class _Part:
    name: str
    kind: str
    rows_per_sample: int = 1

    def heldout_scale(self, moments: _Moments) -> float:
        # held-out log-likelihood is reported per *sample*: rows per sample times per-row mean
        return self.rows_per_sample


class _ConditionalPart(_Part):
    """The dropped coordinates of a funnel FlowLinear (used on its own or as a conv kernel)."""

    kind = "conditional"

    def __init__(self, name: str, layer: FlowLinear):
        self.name, self.layer, self.q = name, layer, layer.dropped
        self.moments = _Moments(self.q.context_features, self.q.features)

    def reset(self) -> None:
        self.moments = _Moments(self.q.context_features, self.q.features)

    def record(self, x: Tensor, y: Tensor, part: int) -> None:
        n = self.layer.in_features
        xr = x.detach().reshape(-1, n)
        self.rows_per_sample = xr.shape[0] // max(x.shape[0], 1)
        d = self.layer.observe(xr)["dropped"][0].double()
        self.moments.add(y.detach().reshape(-1, self.layer.out_features), d, part)

    def current(self) -> tuple[Tensor, Tensor]:
        q = self.q
        B = torch.cat([q.weight.detach().mT, q.bias.detach()[None]]).double()
        return B, (2 * q.log_scale.detach().double()).exp().expand(q.features)

    def apply(self, B: Tensor, var: Tensor) -> None:
        q = self.q
        with torch.no_grad():
            q.weight.copy_(B[:-1].mT.to(q.weight.dtype))
            q.bias.copy_(B[-1].to(q.bias.dtype))
            q.log_scale.copy_((0.5 * var.log()).to(q.log_scale.dtype))


class _PixelPart(_ConditionalPart):
    """Pixels no convolution window reaches, given the output at the nearest location."""

    def __init__(self, name: str, conv: nn.Module):
        self.name, self.conv, self.q = name, conv, conv.dropped_pixels
        self.moments = _Moments(self.q.context_features, self.q.features)

    def record(self, x: Tensor, y: Tensor, part: int) -> None:
        conv = self.conv
        xd, yd = conv.dropped_pixel_pairs(x.detach(), y.detach())
        self.rows_per_sample = xd.shape[1]
        self.moments.add(yd.reshape(-1, conv.out_channels), xd.reshape(-1, conv.in_channels), part)


class _BasePart(_Part):
    """A learnable diagonal Gaussian base on one output."""

    kind = "base"

    def __init__(self, name: str, base: DiagonalNormal):
        self.name, self.base = name, base
        self.reset()

    def reset(self) -> None:
        numel = self.base.loc.numel()
        self.moments = _Moments(0, numel)

    def record(self, z: Tensor, part: int) -> None:
        z = z.detach().reshape(z.shape[0], -1)
        self.moments.add(z.new_zeros(z.shape[0], 0), z, part)

    def current(self) -> tuple[Tensor, Tensor]:
        b = self.base
        return b.loc.detach().reshape(1, -1).double(), (2 * b.log_scale.detach().double()).exp().reshape(-1)

    def apply(self, B: Tensor, var: Tensor) -> None:
        b = self.base
        with torch.no_grad():
            b.loc.copy_(B[0].reshape(b.loc.shape).to(b.loc.dtype))
            b.log_scale.copy_((0.5 * var.log()).reshape(b.log_scale.shape).to(b.log_scale.dtype))


class _NoisePart:
    """Noise of a bound layer; records the variance of the signal it is added to."""

    kind = "noise"

    def __init__(self, name: str, owner: nn.Module, noise: GaussianNoise):
        self.name, self.owner, self.noise = name, owner, noise
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def record(self, x: Tensor) -> None:
        x = x.detach().double()
        if isinstance(self.owner, FlowLinear):
            # deterministic output W x, whose variance lives in the rank-r range directions
            rows = x.reshape(-1, self.owner.in_features) @ self.owner.weight.double().mT
            if rows.shape[0] > 1:
                self.total += rows.var(0).sum().item() / self.owner.rank
                self.count += 1
            return
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[0] > 1:
            self.total += flat.var(0).mean().item()
            self.count += 1

    def matched_log_scale(self) -> float | None:
        if self.count == 0 or self.total <= 0:
            return None
        return 0.5 * math.log(self.total / self.count)


# -- discovery and recording ---------------------------------------------------------------
def _find_parts(flow: nn.Module):
    """Gaussian parts and noises; a convolution's kernel and dropped pixels are fed by the convolution."""
    conditionals, bases, noises, convs = [], [], [], []
    fed_by_conv: set[int] = set()
    for name, module in flow.named_modules():
        if _is_conv(module):
            kernel_part = pixel_part = kernel_noise = None
            if module.kernel.kind == "funnel":
                kernel_part = _ConditionalPart(f"{name}.kernel", module.kernel)
                conditionals.append(kernel_part)
            if module.dropped_pixels is not None:
                pixel_part = _PixelPart(f"{name}.dropped_pixels", module)
                conditionals.append(pixel_part)
            if module.kernel.kind == "augment":
                kernel_noise = _NoisePart(f"{name}.kernel.noise", module.kernel, module.kernel.noise)
                noises.append(kernel_noise)
            convs.append((module, kernel_part, pixel_part, kernel_noise))
            fed_by_conv.add(id(module.kernel))
    for name, module in flow.named_modules():
        if id(module) in fed_by_conv:
            continue
        if isinstance(module, FlowLinear) and module.kind == "funnel":
            conditionals.append(_ConditionalPart(name or "<root>", module))
        elif isinstance(module, DiagonalNormal):
            bases.append(_BasePart(name or "<root>", module))
        for child_name, child in module.named_children():
            if isinstance(child, GaussianNoise):
                full = f"{name}.{child_name}" if name else child_name
                noises.append(_NoisePart(full, module, child))
    return conditionals, bases, noises, convs


def _is_conv(module: nn.Module) -> bool:
    """A :class:`flowconvert.conv.FlowConv` (checked by its parts, so this module does not import it)."""
    return type(module).__name__ == "FlowConv" and isinstance(getattr(module, "kernel", None), FlowLinear)


def _conv_patches(conv: nn.Module, x: Tensor, noise: Tensor | None) -> Tensor:
    """The patches the convolution's kernel sees (padding and duplication noise included), ``(B * L_o, C_in k)``."""
    patches = conv.kernel_patches(x, noise)
    return patches.mT.reshape(-1, patches.shape[1])


@contextlib.contextmanager
def _recording(conditionals, bases, noises, convs, state: dict) -> Iterator[None]:
    """Patch ``call_and_ll`` / ``log_prob`` on the instances to observe values; undone on exit."""
    patched: list[tuple[Any, str]] = []

    def patch(obj, attr, wrapper):
        setattr(obj, attr, wrapper)
        patched.append((obj, attr))

    def wrap_layer(layer, on_call):
        original = type(layer).call_and_ll.__get__(layer)

        def call_and_ll(x, noise=None):
            y, ll = original(x, noise)
            on_call(x, y, noise)
            return y, ll

        patch(layer, "call_and_ll", call_and_ll)

    def conv_callback(conv, kernel_part, pixel_part, kernel_noise):
        def on_call(x, y, noise):
            if kernel_part is not None or kernel_noise is not None:
                rows = _conv_patches(conv, x.detach(), noise)
                if kernel_part is not None:
                    y_rows = y.detach().reshape(x.shape[0], conv.out_channels, -1).mT.reshape(-1, conv.out_channels)
                    kernel_part.record(rows, y_rows, state["part"])
                    kernel_part.rows_per_sample = conv.n_locations
                if kernel_noise is not None:
                    kernel_noise.record(rows)
            if pixel_part is not None:
                pixel_part.record(x, y, state["part"])

        return on_call

    by_layer: dict[int, list] = {}
    for conv, kernel_part, pixel_part, kernel_noise in convs:
        by_layer.setdefault(id(conv), [conv, []])[1].append(conv_callback(conv, kernel_part, pixel_part, kernel_noise))
    fed = {id(c[1]) for c in convs} | {id(c[2]) for c in convs}
    noise_fed = {id(c[3]) for c in convs}
    for c in conditionals:
        if id(c) in fed:
            continue
        by_layer.setdefault(id(c.layer), [c.layer, []])[1].append(lambda x, y, n, c=c: c.record(x, y, state["part"]))
    for nz in noises:
        if id(nz) in noise_fed:
            continue
        by_layer.setdefault(id(nz.owner), [nz.owner, []])[1].append(lambda x, y, n, nz=nz: nz.record(x))
    for layer, callbacks in by_layer.values():
        if hasattr(layer, "call_and_ll"):
            wrap_layer(layer, lambda x, y, n, cbs=callbacks: [cb(x, y, n) for cb in cbs])
    for b in bases:
        original = type(b.base).log_prob.__get__(b.base)

        def log_prob(z, b=b, original=original):
            b.record(z, state["part"])
            return original(z)

        patch(b.base, "log_prob", log_prob)
    try:
        yield
    finally:
        for obj, attr in patched:
            delattr(obj, attr)


def _split(data: Any, holdout: float, val_data: Any, batch_size: int, seed: int):
    """(batch, part) pairs: part 0 = fit, 1 = held-out."""
    if val_data is not None:
        return [(b, 0) for b in iter_inputs(data, batch_size)] + [(b, 1) for b in iter_inputs(val_data, batch_size)]
    if not 0 <= holdout < 1:
        raise ValueError("holdout must be in [0, 1)")
    if isinstance(data, Tensor) or (isinstance(data, (tuple, list)) and isinstance(data[0], Tensor)):
        x = data if isinstance(data, Tensor) else data[0]
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x.shape[0], generator=g)
        n_hold = int(round(holdout * x.shape[0]))
        fit, hold = x[perm[n_hold:]], x[perm[:n_hold]]
        return [(b, 0) for b in fit.split(batch_size)] + [(b, 1) for b in hold.split(batch_size)]
    every = max(int(round(1 / holdout)), 2) if holdout > 0 else 0
    return [(b, 1 if every and i % every == every - 1 else 0) for i, b in enumerate(iter_inputs(data, batch_size))]


@torch.no_grad()
def _heldout_mean(flow, batches, dequantize, deterministic, seed) -> float:
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for x, part in batches:
            if part != 1:
                continue
            xi = dequantize(x) if dequantize is not None else x
            total += flow.log_prob(xi, deterministic=deterministic).double().sum().item()
            count += x.shape[0]
    return total / count if count else float("nan")


@torch.no_grad()
def _collect(flow, batches, conditionals, bases, noises, convs, dequantize, deterministic, seed) -> None:
    for p in (*conditionals, *bases, *noises):
        p.reset()
    state = {"part": 0}
    with torch.random.fork_rng(devices=[]), _recording(conditionals, bases, noises, convs, state):
        torch.manual_seed(seed)
        for x, part in batches:
            state["part"] = part
            xi = dequantize(x) if dequantize is not None else x
            flow.log_prob(xi, deterministic=deterministic)


def _fit_gaussians(parts, ridge: float, min_var: float) -> list[PartReport]:
    """Solve every part and keep, per coordinate, whichever of old/new scores higher held out."""
    reports = []
    for p in parts:
        solved = p.moments.solve(ridge, min_var) if p.kind == "conditional" else _solve_base(p.moments, min_var)
        if solved is None:
            continue
        B_new, var_new = solved
        B_old, var_old = p.current()
        ll_new, ll_old = p.moments.heldout_ll(B_new, var_new), p.moments.heldout_ll(B_old, var_old)
        if ll_new is None:  # no held-out data: take the fit
            keep_new = torch.ones_like(var_new, dtype=torch.bool)
            before = after = float("nan")
        else:
            keep_new = ll_new > ll_old
            scale = p.rows_per_sample
            before = scale * ll_old.sum().item()
            after = scale * torch.where(keep_new, ll_new, ll_old).sum().item()
        B = torch.where(keep_new[None, :], B_new, B_old)
        var = torch.where(keep_new, var_new, var_old)
        p.apply(B, var)
        reports.append(PartReport(p.name, p.kind, int(var.numel()), int(keep_new.sum()), before, after))
    return reports


def _solve_base(m: _Moments, min_var: float) -> tuple[Tensor, Tensor] | None:
    n = m.n[0]
    if n == 0:
        return None
    mean = m.T[0][-1] / n
    var = (m.dd[0] / n - mean**2).clamp_min(0)
    return mean[None, :], torch.maximum(var, torch.full_like(var, min_var)).clamp_min(1e-30)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def calibrate(
    flow: nn.Module,
    data: Any,
    *,
    val_data: Any = None,
    holdout: float = 0.2,
    dequantize: Dequantize | None = None,
    deterministic: bool = False,
    noise_factors: Sequence[float] = (0.1, 0.3, 1.0),
    ridge: float = 1e-6,
    min_var: float = 1e-6,
    batch_size: int = 512,
    seed: int = 0,
) -> CalibrationReport:
    r"""Fit every density part of ``flow`` in closed form; the network's weights are untouched.

    Args:
        flow: a converted model (anything with ``log_prob(x, deterministic=...)``) whose
            funnels are :class:`FlowLinear` (also as convolution kernels), bases
            :class:`DiagonalNormal` and noises :class:`GaussianNoise`. A standard-normal
            base has nothing to fit (convert with ``base="diagonal"`` for a fittable one).
        data: inputs as a tensor, a Dataset or a DataLoader (labels are ignored).
        val_data: held-out inputs for the guard; by default a ``holdout`` fraction of
            ``data`` (random rows of a tensor, every ``1/holdout``-th batch of a loader).
        dequantize: applied to every batch (integer levels -> continuous inputs).
        deterministic: calibrate for the deterministic (noise-free) mode; by default for
            the stochastic mode that ``log_prob`` uses.
        noise_factors: multiples of the moment-matched noise scale tried for bound layers.
        ridge, min_var: regularization of the least squares and variance floor, both
            relative to the data's own scale.

    Returns:
        a :class:`CalibrationReport` (print it for a summary).
    """
    warn_if_discrete(data, dequantize, "calibrate")
    flow_was_training = flow.training
    flow.eval()
    batches = _split(data, holdout, val_data, batch_size, seed)
    conditionals, bases, noises, convs = _find_parts(flow)
    report = CalibrationReport(
        fit_examples=sum(b.shape[0] for b, p in batches if p == 0),
        heldout_examples=sum(b.shape[0] for b, p in batches if p == 1),
    )
    have_heldout = report.heldout_examples > 0
    report.heldout_before = _heldout_mean(flow, batches, dequantize, deterministic, seed) if have_heldout else float("nan")
    gaussians = [*conditionals, *bases]

    def run() -> list[PartReport]:
        _collect(flow, batches, conditionals, bases, noises, convs, dequantize, deterministic, seed)
        return _fit_gaussians(gaussians, ridge, min_var)

    original = _snapshot(flow)
    parts = run()
    if noises and not deterministic and noise_factors:
        # candidates: current noise scales (just fitted) and multiples of the moment-matched ones
        matched = [nz.matched_log_scale() for nz in noises]
        best = (_heldout_mean(flow, batches, dequantize, deterministic, seed), None, _snapshot(flow), parts)
        for factor in noise_factors:
            flow.load_state_dict(original)
            with torch.no_grad():
                for nz, log_tau in zip(noises, matched):
                    if log_tau is not None:
                        nz.noise.log_scale.fill_(log_tau + math.log(factor))
            cand_parts = run()
            score = _heldout_mean(flow, batches, dequantize, deterministic, seed)
            if have_heldout and score > best[0]:
                best = (score, factor, _snapshot(flow), cand_parts)
        _, report.noise_factor, state, parts = best
        flow.load_state_dict(state)
        for nz in noises:
            parts.append(
                PartReport(nz.name, "noise", int(nz.noise.log_scale.numel()), int(report.noise_factor is not None) * int(nz.noise.log_scale.numel()))
            )
    report.parts = parts
    if have_heldout:
        after = _heldout_mean(flow, batches, dequantize, deterministic, seed)
        if not after >= report.heldout_before:  # never worse than uncalibrated (also catches NaN)
            flow.load_state_dict(original)
            after = report.heldout_before
            report.noise_factor = None
            for p in report.parts:
                p.updated, p.heldout_after = 0, p.heldout_before
        report.heldout_after = after
    flow.train(flow_was_training)
    flow.density_state = "calibrated"  # read by flowconvert export (an untrained flow gets a warning)
    return report
