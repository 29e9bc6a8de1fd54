r"""Densities written as plain tensor maths (no ``torch.distributions`` inside a graph).

All log-densities are in nats. A diagonal Gaussian with mean :math:`\mu` and log-scale
:math:`\lambda` (:math:`\sigma = e^\lambda`) has

.. math:: \log \mathcal N(x; \mu, \sigma^2) = -\tfrac12 \big((x-\mu)/\sigma\big)^2 - \lambda - \tfrac12\log 2\pi .

>>> import torch
>>> base = StandardNormal((3,))
>>> base.log_prob(torch.zeros(2, 3))
tensor([-2.7568, -2.7568])
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import Configurable
from .core import _is_exporting, weight_only

__all__ = [
    "ConditionalDensity",
    "BaseDensity",
    "LOG_2PI",
    "normal_log_prob",
    "sum_except_batch",
    "StandardNormal",
    "DiagonalNormal",
    "ConditionalNormal",
    "ConditionalDiagonalNormal",
    "ConditionalFullNormal",
    "FullNormal",
    "KINK_SLOPES",
    "FULL_COVARIANCE_MAX",
    "ElementwiseConditionalNormal",
    "GaussianNoise",
    "HalfNormal",
]

LOG_2PI = math.log(2 * math.pi)


def sum_except_batch(t: Tensor) -> Tensor:
    """Sum every dimension but the first: ``(B, ...) -> (B,)``."""
    return t.reshape(t.shape[0], -1).sum(1)


def normal_log_prob(x: Tensor, loc: Tensor | float = 0.0, log_scale: Tensor | float = 0.0) -> Tensor:
    """Elementwise :math:`\\log \\mathcal N(x; \\mu, e^{2\\lambda})`.

    >>> round(normal_log_prob(torch.tensor(0.0)).item(), 4)
    -0.9189
    """
    z = (x - loc) * torch.exp(-torch.as_tensor(log_scale, dtype=x.dtype, device=x.device))
    return -0.5 * z * z - log_scale - 0.5 * LOG_2PI


class ConditionalDensity(Configurable, nn.Module):
    r"""The interface of every family of conditional densities :math:`q(d \mid y)`.

    ``features`` coordinates ``d`` are modelled given ``context`` coordinates ``y``; both
    have the same leading dimensions, the last one being ``features`` / ``context``
    (``(N, features)`` and ``(N, context)`` for rows). Draws are explicit: ``eps`` is
    standard normal of ``d``'s shape, and a sampled inverse at temperature :math:`T` passes
    :math:`T\,\varepsilon`.

    * ``log_prob(d, y)``: :math:`\log q(d\mid y)`, summed over every dimension but the first;
    * ``sample(y, eps=None)``: the draw that ``eps`` maps to (``eps`` drawn when ``None``);
    * ``mean(y)``: the point a deterministic inverse uses (the conditional mean for Gaussians;
      for other families the image of ``eps = 0``).
    """

    features: int
    context_features: int

    def log_prob(self, d: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, y: Tensor, eps: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def mean(self, y: Tensor) -> Tensor:
        shape = (*y.shape[:-1], self.features)
        return self.sample(y, torch.zeros(shape, dtype=y.dtype, device=y.device))

    def natural_scales(self) -> dict[str, Tensor]:
        """The unit of a step of each named parameter: :func:`flowconvert.fit` multiplies Adam's
        update of parameter ``name`` by ``scales[name]`` (broadcast to its shape), so a step moves
        the density by about the same amount in every coordinate whatever the data's scale (a
        mean moves in units of its standard deviation). Parameters not named take Adam's steps."""
        return {}

    def staged_parameters(self) -> list[nn.Parameter]:
        """Parameters that refine a simpler density and start where they change nothing (a spline
        at the identity): :func:`flowconvert.fit` first trains every other parameter to its best
        held-out epoch, then frees these too. Default: none."""
        return []

    # -- closed-form calibration (optional) ---------------------------------------------
    def linear_regressors(self) -> Tensor | str | None:
        r"""Which linear-Gaussian model :func:`flowconvert.calibrate` fits in closed form, or None.

        ``"full"``: :math:`d \sim \mathcal N(A y + c, \operatorname{diag}\sigma^2)` with a dense
        ``(features, context)`` matrix :math:`A`; a long tensor ``idx`` of shape ``(features,)``:
        coordinate :math:`j` regresses on the single context coordinate ``y[idx[j]]`` (``A`` of
        shape ``(features,)``). Richer families return the structure of the linear-Gaussian
        part they start from; ``None`` (the default): no closed form, the part is only fitted.
        """
        return None

    def read_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, c, var)`` of the linear-Gaussian part, float64 (see :meth:`linear_regressors`)."""
        raise NotImplementedError

    def write_linear(
        self, A: Tensor, c: Tensor, var: Tensor, context_mean: Tensor | None = None, context_var: Tensor | None = None
    ) -> None:
        """Set the linear-Gaussian part; a richer family also resets the rest to its identity, so
        that it then *equals* that linear Gaussian (``context_mean``/``context_var``: moments of
        ``y`` a family may use to standardize its conditioner's input)."""
        raise NotImplementedError


class BaseDensity(Configurable, nn.Module):
    """The interface of every base density on one output of shape ``event_shape``.

    * ``log_prob(z)``: ``(B, *event_shape) -> (B,)``;
    * ``sample(n, temperature=1.0)``: ``n`` draws, every standard-normal draw scaled by ``temperature``.
    """

    event_shape: tuple[int, ...]

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError

    def fit_closed_form(self, z: Tensor, min_var: float = 1e-6) -> bool:
        """Fit to outputs ``z`` ``(N, *event_shape)`` in closed form (used by :func:`flowconvert.calibrate`);
        return False when there is nothing to fit this way (the default)."""
        return False

    def closed_form_fits(self, z: Tensor, min_var: float = 1e-6) -> Iterator[str]:
        """Fit to outputs ``z`` in each closed form the density has, one after another.

        A generator: at each ``yield`` (of a short label) the density holds one candidate fit;
        :func:`flowconvert.calibrate` scores every candidate on held-out outputs and keeps the
        best (or the state before, when none is better). By default the one fit of
        :meth:`fit_closed_form` (no candidate when it returns False); a density with several
        closed forms (:class:`~flowconvert.families.GaussianMixture`: one Gaussian, then EM)
        yields each, simplest first.
        """
        if self.fit_closed_form(z, min_var=min_var):
            yield ""

    natural_scales = ConditionalDensity.natural_scales  # the same contract (see there)
    staged_parameters = ConditionalDensity.staged_parameters


def _moments(z: Tensor, min_var: float) -> tuple[Tensor, Tensor]:
    """Mean and variance (floored at ``min_var``) over the first dimension, float64."""
    z = z.double()
    mean = z.mean(0)
    var = (z * z).mean(0) - mean * mean
    return mean, var.clamp_min(min_var)


class StandardNormal(BaseDensity):
    """Standard normal base density on an event of shape ``event_shape``.

    >>> StandardNormal((2,)).sample(4).shape
    torch.Size([4, 2])
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # dtype/device carrier

    def log_prob(self, z: Tensor) -> Tensor:
        """``(B, *event_shape) -> (B,)``."""
        return sum_except_batch(-0.5 * z * z) - 0.5 * LOG_2PI * math.prod(self.event_shape)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        return temperature * torch.randn(n, *self.event_shape, dtype=self._anchor.dtype, device=self._anchor.device)


class DiagonalNormal(BaseDensity):
    """Learnable diagonal Gaussian: parameters ``loc`` and ``log_scale`` of shape ``event_shape``.

    >>> d = DiagonalNormal((2,))
    >>> torch.allclose(d.log_prob(torch.zeros(1, 2)), StandardNormal((2,)).log_prob(torch.zeros(1, 2)))
    True
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.loc = nn.Parameter(torch.zeros(self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def log_prob(self, z: Tensor) -> Tensor:
        return sum_except_batch(normal_log_prob(z, self.loc, self.log_scale))

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        eps = torch.randn(n, *self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + temperature * eps * self.log_scale.exp()

    def natural_scales(self) -> dict[str, Tensor]:
        return {"loc": self.log_scale.detach().exp()}

    @torch.no_grad()
    def fit_closed_form(self, z: Tensor, min_var: float = 1e-6) -> bool:
        """Moment matching: ``loc = mean z``, ``scale^2 = max(Var z, min_var)``."""
        mean, var = _moments(z, min_var)
        self.loc.copy_(mean.to(self.loc.dtype))
        self.log_scale.copy_((0.5 * var.log()).to(self.log_scale.dtype))
        return True


class ConditionalNormal(ConditionalDensity):
    r"""Base of the conditional diagonal Gaussians :math:`q(d\mid y) = \mathcal N(\mu(y), \operatorname{diag} e^{2\lambda})`.

    Subclasses define :meth:`mean` (how :math:`\mu` depends on :math:`y`) and, when their
    ``log_scale`` needs broadcasting against ``y``, :meth:`log_scale_for`; the density and
    the draws are shared.
    """

    log_scale: nn.Parameter

    def mean(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def log_scale_for(self, y: Tensor) -> Tensor:
        """``log_scale`` shaped to broadcast against :meth:`mean` ``(y)``."""
        return self.log_scale

    def log_prob(self, d: Tensor, y: Tensor) -> Tensor:
        """``log q(d | y)`` summed over all but the batch dimension."""
        return sum_except_batch(normal_log_prob(d, self.mean(y), self.log_scale_for(y)))

    def sample(self, y: Tensor, eps: Tensor | None = None) -> Tensor:
        """A draw given ``y`` (from ``eps``, standard normal of the mean's shape, drawn if ``None``)."""
        mu = self.mean(y)
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + eps.reshape(mu.shape) * self.log_scale_for(y).exp()


def _init_linear_gaussian(q: nn.Module, features: int, context_features: int) -> None:
    """The parameters of a linear-Gaussian conditional, a standard normal at the start (A = 0, c = 0, sigma = 1)."""
    q.features = int(features)
    q.context_features = int(context_features)
    q.weight = nn.Parameter(torch.zeros(q.features, q.context_features))
    q.bias = nn.Parameter(torch.zeros(q.features))
    q.log_scale = nn.Parameter(torch.zeros(q.features))
    # standard deviation of each context coordinate, set by calibration: the unit of a step of A
    q.register_buffer("context_scale", torch.ones(q.context_features))


def _linear_scales(q: nn.Module) -> dict[str, Tensor]:
    """``A`` in units of (residual scale / context scale), ``c`` in units of the residual scale."""
    sigma = q.log_scale.detach().exp()
    return {"weight": sigma[:, None] / q.context_scale.clamp_min(1e-12)[None, :], "bias": sigma}


def _set_context_scale(q: nn.Module, context_var: Tensor | None) -> None:
    if context_var is not None and context_var.numel() == q.context_scale.numel():
        with torch.no_grad():
            q.context_scale.copy_(context_var.reshape(-1).clamp_min(1e-24).sqrt().to(q.context_scale.dtype))


class ConditionalDiagonalNormal(ConditionalNormal):
    r"""Density of dropped coordinates given kept ones: :math:`q(d\mid y) = \mathcal N(A y + c, \operatorname{diag}\sigma^2)`.

    ``weight`` is :math:`A` (``features x context``), ``bias`` is :math:`c`, ``log_scale`` is
    :math:`\log\sigma`. Starts as a standard normal independent of :math:`y` (A = 0, c = 0,
    sigma = 1); :func:`flowconvert.calibrate` can fit it in closed form.

    >>> q = ConditionalDiagonalNormal(2, 3)
    >>> q.log_prob(torch.zeros(5, 2), torch.randn(5, 3)).shape
    torch.Size([5])
    """

    def __init__(self, features: int, context_features: int):
        super().__init__()
        _init_linear_gaussian(self, features, context_features)

    def mean(self, y: Tensor) -> Tensor:
        """Conditional mean :math:`A y + c` over the last dimension."""
        return nn.functional.linear(y, self.weight, self.bias)

    def linear_regressors(self) -> str:
        return "full"

    def read_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        return _read(self)

    def write_linear(self, A, c, var, context_mean=None, context_var=None) -> None:
        _write(self, A, c, var)
        _set_context_scale(self, context_var)

    def natural_scales(self) -> dict[str, Tensor]:
        return _linear_scales(self)


def _read(q: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, c, var)`` of a linear Gaussian with parameters ``weight``, ``bias``, ``log_scale``, flattened per feature."""
    A = q.weight.detach().double()
    if not isinstance(q.linear_regressors(), str):
        A = A.reshape(-1)
    var = (2 * q.log_scale.detach().double()).exp().expand(q.bias.shape).reshape(-1)
    return A, q.bias.detach().double().reshape(-1), var


def _write(q: nn.Module, A: Tensor, c: Tensor, var: Tensor) -> None:
    with torch.no_grad():
        q.weight.copy_(A.reshape(q.weight.shape).to(q.weight.dtype))
        q.bias.copy_(c.reshape(q.bias.shape).to(q.bias.dtype))
        q.log_scale.copy_((0.5 * var.log()).reshape(q.log_scale.shape).to(q.log_scale.dtype))


def robust_cholesky(cov: Tensor) -> Tensor:
    r"""Lower Cholesky factor of a covariance that should be positive definite but may not be,
    numerically (few samples, near-deterministic combinations): it is shrunk towards its
    diagonal, :math:`(1-\alpha)\Sigma + \alpha\operatorname{diag}\Sigma`, with the smallest
    :math:`\alpha \in \{0, 10^{-8}, \dots, 1\}` that factorizes (batched: per matrix). The
    diagonal must be positive.

    >>> robust_cholesky(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)).diagonal().gt(0).all()
    tensor(True)
    """
    diag = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
    L, info = torch.linalg.cholesky_ex(cov)
    for alpha in (1e-8, 1e-6, 1e-4, 1e-2, 0.1, 0.5, 1.0):
        bad = info > 0
        if not bool(bad.any()):
            break
        shrunk = (1 - alpha) * cov + alpha * diag
        L2, info2 = torch.linalg.cholesky_ex(shrunk)
        L = torch.where(bad[..., None, None], L2, L)
        info = torch.where(bad, info2, info)
    return L


def precision_tril_scales(P: Tensor) -> Tensor:
    r"""The unit of a step of each entry of a precision factor :math:`P` (batched): entry
    :math:`P_{ik}` multiplies a coordinate of marginal standard deviation
    :math:`\sqrt{\Sigma_{kk}}`, :math:`\Sigma = P^{-1}P^{-\top}`, so its step is
    :math:`1/\sqrt{\Sigma_{kk}}` (a step then moves the whitened residual by about one unit
    whatever the scale; the diagonal's :math:`e^{-\lambda}` is the *conditional* deviation, far
    smaller along a near-deterministic combination)."""
    P64 = P.detach().double()
    eye = torch.eye(P.shape[-1], dtype=P64.dtype, device=P.device)
    Pinv = torch.linalg.solve_triangular(P64, eye, upper=False)  # once per fit, never traced
    std = Pinv.square().sum(-1).sqrt().clamp_min(1e-30)
    return (1.0 / std).unsqueeze(-2).expand(*P.shape).to(P.dtype)


def precision_factor(tril: Tensor, log_scale: Tensor) -> Tensor:
    r"""Lower-triangular :math:`P` (batched): the strictly lower part of ``tril`` (None: diagonal),
    :math:`e^{-\lambda}` on the diagonal."""
    diagonal = torch.diag_embed(torch.exp(-log_scale))
    return diagonal if tril is None else torch.tril(tril, -1) + diagonal


@torch.no_grad()
def write_precision(cov: Tensor, log_scale: Tensor, tril: Tensor) -> None:
    r"""Set ``log_scale`` and ``tril`` so that :func:`precision_factor` is :math:`\operatorname{chol}(\Sigma)^{-1}`
    (batched; :func:`robust_cholesky`)."""
    L = robust_cholesky(cov.double())
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    P = torch.linalg.solve_triangular(L, eye, upper=False)
    log_scale.copy_((-P.diagonal(dim1=-2, dim2=-1).log()).to(log_scale.dtype))
    tril.copy_(torch.tril(P, -1).to(tril.dtype))


def full_moments(z: Tensor, min_var: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of rows ``z`` ``(N, ...)`` (flattened), float64: the maximum-likelihood
    Gaussian, its diagonal floored at ``min_var`` (and a relative ``1e-9`` so it factorizes)."""
    z = z.reshape(z.shape[0], -1).double()
    mean = z.mean(0)
    zc = z - mean
    cov = zc.mT @ zc / z.shape[0]
    floor = (min_var - cov.diagonal()).clamp_min(0) + 1e-9 * cov.diagonal().max().clamp_min(min_var)
    return mean, cov + torch.diag(floor)


def kinked(d: Tensor, slope: Tensor | float) -> Tensor:
    """:math:`g_s(d)`: negative coordinates divided by the slope ``s`` (see :class:`ConditionalFullNormal`).

    Computed as ``prelu(d, 1/s)``: one pass, where ``torch.where(d < 0, d / s, d)`` takes three and
    is several times slower on CPU."""
    inv = 1.0 / slope
    weight = inv.reshape(1).to(d.dtype) if isinstance(inv, Tensor) else d.new_full((1,), inv)
    return torch.prelu(d, weight)


def minus_negatives(d: Tensor) -> Tensor:
    """``-n_-(d)``: minus the number of negative coordinates of each sample, in ``d``'s dtype.

    ``sign(min(d, 0))`` is -1 exactly where ``d < 0`` (0 at -0.0); summing it is several times
    faster on CPU than reducing the boolean mask ``d < 0``."""
    return sum_except_batch(torch.clamp(d, max=0).sign_())


def triangular_inverse(P: Tensor) -> Tensor:
    r"""Inverse of a lower-triangular matrix with nonzero diagonal, by matrix products only.

    With :math:`P = D(I + N)`, :math:`N` strictly lower (nilpotent, :math:`N^F = 0`),
    :math:`(I + N)^{-1} = \prod_{j<m} (I + (-N)^{2^j})` for :math:`2^m \ge F`, so
    :math:`P^{-1} = (I+N)^{-1} D^{-1}` takes :math:`2\lceil\log_2 F\rceil` products and no
    solver (it exports to ONNX).

    >>> P = torch.tensor([[2.0, 0.0], [1.0, 4.0]])
    >>> torch.allclose(triangular_inverse(P) @ P, torch.eye(2))
    True
    """
    F = P.shape[-1]
    diag = P.diagonal(dim1=-2, dim2=-1)
    N = torch.tril(P, -1) / diag[..., :, None]
    eye = torch.eye(F, dtype=P.dtype, device=P.device)
    inv, power, k = eye, -N, 1
    while k < F:
        inv = inv @ (eye + power) if k == 1 else (eye + power) @ inv
        power = power @ power
        k *= 2
    return inv / diag[..., None, :]


def color_rows(P: Tensor, eps: Tensor) -> Tensor:
    r""":math:`P^{-1}\varepsilon` for each row of ``eps`` (last dimension), :math:`P` lower triangular:
    a triangular solve, :math:`O(F^2)` per row; while traced for export (ONNX has no triangular
    solve) by products with :func:`triangular_inverse`.

    >>> P = torch.tensor([[2.0, 0.0], [1.0, 4.0]])
    >>> torch.allclose(P @ color_rows(P, torch.tensor([[1.0, 3.0]]))[0], torch.tensor([1.0, 3.0]))
    True
    """
    if _is_exporting() or torch.compiler.is_compiling():
        return nn.functional.linear(eps, triangular_inverse(P))
    flat = eps.reshape(-1, P.shape[-1])
    return torch.linalg.solve_triangular(P.mT, flat, upper=True, left=False).reshape(eps.shape)


#: Slopes :func:`flowconvert.calibrate` tries for the kink of a :class:`ConditionalFullNormal` (1: none).
KINK_SLOPES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
#: Full covariances (conditionals of dropped coordinates, the base) up to this many coordinates;
#: beyond it the Gaussian family stays diagonal (a ``k x k`` factor costs ``k^2`` per row).
FULL_COVARIANCE_MAX = 256


class ConditionalFullNormal(ConditionalDensity):
    r"""Linear Gaussian with a full covariance, on kinked coordinates:

    .. math:: u = g_s(d), \quad g_s(t) = \begin{cases} t & t \ge 0 \\ t/s & t < 0 \end{cases}, \qquad
              u \mid y \sim \mathcal N(Ay + c, (P^\top P)^{-1}),
              \qquad \log q(d\mid y) = \log\mathcal N(P(u - Ay - c); 0, I) + \log|\det P| - n_-(d)\log s,

    with :math:`n_-(d)` the number of negative coordinates. :math:`P` is the lower-triangular
    Cholesky factor of the precision, diagonal :math:`e^{-\lambda}` (``log_scale`` = :math:`\lambda`)
    and strictly lower part ``tril``. Unlike a diagonal Gaussian it captures the correlations of the
    dropped coordinates (a near-deterministic combination of them gets its small variance). The
    kink slope :math:`s` (buffer ``kink``, 1: no kink) undoes a leaky activation that produced the
    coordinates, whose negative side it compressed by :math:`s`: a Gaussian before the activation
    is a kinked one after it. Calibration fits :math:`A, c` by least squares and :math:`P` from the
    residual covariance, in closed form, for each slope of :data:`KINK_SLOPES`, and keeps the best
    held out. Starts as a standard normal independent of :math:`y`.

    With ``full=False`` :math:`P` is diagonal (no ``tril``; calibration keeps the residual
    variances): what the richer families use beyond :data:`FULL_COVARIANCE_MAX` coordinates, where
    a full factor would cost :math:`F^2` parameters and multiply-adds per row.

    >>> q = ConditionalFullNormal(2, 3)
    >>> q.log_prob(torch.zeros(5, 2), torch.randn(5, 3)).shape
    torch.Size([5])
    >>> q.set_kink(0.1)
    >>> d = torch.tensor([[-0.1, 1.0]])
    >>> torch.allclose(q.log_prob(d, torch.zeros(1, 3)), StandardNormal((2,)).log_prob(torch.tensor([[-1.0, 1.0]])) + math.log(10))
    True
    """

    def __init__(self, features: int, context_features: int, full: bool = True):
        super().__init__()
        _init_linear_gaussian(self, features, context_features)
        self.full = bool(full)
        self.tril = nn.Parameter(torch.zeros(self.features, self.features)) if self.full else None
        self.register_buffer("kink", torch.ones(()))

    def precision_factor(self) -> Tensor:
        """:math:`P`: lower triangular, ``exp(-log_scale)`` on the diagonal (kept between calls, see
        :func:`~flowconvert.core.weight_only`)."""
        keys = (self.tril, self.log_scale)
        return weight_only(self, "precision", keys, lambda: precision_factor(self.tril, self.log_scale))

    def precision_times(self, v: Tensor) -> Tensor:
        """:math:`Pv` for each row of ``v`` (last dimension; elementwise when :math:`P` is diagonal)."""
        if not self.full:
            return v * torch.exp(-self.log_scale)
        return nn.functional.linear(v, self.precision_factor())

    def set_kink(self, slope: float) -> None:
        """Set the kink slope :math:`s \\in (0, 1]`."""
        if not 0.0 < float(slope) <= 1.0:
            raise ValueError(f"the kink slope must be in (0, 1], got {slope}")
        with torch.no_grad():
            self.kink.fill_(float(slope))

    def warp(self, d: Tensor) -> Tensor:
        """:math:`g_s(d)`: negative coordinates divided by the slope."""
        return kinked(d, self.kink)

    def unwarp(self, u: Tensor) -> Tensor:
        """:math:`g_s^{-1}(u)`."""
        return torch.where(u < 0, u * self.kink, u)

    def warp_and_log_det(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`warp` and its log-determinant :math:`-n_-(d)\\log s` (summed over all but the batch dimension)."""
        return self._warp_and_log_det(d, 1.0 / self.kink, -torch.log(self.kink))

    @staticmethod
    def _warp_and_log_det(d: Tensor, inv_slope: Tensor, neg_log_slope: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.prelu(d, inv_slope.reshape(1))  # g_s(d) in one pass (see kinked)
        return u, minus_negatives(d) * -neg_log_slope

    def loc(self, y: Tensor) -> Tensor:
        """:math:`Ay + c`, the mean of the kinked coordinates :math:`u`."""
        return nn.functional.linear(y, self.weight, self.bias)

    def mean(self, y: Tensor) -> Tensor:
        """:math:`g_s^{-1}(Ay + c)`, the image of :math:`\\varepsilon = 0` (the conditional mean when :math:`s = 1`)."""
        return self.unwarp(self.loc(y))

    def _whitening(self) -> tuple[Tensor, ...]:
        r"""Weight-only parts of :meth:`log_prob`: :math:`P^\top`, :math:`-(PA)^\top`, :math:`-Pc`,
        minus the constant :math:`\sum\lambda + \frac F2\log 2\pi` of one row, :math:`1/s`,
        :math:`-\log s`, and whether there is a kink (:math:`s \ne 1`; always, while traced for export,
        where the slope is not a value)."""
        P = self.precision_factor()
        const = self.log_scale.sum() + 0.5 * LOG_2PI * self.features
        traced = _is_exporting() or torch.compiler.is_compiling()
        kinked = traced or bool(self.kink != 1)
        return P.mT, -(P @ self.weight).mT, -(P @ self.bias), -const, 1.0 / self.kink, -torch.log(self.kink), kinked

    def _parts(self) -> tuple[Tensor, ...]:
        keys = (self.tril, self.log_scale, self.weight, self.bias, self.kink)
        return weight_only(self, "whitening", keys, self._whitening)

    def affine_whitening(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        r"""Without a kink the whitened residual is affine in :math:`(d, y)`:
        :math:`r = d P^\top + y M + b` with :math:`M = -(PA)^\top`, :math:`b = -Pc`, and
        :math:`\log q = -\tfrac12\lVert r\rVert^2 - C` per row. Returns :math:`(P^\top, M, b, -C)`
        (kept weight-only parts), or None with a kink or while traced (the slope is not a value
        there). A layer that computes :math:`d` and :math:`y` linearly from its input composes these
        into one product (:class:`~flowconvert.linear.FlowLinear`)."""
        Pt, Mt, b, neg_const, _, _, kinked = self._parts()
        return None if kinked else (Pt, Mt, b, neg_const)

    def whiten(self, d: Tensor, y: Tensor) -> Tensor:
        r""":math:`P(g_s(d) - Ay - c) = P g_s(d) - (PA) y - Pc`, standard normal under the model."""
        return self._whiten_and_kink(d, y, self._parts())[0]

    def _whiten_and_kink(self, d: Tensor, y: Tensor, parts: tuple) -> tuple[Tensor, Tensor | None]:
        """:meth:`whiten` and the warp's log-determinant (None without a kink) from the cached parts."""
        Pt, Mt, b, _, inv_slope, neg_log_slope, kinked = parts
        u, log_det = self._warp_and_log_det(d, inv_slope, neg_log_slope) if kinked else (d, None)
        r = torch.addmm(b, u.reshape(-1, self.features), Pt)
        r = r.addmm_(y.reshape(-1, self.context_features), Mt).reshape(u.shape)
        return r, log_det

    def log_prob(self, d: Tensor, y: Tensor) -> Tensor:
        parts = self._parts()
        r, log_det = self._whiten_and_kink(d, y, parts)
        r = r.reshape(d.shape[0], -1)
        rows = d[0].numel() // self.features
        ll = torch.sub(parts[3] if rows == 1 else rows * parts[3], torch.linalg.vecdot(r, r), alpha=0.5)
        return ll if log_det is None else ll + log_det

    def color(self, eps: Tensor) -> Tensor:
        r""":math:`P^{-1}\varepsilon` (the inverse of :meth:`whiten` around the mean, before the kink)."""
        if not self.full:
            return eps * torch.exp(self.log_scale)
        return color_rows(self.precision_factor(), eps)

    def sample(self, y: Tensor, eps: Tensor | None = None) -> Tensor:
        mu = self.loc(y)
        if eps is None:
            eps = torch.randn_like(mu)
        return self.unwarp(mu + self.color(eps.reshape(mu.shape)))

    def linear_regressors(self) -> str:
        return "full-cov"

    def kink_slopes(self) -> tuple[float, ...]:
        """The slopes calibration tries (:data:`KINK_SLOPES`)."""
        return KINK_SLOPES

    def read_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, c, covariance)`` of the kinked coordinates, float64."""
        if not self.full:
            cov = torch.diag(torch.exp(2 * self.log_scale.detach().double()))
            return self.weight.detach().double(), self.bias.detach().double(), cov
        P = self.precision_factor().detach().double()
        Pinv = torch.linalg.solve_triangular(P, torch.eye(self.features, dtype=P.dtype), upper=False)
        return self.weight.detach().double(), self.bias.detach().double(), Pinv @ Pinv.mT

    @torch.no_grad()
    def write_linear(self, A, c, cov, context_mean=None, context_var=None, kink: float = 1.0) -> None:
        r"""Set :math:`A, c`, :math:`P = \operatorname{chol}(\Sigma)^{-1}` (``cov`` a matrix, or a vector of
        variances; diagonal :math:`P`: the variances alone) and the kink slope (the regression was on
        :math:`g_s(d)`)."""
        self.weight.copy_(A.to(self.weight.dtype))
        self.bias.copy_(c.to(self.bias.dtype))
        if not self.full:
            var = cov.diagonal() if cov.dim() == 2 else cov
            self.log_scale.copy_((0.5 * var.double().clamp_min(1e-12).log()).to(self.log_scale.dtype))
        else:
            write_precision(torch.diag(cov) if cov.dim() == 1 else cov, self.log_scale, self.tril)
        self.set_kink(kink)
        _set_context_scale(self, context_var)

    def natural_scales(self) -> dict[str, Tensor]:
        """As the diagonal family's; ``P``'s column ``k`` in units of one over the marginal deviation
        of the residual coordinate ``k`` (:func:`precision_tril_scales`)."""
        scales = _linear_scales(self)
        if self.full:
            scales["tril"] = precision_tril_scales(self.precision_factor())
        return scales


class FullNormal(BaseDensity):
    r"""Learnable Gaussian with a full covariance on an output of shape ``event_shape`` (flattened):
    :math:`z \sim \mathcal N(\mu, (P^\top P)^{-1})`, :math:`P` lower triangular (diagonal
    :math:`e^{-\lambda}`, ``log_scale`` = :math:`\lambda`, strictly lower part ``tril``):

    .. math:: \log p(z) = -\tfrac12\lVert P(z - \mu)\rVert^2 + \log|\det P| - \tfrac D2 \log 2\pi .

    Calibration sets :math:`\mu` and :math:`\Sigma` to the outputs' mean and covariance (closed
    form). The logits of a classifier are strongly correlated, which a diagonal base misses.

    >>> b = FullNormal((2,))
    >>> torch.allclose(b.log_prob(torch.ones(3, 2)), StandardNormal((2,)).log_prob(torch.ones(3, 2)))
    True
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        D = math.prod(self.event_shape)
        self.loc = nn.Parameter(torch.zeros(self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(D))
        self.tril = nn.Parameter(torch.zeros(D, D))

    def precision_factor(self) -> Tensor:
        return precision_factor(self.tril, self.log_scale)

    def log_prob(self, z: Tensor) -> Tensor:
        r = nn.functional.linear((z - self.loc).reshape(z.shape[0], -1), self.precision_factor())
        return -0.5 * (r * r).sum(1) - self.log_scale.sum() - 0.5 * LOG_2PI * r.shape[1]

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        D = self.log_scale.numel()
        eps = temperature * torch.randn(n, D, dtype=self.loc.dtype, device=self.loc.device)
        u = color_rows(self.precision_factor(), eps)
        return self.loc + u.reshape(n, *self.event_shape)

    def natural_scales(self) -> dict[str, Tensor]:
        sigma = self.log_scale.detach().exp()
        return {"loc": sigma.reshape(self.event_shape), "tril": precision_tril_scales(self.precision_factor())}

    @torch.no_grad()
    def fit_closed_form(self, z: Tensor, min_var: float = 1e-6) -> bool:
        """``mu`` the mean, ``Sigma`` the covariance (its diagonal floored at ``min_var``)."""
        if z.shape[0] < 2:
            return False
        mean, cov = full_moments(z, min_var)
        self.loc.copy_(mean.reshape(self.event_shape).to(self.loc.dtype))
        write_precision(cov, self.log_scale, self.tril)
        return True


class ElementwiseConditionalNormal(ConditionalNormal):
    r""":math:`q(d \mid y) = \mathcal N(\alpha \odot y + \beta, \operatorname{diag} e^{2\lambda})` for rows of ``features`` coordinates.

    Each dropped coordinate depends on the kept coordinate at the same position (the funnel of
    ``a + b``); ``context_features == features``. Starts as a standard normal independent of :math:`y`.

    >>> q = ElementwiseConditionalNormal(3)
    >>> q.log_prob(torch.zeros(4, 2, 3), torch.randn(4, 2, 3)).shape
    torch.Size([4])
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = self.context_features = int(features)
        self.weight = nn.Parameter(torch.zeros(self.features))
        self.bias = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))

    def mean(self, y: Tensor) -> Tensor:
        return self.weight * y + self.bias

    def linear_regressors(self) -> Tensor:
        return torch.arange(self.features)

    def read_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        return _read(self)

    def write_linear(self, A, c, var, context_mean=None, context_var=None) -> None:
        _write(self, A, c, var)


class GaussianNoise(Configurable, nn.Module):
    r"""Augmentation noise :math:`u \sim \mathcal N(0, \tau^2)` per coordinate, ``log_scale`` = :math:`\log\tau` learnable.

    ``features`` is the size of the last dimension; ``log_scale`` has that shape (or is a
    scalar when ``shared=True``).

    >>> noise = GaussianNoise(3)
    >>> eps = torch.randn(4, 3)
    >>> torch.allclose(noise.log_prob(noise.scale(eps)), sum_except_batch(normal_log_prob(eps)))
    True
    """

    def __init__(self, features: int, shared: bool = False, init_log_scale: float = 0.0):
        super().__init__()
        self.features = int(features)
        shape = () if shared else (self.features,)
        self.log_scale = nn.Parameter(torch.full(shape, float(init_log_scale)))

    def scale(self, eps: Tensor) -> Tensor:
        """Turn standard-normal draws into noise: ``u = tau * eps``."""
        return eps * self.log_scale.exp()

    def log_prob(self, u: Tensor) -> Tensor:
        return sum_except_batch(normal_log_prob(u, 0.0, self.log_scale))


class HalfNormal(Configurable, nn.Module):
    r"""Half-normal density of non-negative gaps :math:`g = s\,|\varepsilon|` with a learnable
    per-channel scale (``log_scale`` = :math:`\log s`, shape ``(channels,)``):

    .. math:: \log q(g) = \log 2 + \log\mathcal N(g; 0, s^2), \quad g \ge 0 .

    Its maximum-likelihood scale is closed form, :math:`s^2 = \overline{g^2}` per channel.

    >>> h = HalfNormal(2)
    >>> h.log_prob(torch.zeros(3, 2)).shape
    torch.Size([3])
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        self.log_scale = nn.Parameter(torch.zeros(self.channels))

    def log_prob(self, g: Tensor) -> Tensor:
        """``g`` of shape ``(B, ..., channels)``: summed over all but the batch dimension."""
        return sum_except_batch(math.log(2.0) + normal_log_prob(g, 0.0, self.log_scale))

    def sample(self, eps: Tensor) -> Tensor:
        """``s |eps|`` for standard-normal ``eps`` of shape ``(..., channels)``."""
        return eps.abs() * self.log_scale.exp()
