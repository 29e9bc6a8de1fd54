r"""Closed-form calibration of a flow's density parts, without touching the network.

A converted network computes :math:`z = f(x)` with its original weights; what conversion
leaves untrained are the *density parts*, which every flow layer declares
(:meth:`~flowconvert.core.FlowLayer.density_parts`) and whose data it reports
(:meth:`~flowconvert.core.FlowLayer.observe`). Their forward values never depend on them, so
they can be fitted from one pass of statistics. Calibration iterates over the declarations
only; each part is fitted by what its density *can do* in closed form:

* **Conditionals** with a linear-Gaussian form
  (:meth:`~flowconvert.densities.ConditionalDensity.linear_regressors`):
  :math:`q(d\mid y) = \mathcal N(Ay + c, \operatorname{diag}\sigma^2)`. Maximum likelihood is
  least squares: with :math:`\tilde y = [y; 1]`, :math:`S = \sum \tilde y\tilde y^\top`,
  :math:`T = \sum \tilde y d^\top`,

  .. math:: [A\; c]^\top = (S + \lambda I')^{-1} T, \qquad
            \sigma_j^2 = \max\Big(\tfrac1N \sum (d_j - A_j y - c_j)^2,\ \epsilon\,\mathrm{Var}(d_j)\Big),

  (:math:`\lambda` a tiny ridge on :math:`A`, :math:`\epsilon` the floor ``min_var``); a
  structured form (coordinate :math:`j` on one context coordinate, e.g. pooling and sums) is the
  same regression per coordinate. Richer families (:mod:`flowconvert.families`) are set to
  exactly this linear Gaussian (their nonlinear parts reset to the identity), so fitting
  starts from it.
* **Gaps** of a max surjection (half-normal): :math:`s_c^2 = \overline{g_c^2}` per channel.
* **Bases** on the outputs: a diagonal or full-covariance Gaussian by moment matching, a Gaussian
  mixture as one Gaussian and by EM (the better held out is kept), a flow base by moment matching
  of its standardization (its flow reset to the identity) and its prior's candidates; whatever
  :meth:`~flowconvert.densities.BaseDensity.closed_form_fits` offers.
* **Noise scales** :math:`\tau` of bound layers: moment matching sets :math:`\tau^2` to the
  average variance of the signal the noise is added to. The best multiple of it (from
  ``noise_factors``) is chosen on held-out data, since the bound's optimum depends on the
  layers downstream.

Parts with no closed form (a user's own family) are left as they are and reported as such;
:func:`flowconvert.fit` trains them.

**Guard.** Statistics are accumulated separately on a fit part and a held-out part of the
data (``holdout`` fraction, or ``val_data``). For linear-Gaussian parts the held-out
log-likelihood of any parameters is available in closed form *per coordinate*, so each
coordinate keeps its old parameters unless the new ones score higher on held-out data; every
other part keeps its old state unless its held-out log-likelihood (measured) goes up. For an
exact flow, :math:`\log p` is a sum of these per-part terms plus terms the calibration does
not touch, so the held-out log-likelihood can only go up. For a flow with noise, the candidate
noise settings and the uncalibrated model are compared on the held-out part with the same
random draws, and the best is kept.

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
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ._data import iter_inputs
from .core import FlowLayer
from .densities import LOG_2PI, BaseDensity, ConditionalDensity, GaussianNoise, HalfNormal, kinked, robust_cholesky
from .dequantization import Dequantize, warn_if_discrete
from .errors import InputError
from .evaluation import sum_log_likelihood
from .validation import check_count, check_data, tensor_data

__all__ = ["calibrate", "CalibrationReport", "PartReport", "flow_layers", "declared_parts"]

#: At most this many output rows per base are kept for bases fitted from stored rows (EM).
MAX_BASE_ROWS = 50_000


@dataclass
class PartReport:
    """One density part: held-out log-likelihood (nats per sample) before and after."""

    name: str
    kind: str  # "conditional", "gaps", "base", "noise" or "undeclared"
    coords: int
    updated: int  # coordinates (or parameters groups) that took the new parameters
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    note: str = ""

    @property
    def calibrated(self) -> bool:
        return not self.note.startswith("not calibrated")


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did. ``heldout_*`` are mean ``log p`` per sample on the held-out part."""

    parts: list[PartReport] = field(default_factory=list)
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    noise_factor: float | None = None  # chosen multiple of the moment-matched noise scale; None = unchanged
    fit_examples: int = 0
    heldout_examples: int = 0
    rechosen: list[str] = field(default_factory=list)  # layers that re-chose their dropped inputs

    @property
    def not_calibrated(self) -> list[PartReport]:
        """Parts that calibration could not fit (no closed form, or not declared by their layer)."""
        return [p for p in self.parts if not p.calibrated]

    def __str__(self) -> str:
        lines = [
            f"calibrated on {self.fit_examples} examples, checked on {self.heldout_examples} held out: "
            f"held-out log p {self.heldout_before:.3f} -> {self.heldout_after:.3f} nats/sample"
        ]
        if self.noise_factor is not None:
            lines.append(f"  noise scales: {self.noise_factor:g} x moment-matched")
        if self.rechosen:
            lines.append(f"  dropped inputs re-chosen by their spread: {', '.join(self.rechosen)}")
        for p in self.parts:
            if not p.calibrated:
                lines.append(f"  {p.kind:<11} {p.name:<32} {p.note}")
            elif p.kind == "noise":
                lines.append(f"  {p.kind:<11} {p.name:<32} {'rescaled' if p.updated else 'unchanged'}")
            else:
                lines.append(
                    f"  {p.kind:<11} {p.name:<32} {p.updated}/{p.coords} updated, "
                    f"held-out {p.heldout_before:.3f} -> {p.heldout_after:.3f}" + (f" ({p.note})" if p.note else "")
                )
        return "\n".join(lines)


