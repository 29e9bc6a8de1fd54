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

from .core import FlowLayer
from .densities import sum_except_batch
from .errors import LayerConfigurationError

__all__ = ["FlowLeakyReLU"]


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
        # -sign(min(x, 0)) is 1 exactly where x < 0; several times faster on CPU than
        # reducing the boolean mask (x < 0), and it stays in x's dtype
        minus_negative = sum_except_batch(torch.clamp(x, max=0).sign_())
        return F.leaky_relu(x, self.negative_slope), minus_negative * -self.log_slope

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return torch.where(y >= 0, y, y / self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:g}, exact=True"
