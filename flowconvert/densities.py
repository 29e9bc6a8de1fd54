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
from typing import Sequence

import torch
from torch import Tensor, nn

from .config import Configurable

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
    "ElementwiseConditionalNormal",
    "GaussianNoise",
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
        self.features = int(features)
        self.context_features = int(context_features)
        self.weight = nn.Parameter(torch.zeros(self.features, self.context_features))
        self.bias = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))

    def mean(self, y: Tensor) -> Tensor:
        """Conditional mean :math:`A y + c` over the last dimension."""
        return nn.functional.linear(y, self.weight, self.bias)


class ElementwiseConditionalNormal(ConditionalNormal):
    r""":math:`q(d \mid y) = \mathcal N(\alpha \odot y + \beta, \operatorname{diag} e^{2\lambda})`, parameters of shape ``event_shape``.

    Each dropped coordinate depends on the kept coordinate at the same position (the
    funnel of ``a + b``). Starts as a standard normal independent of :math:`y`.

    >>> q = ElementwiseConditionalNormal((2, 3))
    >>> q.log_prob(torch.zeros(4, 2, 3), torch.randn(4, 2, 3)).shape
    torch.Size([4])
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.weight = nn.Parameter(torch.zeros(self.event_shape))
        self.bias = nn.Parameter(torch.zeros(self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def mean(self, y: Tensor) -> Tensor:
        return self.weight * y + self.bias


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