# -- finding the parts ------------------------------------------------------------------------
def flow_layers(flow: nn.Module) -> list[tuple[str, FlowLayer]]:
    """The outermost flow layers of ``flow`` (a layer's nested layers are its own business)."""
    found: list[tuple[str, FlowLayer]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, FlowLayer):
                found.append((path, child))
            else:
                walk(child, path)

    if isinstance(flow, FlowLayer):
        return [("", flow)]
    walk(flow, "")
    return found


def declared_parts(flow: nn.Module):
    """``(layer path, layer, DensityPart, module)`` for every declared part, in module order."""
    out = []
    for path, layer in flow_layers(flow):
        for part in layer.density_parts():
            out.append((path, layer, part, layer.get_submodule(part.name)))
    return out


def _modelling(module: nn.Module) -> bool:
    return isinstance(module, (ConditionalDensity, GaussianNoise, HalfNormal, BaseDensity))


def _undeclared(flow: nn.Module) -> list[str]:
    """Density modules inside flow layers that no declaration covers (reported, never skipped silently)."""
    missing = []
    for path, layer in flow_layers(flow):
        covered: set[int] = set()
        for part in layer.density_parts():
            covered.update(id(m) for m in layer.get_submodule(part.name).modules())
        for name, m in layer.named_modules():
            if name and _modelling(m) and id(m) not in covered:
                missing.append(f"{path}.{name}" if path else name)
                covered.update(id(s) for s in m.modules())
    return missing


# -- sufficient statistics --------------------------------------------------------------------
class _FullMoments:
    """Fit/held-out sums of [y, 1] [y, 1]^T, [y, 1] d^T and d*d for a dense linear-Gaussian regression."""

    def __init__(self, context: int, features: int, full_cov: bool = False):
        self.S = [torch.zeros(context + 1, context + 1, dtype=torch.float64) for _ in range(2)]
        self.T = [torch.zeros(context + 1, features, dtype=torch.float64) for _ in range(2)]
        self.dd = [torch.zeros(features, dtype=torch.float64) for _ in range(2)]
        self.DD = [torch.zeros(features, features, dtype=torch.float64) for _ in range(2)] if full_cov else None
        self.n = [0, 0]

    def add(self, d: Tensor, y: Tensor, part: int) -> None:
        d = d.reshape(-1, d.shape[-1]).double()
        y = y.reshape(d.shape[0], -1).double()
        z = torch.cat([y, y.new_ones(y.shape[0], 1)], 1)
        self.S[part] += z.mT @ z
        self.T[part] += z.mT @ d
        self.dd[part] += (d * d).sum(0)
        if self.DD is not None:
            self.DD[part] += d.mT @ d
        self.n[part] += d.shape[0]

    def _residual_matrix(self, B: Tensor, part: int) -> Tensor:
        S, T = self.S[part], self.T[part]
        BT = B.mT @ T
        return self.DD[part] - BT - BT.mT + B.mT @ S @ B

    def solve_cov(self, ridge: float, min_var: float) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(A, c, covariance)``: least squares and the residual covariance (floored, positive definite)."""
        solved = self.solve(ridge, min_var)
        if solved is None:
            return None
        A, c, var = solved
        n = self.n[0]
        R = self._residual_matrix(torch.cat([A.mT, c[None]]), 0) / n
        R = 0.5 * (R + R.mT)
        floor = (var - R.diagonal()).clamp_min(0) + 1e-12 * var.max().clamp_min(1e-30)
        cov = R + torch.diag(floor)
        L = robust_cholesky(cov)  # few rows: R may be only semi-definite, numerically
        return A, c, L @ L.mT

    def heldout_ll_cov(self, A: Tensor, c: Tensor, cov: Tensor) -> Tensor | None:
        """Held-out *sum* of the full-covariance Gaussian log-likelihood (a 1-element tensor)."""
        n = self.n[1]
        if n == 0:
            return None
        R = self._residual_matrix(torch.cat([A.mT, c[None]]), 1)
        L = robust_cholesky(cov)
        quad = torch.cholesky_solve(R, L).diagonal().sum()
        F = cov.shape[0]
        return (-0.5 * quad - n * (L.diagonal().log().sum() + 0.5 * F * LOG_2PI)).reshape(1)

    def solve(self, ridge: float, min_var: float) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(A, c, var)`` of the least-squares fit on the fit part."""
        S, T, dd, n = self.S[0], self.T[0], self.dd[0], self.n[0]
        if n == 0:
            return None
        reg = torch.zeros_like(S)
        idx = torch.arange(S.shape[0] - 1)
        reg[idx, idx] = ridge * (S.diagonal()[:-1].mean() / n + 1e-12) * n if S.shape[0] > 1 else 0.0
        B = torch.linalg.lstsq(S + reg, T).solution
        resid = self._sq_err(B, 0) / n
        mean_d = T[-1] / n
        var_d = (dd / n - mean_d**2).clamp_min(0)
        var = torch.maximum(resid, min_var * var_d).clamp_min(1e-30)
        return B[:-1].mT.contiguous(), B[-1].clone(), var

    def _sq_err(self, B: Tensor, part: int) -> Tensor:
        S, T, dd = self.S[part], self.T[part], self.dd[part]
        return (dd - 2 * (B * T).sum(0) + (B * (S @ B)).sum(0)).clamp_min(0)

    def heldout_ll(self, A: Tensor, c: Tensor, var: Tensor) -> Tensor | None:
        """Per-coordinate held-out *sum* of Gaussian log-likelihoods."""
        n = self.n[1]
        if n == 0:
            return None
        B = torch.cat([A.mT, c[None]])
        return -0.5 * self._sq_err(B, 1) / var - n * (0.5 * var.log() + 0.5 * LOG_2PI)

    def context_stats(self) -> tuple[Tensor, Tensor] | None:
        n = self.n[0]
        if n == 0:
            return None
        mean = self.S[0][-1, :-1] / n
        return mean, (self.S[0].diagonal()[:-1] / n - mean**2).clamp_min(0)


