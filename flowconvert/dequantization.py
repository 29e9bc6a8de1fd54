r"""Uniform dequantization of K-level data and the bits-per-dimension scale.

A flow is a density on :math:`\mathbb R^D`; images are integers :math:`k\in\{0,\dots,K-1\}^D`.
**Convention (k/K):** level :math:`k` owns the cell :math:`[k/K, (k+1)/K)`, and a
dequantized point is

.. math:: x = \text{shift} + \text{scale}\cdot\frac{k + u}{K}, \qquad u \sim \mathcal U[0,1)^D .

The cells tile :math:`[0,1)` exactly, each of volume :math:`K^{-D}` before the affine map,
so by Jensen's inequality the discrete probability is bounded by

.. math:: \log P(k) \;\ge\; \mathbb E_u\big[\log p(x)\big] - D\log K + D\log|\text{scale}| ,

and bits per dimension are :math:`-\log P(k) / (D\ln 2)`. (The other common convention,
:math:`k/(K-1)`, maps the levels onto :math:`[0, 1]` including both ends; its cells have
width :math:`1/(K-1)` and stick out past 1, which is why it is not used here.) A model that
spreads its mass uniformly over the cube scores exactly :math:`\log_2 K` bits/dim.

>>> import torch
>>> deq = Dequantize(levels=17)
>>> k = torch.tensor([[0, 16]])
>>> x = deq(k, noise=torch.full((1, 2), 0.5))
>>> x
tensor([[0.0294, 0.9706]])
>>> round(deq.log_det(2), 4) == round(-2 * math.log(17), 4)
True
>>> round(nats_to_bits_per_dim(-(0.0 + deq.log_det(2)), 2), 4)   # uniform on [0,1)^2: log2(17)
4.0875
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["Dequantize", "nats_to_bits_per_dim", "DiscreteDataWarning", "warn_if_discrete"]


class Dequantize:
    """Uniform dequantization ``k -> shift + scale * (k + u) / levels`` (the k/K convention).

    Args:
        levels: number of levels ``K`` (17 for ``load_digits``, 256 for 8-bit images).
        scale, shift: an affine map applied after dividing by ``K`` (e.g. ``scale=2, shift=-1``
            for data in ``[-1, 1)``); its log-determinant is part of :meth:`log_det`.

    ``deq(k)`` draws ``u``; ``deq(k, noise=u)`` uses the given uniform draws and
    ``deq.center(k)`` uses ``u = 1/2`` (cell midpoints, for classifiers and pictures).
    """

    def __init__(self, levels: int, scale: float = 1.0, shift: float = 0.0):
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        if scale == 0:
            raise ValueError("scale must be nonzero")
        self.levels, self.scale, self.shift = int(levels), float(scale), float(shift)

    def __call__(self, k: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        k = k.to(torch.get_default_dtype()) if not k.is_floating_point() else k
        if noise is None:
            noise = torch.rand(k.shape, dtype=k.dtype, device=k.device, generator=generator)
        return self.shift + self.scale * (k + noise) / self.levels

    def center(self, k: Tensor) -> Tensor:
        """Cell midpoints (``u = 1/2``)."""
        k = k.to(torch.get_default_dtype()) if not k.is_floating_point() else k
        return self.shift + self.scale * (k + 0.5) / self.levels

    def quantize(self, x: Tensor) -> Tensor:
        """Inverse: the level whose cell contains ``x`` (clamped to ``0..K-1``), as a long tensor."""
        k = torch.floor((x - self.shift) / self.scale * self.levels)
        return k.clamp(0, self.levels - 1).long()

    def log_det(self, num_dims: int) -> float:
        r"""``D (log|scale| - log K)``: add to ``log p(x)`` to get the bound on ``log P(k)``."""
        return num_dims * (math.log(abs(self.scale)) - math.log(self.levels))

    def __repr__(self) -> str:
        return f"Dequantize(levels={self.levels}, scale={self.scale:g}, shift={self.shift:g})"


def nats_to_bits_per_dim(nll: Tensor | float, num_dims: int) -> Tensor | float:
    r"""Negative log-likelihood in nats (per sample) to bits per dimension: ``nll / (D ln 2)``.

    For dequantized data pass ``nll = -(log p(x) + deq.log_det(D))`` so the :math:`-D\log K`
    term is included; :func:`flowconvert.bits_per_dim` does this for a whole data set.
    """
    return nll / (num_dims * math.log(2.0))


class DiscreteDataWarning(UserWarning):
    """Data looks discrete but no dequantization was given (see :func:`warn_if_discrete`)."""


#: at most this many distinct values (all integers) make data look discrete
DISCRETE_MAX_LEVELS = 256


def _peek(data: Any, rows: int = 512) -> Tensor | None:
    """The first ``rows`` inputs of a tensor, tensors tuple, Dataset or DataLoader (no loader is iterated)."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        data = data[0]
    if isinstance(data, Tensor):
        return data[:rows]
    if isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(min(len(data), rows))]
        except Exception:  # noqa: BLE001 - an unusual dataset: no check
            return None
        items = [i[0] if isinstance(i, (tuple, list)) and i else i for i in items]
        if items and all(isinstance(i, Tensor) for i in items) and len({i.shape for i in items}) == 1:
            return torch.stack(items)
    return None


def warn_if_discrete(data: Any, dequantize: "Dequantize | None", where: str, *, stacklevel: int = 3) -> bool:
    """Warn (:class:`DiscreteDataWarning`) when ``data`` looks discrete and ``dequantize`` is None.

    Discrete means: the first examples hold only integers, 2 to 256 distinct values.
    A continuous density fitted to such data can pile its mass onto the levels and grow
    without bound (negative bits/dim); ``dequantize=Dequantize(K)`` spreads each level over
    its cell. Returns True when it warned. Called by ``fit``, ``calibrate`` and ``bits_per_dim``.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_if_discrete(torch.randint(0, 17, (50, 4)).float(), None, "fit")
    True
    >>> warn_if_discrete(torch.rand(50, 4), None, "fit")
    False
    """
    if dequantize is not None:
        return False
    x = _peek(data)
    if x is None or x.numel() == 0 or x.is_complex() or x.dtype == torch.bool:
        return False
    if x.is_floating_point() and (not bool(torch.isfinite(x).all()) or not bool((x == x.round()).all())):
        return False
    values = torch.unique(x)
    if not 2 <= len(values) <= DISCRETE_MAX_LEVELS:  # a constant says nothing about being discrete
        return False
    lo, hi = int(values.min().item()), int(values.max().item())
    levels = hi + 1 if lo >= 0 else None
    fix = (
        f"dequantize=fc.Dequantize({levels}) (--levels {levels} on the command line)"
        if levels and levels >= 2
        else "dequantize=fc.Dequantize(K) (--levels K on the command line) after mapping the values to 0..K-1"
    )
    warnings.warn(
        f"the data given to {where} looks discrete ({len(values)} distinct integer values, {lo}..{hi}, in the "
        f"first {len(x)} examples) and no dequantize= was given: a continuous density on discrete data can grow "
        f"without bound (negative bits/dim). Pass {fix}.",
        DiscreteDataWarning,
        stacklevel=stacklevel,
    )
    return True
