r"""Flowified elementwise activations.

LeakyReLU with slope :math:`a>0` is a bijection of each coordinate: :math:`f(x)=x` for
:math:`x\ge0` and :math:`ax` otherwise, so :math:`\log|f'(x)|` is 0 or :math:`\log a` and

.. math:: L = (\#\{i : x_i < 0\})\,\log a, \qquad f^{-1}(y) = y \text{ if } y\ge 0 \text{ else } y/a .

>>> import torch
>>> layer = FlowLeakyReLU(0.1)
>>> y, ll = layer.call_and_ll(torch.tensor([[-1.0, 2.0, -3.0]]))
>>> round(ll.item(), 4) == round(2 * math.log(0.1), 4)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import FlowLayer, weight_only
from .densities import sum_except_batch
from .errors import LayerConfigurationError

__all__ = ["FlowLeakyReLU", "FlowLeakyClamp"]


class FlowLeakyReLU(FlowLayer):
    """Flowified ``nn.LeakyReLU`` / ``F.leaky_relu`` with the model's own slope (exact)."""

    exact = True

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        slope = float(negative_slope)
        if not slope > 0 or not math.isfinite(slope):
            raise LayerConfigurationError(
                f"LeakyReLU negative_slope={slope:g} is not > 0, so the activation is not injective",
                code="FC202",
            )
        self.negative_slope = slope
        self.log_slope = math.log(slope)

    @classmethod
    def from_module(cls, module: nn.LeakyReLU) -> "FlowLeakyReLU":
        return cls(module.negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # sign(min(x, 0)) is -1 exactly where x < 0 (several times faster on CPU than reducing the
        # boolean mask x < 0, and in x's dtype); one product with a vector of -log s gives
        # n_-(x) log s per row (a sum and a multiplication cost two operations' overhead)
        signs = torch.clamp(x, max=0).sign_().reshape(x.shape[0], math.prod(x.shape[1:]))
        return F.leaky_relu(x, self.negative_slope), torch.mv(signs, self._minus_log_slopes(signs))

    def _minus_log_slopes(self, like: Tensor) -> Tensor:
        """``-log s`` for each of ``like``'s columns, in its dtype and device (kept per width, dtype
        and device by :func:`~flowconvert.core.weight_only`; made in the graph while traced)."""
        n = like.shape[1]
        name = f"minus_log_slopes {n} {like.dtype} {like.device}"
        return weight_only(self, name, (), lambda: like.new_full((n,), -self.log_slope))

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return torch.where(y >= 0, y, y / self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:g}, exact=True"


class FlowLeakyClamp(FlowLayer):
    r"""A leaky clamp: the invertible substitute of ReLU6, Hardtanh, Hardsigmoid and ``torch.clamp``.

    With the affine pre-map :math:`u = s x + c` (``scale``, ``shift``; Hardsigmoid is
    :math:`\operatorname{clamp}(x/6 + 1/2, 0, 1)`) and bounds :math:`l < h` (either may be absent),

    .. math:: f(x) = \begin{cases} l + a (u - l) & u < l \\ u & l \le u \le h \\ h + a (u - h) & u > h \end{cases}

    is strictly increasing for a slope :math:`a > 0`, with
    :math:`L = n \log|s| + (\#\text{outside}) \log a` (exact). Inside the bounds it equals
    the original clamp; outside it deviates by :math:`(1 - a)` times the distance to the bound.

    >>> layer = FlowLeakyClamp(0.0, 6.0, 0.01)
    >>> y, ll = layer.call_and_ll(torch.tensor([[-1.0, 3.0, 8.0]]))
    >>> y
    tensor([[-0.0100,  3.0000,  6.0200]])
    >>> torch.allclose(layer.inverse(y), torch.tensor([[-1.0, 3.0, 8.0]]))
    True
    """

    exact = True

    def __init__(
        self,
        low: float | None,
        high: float | None,
        negative_slope: float = 0.01,
        scale: float = 1.0,
        shift: float = 0.0,
    ):
        super().__init__()
        slope = float(negative_slope)
        if not slope > 0 or not math.isfinite(slope):
            raise LayerConfigurationError(f"leaky clamp slope={slope:g} is not > 0", code="FC202")
        if low is not None and high is not None and not float(low) < float(high):
            raise LayerConfigurationError(f"clamp bounds min={low} >= max={high}: a constant map", code="FC106")
        if not float(scale) != 0.0 or not math.isfinite(float(scale)):
            raise LayerConfigurationError(f"leaky clamp with scale {scale} is not invertible", code="FC106")
        self.low = None if low is None else float(low)
        self.high = None if high is None else float(high)
        self.negative_slope, self.log_slope = slope, math.log(slope)
        self.scale, self.shift = float(scale), float(shift)

    def _affine(self) -> bool:
        return (self.scale, self.shift) != (1.0, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.call_and_ll(x)[0]

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u = x * self.scale + self.shift if self._affine() else x
        ll = x.new_full((x.shape[0],), x[0].numel() * math.log(abs(self.scale)))
        if self.low is None and self.high is None:
            return u, ll
        # y = c + a (u - c) with c the clamp of u; u - c is nonzero exactly outside the bounds
        c = torch.clamp(u, min=self.low, max=self.high)
        d = u - c
        tracked = torch.is_grad_enabled() and u.requires_grad
        y = torch.add(c, d, alpha=self.negative_slope) if tracked else c.add_(d, alpha=self.negative_slope)
        outside = sum_except_batch(d.detach().sign_().abs_())  # d is saved by nothing: overwritten in place
        return y, ll + outside * self.log_slope

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        u, a = y, self.negative_slope
        if self.low is not None:
            u = torch.where(y < self.low, self.low + (y - self.low) / a, u)
        if self.high is not None:
            u = torch.where(y > self.high, self.high + (y - self.high) / a, u)
        return (u - self.shift) / self.scale if self._affine() else u

    def extra_repr(self) -> str:
        pre = f"scale={self.scale:g}, shift={self.shift:g}, " if self._affine() else ""
        return f"{pre}low={self.low}, high={self.high}, negative_slope={self.negative_slope:g}, exact=True"