class _IndexMoments:
    """Per-coordinate sums for ``d_j ~ N(a_j y_idx[j] + c_j, var_j)``."""

    def __init__(self, index: Tensor, features: int):
        self.index = index.long()
        self.s = [torch.zeros(6, features, dtype=torch.float64) for _ in range(2)]  # n, y, yy, d, dy, dd
        self.n = [0, 0]

    def add(self, d: Tensor, y: Tensor, part: int) -> None:
        d = d.reshape(-1, d.shape[-1]).double()
        yj = y.reshape(d.shape[0], -1).double()[:, self.index]
        ones = torch.ones_like(d)
        self.s[part] += torch.stack([ones, yj, yj * yj, d, d * yj, d * d]).sum(1)
        self.n[part] += d.shape[0]

    def solve(self, ridge: float, min_var: float) -> tuple[Tensor, Tensor, Tensor] | None:
        n_, sy, syy, sd, sdy, sdd = self.s[0]
        n = self.n[0]
        if n == 0:
            return None
        vy = (syy - sy * sy / n).clamp_min(0)
        a = (sdy - sy * sd / n) / (vy + ridge * (syy / n + 1e-12) * n + 1e-300)
        c = (sd - a * sy) / n
        resid = self._sq_err(a, c, 0) / n
        var_d = (sdd / n - (sd / n) ** 2).clamp_min(0)
        return a, c, torch.maximum(resid, min_var * var_d).clamp_min(1e-30)

    def _sq_err(self, a: Tensor, c: Tensor, part: int) -> Tensor:
        n_, sy, syy, sd, sdy, sdd = self.s[part]
        return (sdd - 2 * a * sdy - 2 * c * sd + a * a * syy + 2 * a * c * sy + c * c * n_).clamp_min(0)

    def heldout_ll(self, a: Tensor, c: Tensor, var: Tensor) -> Tensor | None:
        n = self.n[1]
        if n == 0:
            return None
        return -0.5 * self._sq_err(a, c, 1) / var - n * (0.5 * var.log() + 0.5 * LOG_2PI)

    def context_stats(self) -> None:
        return None


class _GatherMoments(_IndexMoments):
    """Per-coordinate sums for ``d_j ~ N(a_j . y[idx[j]] + c_j, var_j)``, ``idx`` of shape ``(features, r)``
    (block-diagonal regressions, e.g. each group of a grouped convolution on its own outputs); the
    held-out likelihood is :class:`_IndexMoments`'."""

    def __init__(self, index: Tensor, features: int):
        self.index = index.long()
        r = self.index.shape[1]
        self.n = [0, 0]
        self.sy = [torch.zeros(features, r, dtype=torch.float64) for _ in range(2)]
        self.syy = [torch.zeros(features, r, r, dtype=torch.float64) for _ in range(2)]
        self.sdy = [torch.zeros(features, r, dtype=torch.float64) for _ in range(2)]
        self.sd = [torch.zeros(features, dtype=torch.float64) for _ in range(2)]
        self.sdd = [torch.zeros(features, dtype=torch.float64) for _ in range(2)]

    def add(self, d: Tensor, y: Tensor, part: int) -> None:
        d = d.reshape(-1, d.shape[-1]).double()
        yj = y.reshape(d.shape[0], -1).double()[:, self.index]  # (N, features, r)
        self.sy[part] += yj.sum(0)
        self.syy[part] += torch.einsum("nfr,nfs->frs", yj, yj)
        self.sdy[part] += torch.einsum("nf,nfr->fr", d, yj)
        self.sd[part] += d.sum(0)
        self.sdd[part] += (d * d).sum(0)
        self.n[part] += d.shape[0]

    def solve(self, ridge: float, min_var: float) -> tuple[Tensor, Tensor, Tensor] | None:
        n = self.n[0]
        if n == 0:
            return None
        sy, syy, sd = self.sy[0], self.syy[0], self.sd[0]
        cov_yy = syy - sy[:, :, None] * sy[:, None, :] / n
        cov_dy = self.sdy[0] - sy * sd[:, None] / n
        diag = syy.diagonal(dim1=-2, dim2=-1)
        reg = torch.diag_embed(ridge * (diag / n + 1e-12) * n + 1e-300)
        a = torch.linalg.lstsq(cov_yy + reg, cov_dy[..., None]).solution[..., 0]
        c = (sd - (a * sy).sum(-1)) / n
        resid = self._sq_err(a, c, 0) / n
        var_d = (self.sdd[0] / n - (sd / n) ** 2).clamp_min(0)
        return a, c, torch.maximum(resid, min_var * var_d).clamp_min(1e-30)

    def _sq_err(self, a: Tensor, c: Tensor, part: int) -> Tensor:
        n, sy, sd = self.n[part], self.sy[part], self.sd[part]
        quad = torch.einsum("fr,frs,fs->f", a, self.syy[part], a)
        cross = 2 * (a * self.sdy[part]).sum(-1) + 2 * c * sd
        return (self.sdd[part] - cross + quad + 2 * c * (a * sy).sum(-1) + c * c * n).clamp_min(0)


