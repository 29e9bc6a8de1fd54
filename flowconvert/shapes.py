"""Parameter-free bijections: reshapes, permutations and the identity (``L = 0``).

``flatten``, ``view``, ``reshape``, ``squeeze`` and ``unsqueeze`` all keep the row-major
order of the elements, so each is a :class:`Reshape` between two per-sample shapes.
``permute`` and ``transpose`` are a :class:`Permute`. ``contiguous``, ``nn.Identity`` and
``Dropout`` in eval mode are :class:`FlowIdentity`. The batch dimension is never touched.

>>> import torch
>>> r = Reshape((2, 3), (6,))
>>> y, ll = r.call_and_ll(torch.ones(4, 2, 3))
>>> y.shape, ll
(torch.Size([4, 6]), tensor([0., 0., 0., 0.]))
>>> r.inverse(y).shape
torch.Size([4, 2, 3])
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from .core import FlowLayer, zero_ll

__all__ = ["Reshape", "Permute", "FlowIdentity"]


class Reshape(FlowLayer):
    """Reshape each sample from ``in_shape`` to ``out_shape`` (same number of elements)."""

    exact = True

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(f"cannot reshape {self.in_shape} into {self.out_shape}")

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward(x), zero_ll(x)

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return y.reshape(y.shape[0], *self.in_shape)

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}"


class Permute(FlowLayer):
    """Permute the per-sample dimensions: ``dims`` indexes the full tensor and keeps ``dims[0] == 0``.

    >>> import torch
    >>> p = Permute((0, 2, 1))
    >>> x = torch.randn(2, 3, 4)
    >>> torch.equal(p.inverse(p(x)), x)
    True
    """

    exact = True

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if sorted(dims) != list(range(len(dims))) or dims[0] != 0:
            raise ValueError(f"Permute needs a permutation that keeps the batch dimension first, got {dims}")
        self.dims = dims
        self.inverse_dims = tuple(sorted(range(len(dims)), key=dims.__getitem__))

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(self.dims)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward(x), zero_ll(x)

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return y.permute(self.inverse_dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class FlowIdentity(FlowLayer):
    """The identity (``contiguous``, ``nn.Identity``, ``Dropout`` in eval mode)."""

    exact = True

    def forward(self, x: Tensor) -> Tensor:
        return x

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x, zero_ll(x)

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return y