# -- one calibrator per part ----------------------------------------------------------------
class _Calibrator:
    """Accumulates the rows one density part models (``part`` 0: fitting rows, 1: held out) and
    fits the part in closed form; ``fit`` returns its :class:`PartReport` or None without rows."""

    name: str
    kind: str

    def __init__(self, name: str, density: nn.Module):
        self.name, self.density = name, density
        self.reset()

    def reset(self) -> None: ...

    def record(self, rows: Tensor, context: Tensor | None, part: int) -> None: ...

    def fit(self, ridge: float, min_var: float, heldout_samples: int) -> PartReport | None: ...


class _Conditional(_Calibrator):
    """A conditional part with a linear-Gaussian closed form (and a measured held-out guard)."""

    kind = "conditional"

    density: ConditionalDensity

    def reset(self) -> None:
        structure = self.density.linear_regressors()
        F, C = int(self.density.features), int(self.density.context_features)
        self.full_cov = structure == "full-cov"
        # a full covariance may sit on kinked coordinates g_s(d): moments for every slope s tried
        kinks = getattr(self.density, "kink_slopes", None)
        self.slopes = tuple(kinks()) if self.full_cov and kinks is not None else (1.0,)
        self.kinked = {s: _FullMoments(C, F, full_cov=True) for s in self.slopes[1:]}
        self.kink_log_det = {s: 0.0 for s in self.slopes}  # held-out sum of -n_-(d) log s
        if isinstance(structure, str):
            self.moments = _FullMoments(C, F, full_cov=self.full_cov)
        elif structure.dim() == 2:
            self.moments = _GatherMoments(structure, F)
        else:
            self.moments = _IndexMoments(structure, F)
        self.before = 0.0  # measured held-out sum of log q under the current parameters

    def record(self, rows, context, part):
        self.moments.add(rows, context, part)
        if self.kinked:
            negative = (rows < 0).sum().item()
            for s, moments in self.kinked.items():
                moments.add(kinked(rows, s), context, part)
                if part == 1:
                    self.kink_log_det[s] -= negative * math.log(s)
        if part == 1:
            self.before += self.density.log_prob(rows, context).double().sum().item()

    def fit(self, ridge, min_var, heldout_samples):
        if self.full_cov:
            return self._fit_cov(ridge, min_var, heldout_samples)
        solved = self.moments.solve(ridge, min_var)
        if solved is None:
            return None
        new = solved
        old = self.density.read_linear()
        ll_new, ll_old = self.moments.heldout_ll(*new), self.moments.heldout_ll(*old)
        F = int(self.density.features)
        if ll_new is None:  # no held-out data: take the fit
            A, c, var = new
            self.density.write_linear(A, c, var, *(self.moments.context_stats() or (None, None)))
            return PartReport(self.name, self.kind, F, F)
        keep = ll_new > ll_old  # per coordinate, closed form
        mask = keep[:, None] if new[0].dim() == 2 else keep
        A = torch.where(mask, new[0], old[0])
        c, var = torch.where(keep, new[1], old[1]), torch.where(keep, new[2], old[2])
        after = torch.where(keep, ll_new, ll_old).sum().item()
        before = self.before
        if not after >= before:  # the current (possibly richer, fitted) density is better held out
            return self._kept(F, before / heldout_samples)
        self.density.write_linear(A, c, var, *(self.moments.context_stats() or (None, None)))
        return PartReport(self.name, self.kind, F, int(keep.sum()), before / heldout_samples, after / heldout_samples)

    def _kept(self, features: int, before: float) -> PartReport:
        """The current (possibly richer, fitted) density is better held out than the closed form."""
        return PartReport(
            self.name, self.kind, features, 0, before, before, "kept: better than its linear-Gaussian fit"
        )

    def _fit_cov(self, ridge, min_var, heldout_samples):
        """Full covariance: the whole part takes the new parameters or keeps its own. With kinks, the
        closed form of every slope is scored held out and the best one is taken."""
        new = self.moments.solve_cov(ridge, min_var)
        if new is None:
            return None
        F = int(self.density.features)
        stats = self.moments.context_stats() or (None, None)
        ll_new = self.moments.heldout_ll_cov(*new)
        if ll_new is None:
            self.density.write_linear(*new, *stats)
            return PartReport(self.name, self.kind, F, F)
        after, slope = ll_new.item(), 1.0
        for s, moments in self.kinked.items():
            solved = moments.solve_cov(ridge, min_var)
            ll = moments.heldout_ll_cov(*solved).item() + self.kink_log_det[s] if solved is not None else -math.inf
            if ll > after + 1e-9 * (1.0 + abs(after)):  # a real gain: without negative rows all slopes tie
                after, slope, new = ll, s, solved
        before = self.before
        if not after >= before:
            return self._kept(F, before / heldout_samples)
        extra = {"kink": slope} if self.kinked else {}
        self.density.write_linear(*new, *stats, **extra)
        note = f"kink slope {slope:g}" if slope != 1.0 else ""
        return PartReport(self.name, self.kind, F, F, before / heldout_samples, after / heldout_samples, note)


class _Gaps(_Calibrator):
    """Half-normal gaps: closed-form per-channel scale, per-channel held-out guard."""

    kind = "gaps"

    density: HalfNormal

    def reset(self):
        C = self.density.channels
        self.sq = [torch.zeros(C, dtype=torch.float64) for _ in range(2)]
        self.n = [0, 0]

    def record(self, rows, context, part):
        r = rows.double()
        self.sq[part] += (r * r).sum(0)
        self.n[part] += r.shape[0]

    def _ll(self, var: Tensor) -> Tensor:
        n = self.n[1]
        return n * (math.log(2.0) - 0.5 * var.log() - 0.5 * LOG_2PI) - 0.5 * self.sq[1] / var

    def fit(self, ridge, min_var, heldout_samples):
        if self.n[0] == 0:
            return None
        C = self.density.channels
        new = (self.sq[0] / self.n[0]).clamp_min(1e-30)
        old = (2 * self.density.log_scale.detach().double()).exp()
        if self.n[1] == 0:
            keep = torch.ones(C, dtype=torch.bool)
            before = after = float("nan")
        else:
            ll_new, ll_old = self._ll(new), self._ll(old)
            keep = ll_new > ll_old
            before = ll_old.sum().item() / heldout_samples
            after = torch.where(keep, ll_new, ll_old).sum().item() / heldout_samples
        var = torch.where(keep, new, old)
        with torch.no_grad():
            self.density.log_scale.copy_((0.5 * var.log()).to(self.density.log_scale.dtype))
        return PartReport(self.name, self.kind, C, int(keep.sum()), before, after)


class _Base(_Calibrator):
    """A base density fitted on stored rows by each of its closed forms
    (:meth:`~flowconvert.densities.BaseDensity.closed_form_fits`); the best held out is kept,
    or the state before when none is better (without held-out rows: the last candidate)."""

    kind = "base"

    density: BaseDensity

    def reset(self):
        self.rows: list[list[Tensor]] = [[], []]
        self.count = [0, 0]

    def record(self, rows, context, part):
        if self.count[part] >= MAX_BASE_ROWS:
            return
        r = rows.detach().reshape(rows.shape[0], -1)[: MAX_BASE_ROWS - self.count[part]]
        self.rows[part].append(r.clone())
        self.count[part] += r.shape[0]

    def fit(self, ridge, min_var, heldout_samples):
        if not self.rows[0]:
            return None
        shape = tuple(self.density.event_shape)
        fit_rows = torch.cat(self.rows[0]).reshape(-1, *shape)
        held = torch.cat(self.rows[1]).reshape(-1, *shape) if self.rows[1] else None
        coords = math.prod(shape)
        snapshot = lambda: {k: v.detach().clone() for k, v in self.density.state_dict().items()}
        score = lambda: self.density.log_prob(held).double().mean().item() if held is not None else float("nan")
        state = snapshot()
        with torch.no_grad():
            before = score()
            best, best_state, chosen, tried = -math.inf, None, "", 0
            for label in self.density.closed_form_fits(fit_rows, min_var=min_var):
                tried += 1
                after = score()
                # finite, and a real gain over the simpler candidates before it (ties keep the simpler one)
                gain = math.isfinite(after) and (best_state is None or after > best + 1e-9 * (1.0 + abs(best)))
                if held is None or gain:
                    best, best_state, chosen = after, snapshot(), label
        if not tried:
            return PartReport(
                self.name,
                self.kind,
                coords,
                0,
                before,
                before,
                "not calibrated: fixed base"
                if not list(self.density.parameters())
                else "not calibrated: no closed form (fit() trains it)",
            )
        if held is not None and (best_state is None or not best >= before):
            self.density.load_state_dict(state)
            return PartReport(self.name, self.kind, coords, 0, before, before, "kept: the fit was worse held out")
        self.density.load_state_dict(best_state)
        note = chosen if tried > 1 else ""
        return PartReport(self.name, self.kind, coords, coords, before, best, note)


class _Noise(_Calibrator):
    """Noise of a bound layer; records the average variance of the signal it is added to."""

    kind = "noise"

    density: GaussianNoise

    def reset(self):
        self.total, self.count = 0.0, 0

    def record(self, rows, context, part):
        flat = rows.detach().double().reshape(rows.shape[0], -1)
        if flat.shape[0] > 1:
            self.total += flat.var(0).mean().item()
            self.count += 1

    def matched_log_scale(self) -> float | None:
        if self.count == 0 or self.total <= 0:
            return None
        return 0.5 * math.log(self.total / self.count)


class _Unfit(_Calibrator):
    """A declared part with no closed form: reported, fitted only by :func:`flowconvert.fit`."""

    def __init__(self, name: str, kind: str, coords: int, why: str):
        self.name, self.kind, self.coords, self.why = name, kind, coords, why

    def fit(self, ridge, min_var, heldout_samples):
        return PartReport(self.name, self.kind, self.coords, 0, note=f"not calibrated: {self.why}")


def _calibrator(name: str, part, module: nn.Module) -> _Calibrator:
    if part.kind == "conditional":
        if isinstance(module, ConditionalDensity) and module.linear_regressors() is not None:
            return _Conditional(name, module)
        return _Unfit(name, part.kind, part.features, "no closed form (fit() trains it)")
    if part.kind == "noise" and isinstance(module, GaussianNoise):
        return _Noise(name, module)
    if part.kind == "gaps" and isinstance(module, HalfNormal):
        return _Gaps(name, module)
    return _Unfit(
        name, part.kind, part.features, f"no calibration for a {part.kind} part of type {type(module).__name__}"
    )


def _bases(flow: nn.Module) -> list[tuple[str, BaseDensity]]:
    """Base densities outside the flow layers (``flow.bases`` of a FlowModel, or anywhere else);
    a base inside another (a spline flow's mixture prior) is part of the outer one, not a base."""
    inside = {id(m) for _, layer in flow_layers(flow) for m in layer.modules()}
    found = [(name or "<root>", m) for name, m in flow.named_modules() if isinstance(m, BaseDensity)]
    inside |= {id(sub) for _, m in found for sub in m.modules() if sub is not m}
    return [(name, m) for name, m in found if id(m) not in inside]


# -- recording ---------------------------------------------------------------------------------
@contextlib.contextmanager
def observed_calls(
    layers: Iterable[FlowLayer],
    on_layer: Callable[[FlowLayer, tuple, Tensor | None, tuple[Tensor, Tensor]], None],
    bases: Iterable[BaseDensity] = (),
    on_base: Callable[[BaseDensity, Tensor, Tensor], None] | None = None,
) -> Iterator[None]:
    """Watch a flow at work: ``call_and_ll`` of each of ``layers`` and ``log_prob`` of each of
    ``bases`` are patched on the instances (a generated graph calls them there), and after each
    call ``on_layer(layer, inputs, noise, (y, ll))`` / ``on_base(base, z, log_p)`` sees it; the
    patch is lifted while ``on_layer`` runs, so it may call the layer again. Undone on exit."""
    patched: list[tuple[Any, str]] = []
    for layer in layers:
        original = type(layer).call_and_ll.__get__(layer)

        def call_and_ll(*xs, noise=None, layer=layer, original=original):
            if len(xs) > layer.num_inputs:  # noise passed positionally
                xs, noise = xs[: layer.num_inputs], xs[layer.num_inputs]
            out = original(*xs, noise=noise)
            patch = layer.__dict__.pop("call_and_ll")
            try:
                on_layer(layer, xs, noise, out)
            finally:
                layer.__dict__["call_and_ll"] = patch
            return out

        layer.call_and_ll = call_and_ll
        patched.append((layer, "call_and_ll"))
    for base in bases:
        original = type(base).log_prob.__get__(base)

        def log_prob(z, base=base, original=original):
            lp = original(z)
            on_base(base, z, lp)
            return lp

        base.log_prob = log_prob
        patched.append((base, "log_prob"))
    try:
        yield
    finally:
        for obj, attr in patched:
            delattr(obj, attr)


def _recording(flow: nn.Module, by_layer: dict, bases: list, state: dict):
    """Record the rows every calibrator models (its layer's :meth:`~flowconvert.core.FlowLayer.observe`,
    a base's outputs) while the flow runs; undone on exit."""
    calibrators = {id(layer): cals for layer, cals in by_layer.values()}
    base_cals = {id(cal.density): cal for cal in bases}

    def on_layer(layer, xs, noise, out):
        observed = layer.observe(*xs, noise=noise)  # may call call_and_ll itself (FlowConv's dropped pixels)
        for part_name, cal in calibrators[id(layer)].items():
            if part_name not in observed:
                raise RuntimeError(f"{type(layer).__name__}.observe() returned no rows for declared part {part_name!r}")
            rows, context = observed[part_name]
            cal.record(rows.detach(), None if context is None else context.detach(), state["part"])

    def on_base(base, z, lp):
        base_cals[id(base)].record(z, None, state["part"])

    return observed_calls([layer for layer, _ in by_layer.values()], on_layer, [c.density for c in bases], on_base)


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
        n_hold = max(min(int(round(holdout * x.shape[0])), x.shape[0] - 1), 0)  # keep one sample to fit on
        fit, hold = x[perm[n_hold:]], x[perm[:n_hold]]
        return [(b, 0) for b in fit.split(batch_size)] + [(b, 1) for b in hold.split(batch_size)]
    every = max(int(round(1 / holdout)), 2) if holdout > 0 else 0
    return [(b, 1 if every and i % every == every - 1 else 0) for i, b in enumerate(iter_inputs(data, batch_size))]


def _heldout_mean(flow, batches, dequantize, deterministic, seed) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        held_out = (x for x, part in batches if part == 1)
        total, count, _ = sum_log_likelihood(flow, held_out, dequantize=dequantize, deterministic=deterministic)
    return total / count if count else float("nan")


@torch.no_grad()
def _collect(flow, batches, by_layer, bases, dequantize, deterministic, seed) -> None:
    for _, cals in by_layer.values():
        for cal in cals.values():
            cal.reset()
    for cal in bases:
        cal.reset()
    state = {"part": 0}
    with torch.random.fork_rng(devices=[]), _recording(flow, by_layer, bases, state):
        torch.manual_seed(seed)
        for x, part in batches:
            state["part"] = part
            xi = dequantize(x) if dequantize is not None else x
            flow.log_prob(xi, deterministic=deterministic)


@torch.no_grad()
def _choose_dropped(flow, batches, dequantize, deterministic, seed) -> list[str]:
    """Let every layer that can (:meth:`~flowconvert.core.FlowLayer.choose_dropped`) re-choose its
    dropped coordinates from its inputs' spread on the fit batches; returns the layers that did."""
    layers = [(path, layer) for path, layer in flow_layers(flow) if layer.dropped_choice_features() > 0]
    if not layers:
        return []
    sums = {id(layer): [0, 0.0, 0.0] for _, layer in layers}

    def on_layer(layer, xs, noise, out):
        rows = xs[0].detach().reshape(-1, layer.dropped_choice_features()).double()
        acc = sums[id(layer)]
        acc[0] += rows.shape[0]
        acc[1] = acc[1] + rows.sum(0)
        acc[2] = acc[2] + (rows * rows).sum(0)

    with observed_calls([layer for _, layer in layers], on_layer), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, part in batches:
            if part == 0:
                flow.log_prob(dequantize(x) if dequantize is not None else x, deterministic=deterministic)
    changed = []
    for path, layer in layers:
        n, total, squares = sums[id(layer)]
        if n < 2:
            continue
        mean = total / n
        std = (squares / n - mean * mean).clamp_min(0).sqrt()
        if layer.choose_dropped(std):
            changed.append(path)
    return changed


def _rechoose(flow, batches, dequantize, deterministic, seed, run, by_layer, pristine) -> list[str]:
    """Dropped inputs chosen by their spread, kept per layer where they score better held out.

    A layer's choice changes only its own term, ``log|det W_{S^c}| + log q(x_S | y)``, so each
    layer compares that term (held out, each choice calibrated in closed form) and keeps the
    better choice. The densities come back uncalibrated (``pristine``): the caller calibrates."""
    before = {r.name: r for r in run()}
    first = {
        id(layer): (float(layer.logdet()), layer.condition)
        for _, layer in flow_layers(flow)
        if layer.dropped_choice_features() > 0
    }
    changed = _choose_dropped(flow, batches, dequantize, deterministic, seed)
    if not changed:
        flow.load_state_dict(pristine)
        return []
    after = {r.name: r for r in run()}
    held = sum(x.shape[0] for x, part in batches if part == 1)
    kept: list[str] = []
    state = dict(pristine)
    for path, layer in flow_layers(flow):
        if path not in changed:
            continue
        logdet0, condition0 = first[id(layer)]
        cals = list(by_layer.get(id(layer), (None, {}))[1].values())
        # rows per held-out sample (1 for a matrix input): the log|det| term counts once per row
        rows = sum(c.moments.n[1] for c in cals if isinstance(c, _Conditional)) / max(held * len(cals), 1)

        def score(reports, logdet, cals=cals, rows=rows):
            parts = [reports.get(c.name) for c in cals]
            if not parts or any(p is None or not math.isfinite(p.heldout_after) for p in parts):
                return -math.inf
            return rows * logdet + sum(p.heldout_after for p in parts)

        if score(after, float(layer.logdet())) > score(before, logdet0):
            kept.append(path)
            prefix = _state_prefix(flow, layer)
            state[prefix + "kept_index"] = layer.kept_index.clone()
            state[prefix + "dropped_index"] = layer.dropped_index.clone()
        else:
            layer.condition = condition0
    flow.load_state_dict(state)  # uncalibrated densities, the chosen inputs (caches follow the indices)
    return kept


def _state_prefix(flow: nn.Module, layer: nn.Module) -> str:
    name = next(n for n, m in flow.named_modules() if m is layer)
    return f"{name}." if name else ""


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
    r"""Fit every declared density part of ``flow`` in closed form; the network's weights are untouched.

    Args:
        flow: a converted model (anything with ``log_prob(x, deterministic=...)``) whose flow
            layers declare their density parts (:meth:`~flowconvert.core.FlowLayer.density_parts`);
            base densities are found as :class:`~flowconvert.densities.BaseDensity` modules
            outside the layers.
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
        a :class:`CalibrationReport` (print it for a summary; ``report.not_calibrated`` lists
        the parts it could not fit, e.g. density modules a layer does not declare).
    """
    check_count("batch_size", batch_size, 1)
    if isinstance(holdout, bool) or not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise InputError(f"holdout must be a fraction in [0, 1), got {holdout!r}", code="FC604")
    for name, given in (("data", data), ("val_data", val_data)):
        if tensor_data(given) is not None:  # whole tensors are checked at once (rows numbered as given)
            check_data(flow, tensor_data(given), name, dequantize=dequantize)
    batches = _split(data, holdout, val_data, batch_size, seed)
    for x, part in batches:
        check_data(flow, x, "val_data" if part and val_data is not None else "data", dequantize=dequantize)
    if not any(x.shape[0] for x, part in batches if part == 0):
        raise InputError("calibrate needs at least one sample of data to fit on; got none", code="FC604")
    if val_data is not None and not any(x.shape[0] for x, part in batches if part == 1):
        raise InputError(
            "val_data is empty; pass held-out samples or val_data=None (then holdout= is used)", code="FC604"
        )
    warn_if_discrete(data, dequantize, "calibrate")
    flow_was_training = flow.training
    flow.eval()
    try:  # the training mode comes back on every exit, interrupts included
        report = _calibrate(flow, batches, dequantize, deterministic, noise_factors, ridge, min_var, seed)
    finally:
        flow.train(flow_was_training)
    flow.density_state = "calibrated"  # read by flowconvert export (an untrained flow gets a warning)
    return report


def _calibrate(flow, batches, dequantize, deterministic, noise_factors, ridge, min_var, seed) -> CalibrationReport:
    by_layer: dict[int, tuple[FlowLayer, dict[str, _Calibrator]]] = {}
    calibrators: list[_Calibrator] = []
    for path, layer, part, module in declared_parts(flow):
        cal = _calibrator(f"{path}.{part.name}" if path else part.name, part, module)
        calibrators.append(cal)
        if not isinstance(cal, _Unfit):
            by_layer.setdefault(id(layer), (layer, {}))[1][part.name] = cal
    bases = [_Base(name, b) for name, b in _bases(flow)]
    noises = [c for c in calibrators if isinstance(c, _Noise)]
    report = CalibrationReport(
        fit_examples=sum(b.shape[0] for b, p in batches if p == 0),
        heldout_examples=sum(b.shape[0] for b, p in batches if p == 1),
    )
    have_heldout = report.heldout_examples > 0
    held = max(report.heldout_examples, 1)
    report.heldout_before = (
        _heldout_mean(flow, batches, dequantize, deterministic, seed) if have_heldout else float("nan")
    )
    fitted = [c for c in calibrators if not isinstance(c, (_Noise, _Unfit))] + bases

    def run() -> list[PartReport]:
        _collect(flow, batches, by_layer, bases, dequantize, deterministic, seed)
        return [r for r in (c.fit(ridge, min_var, held) for c in fitted) if r is not None]

    pristine = _snapshot(flow)
    if getattr(flow, "density_state", "untrained") == "untrained" and have_heldout:
        report.rechosen = _rechoose(flow, batches, dequantize, deterministic, seed, run, by_layer, pristine)
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
                        nz.density.log_scale.fill_(log_tau + math.log(factor))
            cand_parts = run()
            score = _heldout_mean(flow, batches, dequantize, deterministic, seed)
            if have_heldout and score > best[0]:
                best = (score, factor, _snapshot(flow), cand_parts)
        _, report.noise_factor, state, parts = best
        flow.load_state_dict(state)
        for nz in noises:
            n = int(nz.density.log_scale.numel())
            parts.append(PartReport(nz.name, "noise", n, n * int(report.noise_factor is not None)))
    elif noises:
        parts += [
            PartReport(
                nz.name,
                "noise",
                int(nz.density.log_scale.numel()),
                0,
                note="not calibrated: deterministic mode adds no noise" if deterministic else "",
            )
            for nz in noises
        ]
    parts += [c.fit(ridge, min_var, held) for c in calibrators if isinstance(c, _Unfit)]
    parts += [
        PartReport(name, "undeclared", 0, 0, note="not calibrated: its layer does not declare it in density_parts()")
        for name in _undeclared(flow)
    ]
    report.parts = parts
    if have_heldout:
        after = _heldout_mean(flow, batches, dequantize, deterministic, seed)
        if not after >= report.heldout_before:  # never worse than uncalibrated (also catches NaN)
            flow.load_state_dict(pristine)
            report.rechosen = []
            after = report.heldout_before
            report.noise_factor = None
            for p in report.parts:
                p.updated, p.heldout_after = 0, p.heldout_before
        report.heldout_after = after
    return report
