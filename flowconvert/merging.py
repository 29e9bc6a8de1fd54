r"""Layers with several inputs or outputs, for graph structure: fan-out, sums, concatenation, splits.

A flow must consume every value exactly once (docs/mathematics.md section 10), so a network whose values fan
out (residual connections) or merge (``a + b``, ``torch.cat``) needs explicit layers for it.
These layers extend the contract of :mod:`flowconvert.core`: a layer with several inputs
takes them positionally, ``call_and_ll(*xs, noise=None)``, and its ``inverse`` returns a
tuple; a layer with several outputs returns a tuple as ``y`` and its ``inverse`` takes the
outputs positionally. ``num_inputs`` / ``num_outputs`` say which.

**Duplicate (fan-out, bound).** :math:`N` copies of :math:`x \in \mathbb R^D`. The inverse is
a weighted mean :math:`x = \sum_j a_j c_j` of the copies (weights :math:`a_j \ge 0`,
:math:`\sum_j a_j = 1`; uniform by default), and the noise that makes the copies distinct lies
in the complement of :math:`a`: per coordinate :math:`c = \mathbf 1 x + \sqrt N B^\top v`,
:math:`B` the :math:`(N-1) \times N` orthonormal rows orthogonal to :math:`a` (the Helmert rows
for uniform weights) and :math:`v \sim \mathcal N(0, \tau^2 I_{N-1})`. Since
:math:`\mathbf 1 = a/|a|^2 + B^\top B\mathbf 1`, :math:`|\det[\mathbf 1, \sqrt N B^\top]| =
N^{(N-1)/2} / |a|` (:math:`N^{N/2}` for uniform weights), so

.. math:: L = D\,\bigl(\tfrac{N-1}2 \log N - \log|a|\bigr) - \log q(v),

a one-sample lower bound (exact marginal when averaged in the importance-weighted sense).
Deterministic mode (:math:`v = 0`) returns :math:`N` exact copies. Inverse:
:math:`a^\top c`, which removes the noise exactly (:math:`a^\top B^\top = 0`). Copies of
weight zero are not read, so a copy whose own inverse path overflowed does not reach
:math:`x`. The conversion puts the weight on the copies with the shortest path to the
output (the identity of a residual connection: a branch's inverse amplifies what it samples,
layer after layer, see :func:`flowconvert.analysis.inverse_weights`).

**Sum (funnel, exact).** :math:`y = a + b` is the reducing linear map :math:`[I\;I]`. With
the dropped coordinates :math:`d = (a - b)/\sqrt 2`, the map :math:`(a, b) \mapsto (y, d)`
has :math:`|\det| = \sqrt 2` per coordinate, so

.. math:: L = \tfrac D2 \log 2 + \log q(d \mid y),

with :math:`q(d\mid y) = \mathcal N(\alpha \odot y + \beta, \operatorname{diag}\sigma^2)`
elementwise. The density works on *rows*: a value of shape ``(D,)`` is one row of ``D``
coordinates; a value of shape ``(C, *spatial)`` has one row of ``C`` channels per location
(parameters shared over locations, as for a convolution), so any conditional family
(:mod:`flowconvert.families`) can replace it. Inverse: :math:`a = (y + \sqrt2 d)/2`,
:math:`b = (y - \sqrt2 d)/2`. ``a - b`` is the same with :math:`b \to -b`.

**Cat / Split (bijections, L = 0).** ``torch.cat`` along a non-batch dimension and
``torch.split`` / ``torch.chunk`` only move values.

>>> import torch
>>> dup = FlowDuplicate(2)
>>> (c1, c2), ll = dup.call_and_ll(torch.ones(3, 4))
>>> torch.equal(c1, c2), ll.shape
(True, torch.Size([3]))
>>> s = FlowSum((4,))
>>> y, ll = s.call_and_ll(c1, c2)
>>> a, b = s.inverse(y)
>>> torch.allclose(a + b, y)
True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .core import DensityPart, FlowLayer, zero_ll
from .densities import ElementwiseConditionalNormal, GaussianNoise
from .errors import LayerConfigurationError
from .pooling import helmert

__all__ = ["FlowDuplicate", "FlowSum", "FlowCat", "FlowSplit"]

LOG2 = math.log(2.0)


def _unpack(values: tuple) -> tuple:
    if len(values) == 1 and isinstance(values[0], (tuple, list)):
        return tuple(values[0])
    return values


def _inverse_weights(weights: Sequence[float] | None, n: int) -> Tensor:
    """The weights as a float64 vector that sums to one (uniform when None); checked."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    a = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
    if a.shape != (n,) or not torch.isfinite(a).all() or (a < 0).any() or a.sum() <= 0:
        raise LayerConfigurationError(
            f"FlowDuplicate weights must be {n} finite non-negative numbers with a positive sum, got {tuple(weights)}"
        )
    return a / a.sum()


def _complement(a: Tensor) -> Tensor:
    """``(N-1, N)`` orthonormal rows orthogonal to ``a`` (float64), from a complete QR of ``[a, I]``."""
    n = a.numel()
    q, _ = torch.linalg.qr(torch.cat([a[:, None], torch.eye(n, dtype=a.dtype)], 1), mode="complete")
    return q[:, 1:].T.contiguous()


class FlowDuplicate(FlowLayer):
    """Fan-out: ``num_copies`` copies of a value, made distinct by noise orthogonal to the inverse's weights (bound).

    Args:
        num_copies: ``N >= 2``.
        event_shape: per-sample shape of the value (optional, for :meth:`noise_shape` without an input).
        noise_log_scale: initial ``log tau``.
        weights: the inverse's weight on each copy (non-negative, normalised to sum to one;
            default uniform, the mean). The copies' noise is orthogonal to them.

    Attributes:
        noise: :class:`~flowconvert.densities.GaussianNoise` of ``v`` (one shared ``log tau``).
    """

    exact = False
    num_inputs = 1

    def __init__(
        self,
        num_copies: int,
        event_shape: Sequence[int] | None = None,
        noise_log_scale: float = 0.0,
        weights: Sequence[float] | None = None,
    ):
        super().__init__()
        n = int(num_copies)
        if n < 2:
            raise ValueError(f"FlowDuplicate needs at least 2 copies, got {n}")
        self.num_copies = self.num_outputs = n
        self.event_shape = tuple(int(s) for s in event_shape) if event_shape is not None else None
        self.noise = GaussianNoise(n - 1, shared=True, init_log_scale=noise_log_scale)
        a = _inverse_weights(weights, n)
        #: the inverse's weight on each copy (sums to one); uniform: the mean
        self.weights = tuple(a.tolist())
        self._uniform = weights is None or bool(torch.all(a == a[0]))
        # float64 master copy of the noise basis B (rows orthonormal, orthogonal to a), cast on use
        self._basis = helmert(n) if self._uniform else _complement(a)
        self._used = tuple(j for j in range(n) if a[j] > 0)
        self.log_gain = 0.5 * (n - 1) * math.log(n) - math.log(a.norm().item())  # log|det| per coordinate

    def noise_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return (*input_shape, self.num_copies - 1)

    def density_parts(self) -> tuple[DensityPart, ...]:
        return (DensityPart("noise", "noise", self.num_copies - 1),)

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, None]]:
        """The signal the copies' noise is added to: one row per sample."""
        return {"noise": (x.detach().reshape(x.shape[0], -1), None)}

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) * self.num_copies

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[tuple[Tensor, ...], Tensor]:
        n, D = self.num_copies, x[0].numel()
        if noise is None:
            v0 = x.new_zeros(1, n - 1)
            logq0 = self.noise.log_prob(v0)  # log q(0) per coordinate
            return (x,) * n, D * (self.log_gain - logq0).expand(x.shape[0])
        v = self.noise.scale(noise)
        w = v @ self._basis.to(dtype=x.dtype, device=x.device)  # (B, *event, N), orthogonal to the weights
        copies = tuple(x + math.sqrt(n) * w[..., j] for j in range(n))
        return copies, D * self.log_gain - self.noise.log_prob(v)

    def inverse(self, *ys: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        ys = _unpack(ys)
        if len(ys) != self.num_copies:
            raise ValueError(f"FlowDuplicate.inverse needs {self.num_copies} copies, got {len(ys)}")
        if self._uniform:
            return torch.stack(ys).mean(0)
        if len(self._used) == 1:
            return ys[self._used[0]]
        return sum(self.weights[j] * ys[j] for j in self._used)

    def extra_repr(self) -> str:
        weights = "" if self._uniform else f", weights={tuple(round(w, 4) for w in self.weights)}"
        return f"num_copies={self.num_copies}{weights}, exact=False"


class FlowSum(FlowLayer):
    """``a + b`` (or ``a - b`` with ``subtract=True``) of two data values of shape ``event_shape``: an exact funnel.

    Attributes:
        dropped: :class:`ElementwiseConditionalNormal` of ``d = (a -/+ b) / sqrt(2)`` given the sum.
    """

    exact = True
    num_inputs = 2
    num_outputs = 1

    def __init__(self, event_shape: Sequence[int], subtract: bool = False):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.subtract = bool(subtract)
        self.row_features = self.event_shape[0] if self.event_shape else 1
        self.dropped = ElementwiseConditionalNormal(self.row_features)

    def density_parts(self) -> tuple[DensityPart, ...]:
        return (DensityPart("dropped", "conditional", self.row_features, self.row_features),)

    def to_rows(self, t: Tensor) -> Tensor:
        """``(B, *event_shape) -> (B, L, F)``: one row per location (channels first) or one per sample."""
        B = t.shape[0]
        if len(self.event_shape) <= 1:
            return t.reshape(B, 1, self.row_features)
        return t.reshape(B, self.row_features, -1).transpose(1, 2)

    def from_rows(self, r: Tensor) -> Tensor:
        """Inverse of :meth:`to_rows`."""
        B = r.shape[0]
        if len(self.event_shape) <= 1:
            return r.reshape(B, *self.event_shape)
        return r.transpose(1, 2).reshape(B, *self.event_shape)

    def observe(self, a: Tensor, b: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        with torch.no_grad():
            d, y = self.to_rows(self.dropped_coordinates(a, b)), self.to_rows(self.forward(a, b))
        return {"dropped": (d.reshape(-1, self.row_features), y.reshape(-1, self.row_features))}

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b if self.subtract else a + b

    def draw_noise(self, *xs: Tensor) -> None:
        return None

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(output_shape)

    def dropped_coordinates(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b if self.subtract else a - b) * (1 / math.sqrt(2.0))

    def _check(self, a: Tensor, b: Tensor) -> None:
        if a.shape != b.shape or tuple(a.shape[1:]) != self.event_shape:
            raise ValueError(
                f"FlowSum of values of shapes {tuple(a.shape)} and {tuple(b.shape)} (expected {self.event_shape} per "
                f"sample for both); broadcasting sums are not supported"
            )

    def call_and_ll(self, a: Tensor, b: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(a, b)
        y = self.forward(a, b)
        D = a[0].numel()
        ll = 0.5 * D * LOG2 + self.dropped.log_prob(self.to_rows(self.dropped_coordinates(a, b)), self.to_rows(y))
        return y, ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        rows = self.to_rows(y)
        if sample:
            d = self.dropped.sample(rows, None if noise is None else self.to_rows(noise))
        else:
            d = self.dropped.mean(rows)
        d = self.from_rows(d)
        a = 0.5 * (y + math.sqrt(2.0) * d)
        b = 0.5 * (y - math.sqrt(2.0) * d)
        return (a, -b if self.subtract else b)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, op={'sub' if self.subtract else 'add'}, exact=True"


def _check_dim(dim: int) -> int:
    dim = int(dim)
    if dim == 0:
        raise LayerConfigurationError("torch.cat/split along dimension 0 (the batch)", code="FC215")
    return dim


class _AlongDim(FlowLayer):
    """Pieces of sizes ``sizes`` along the non-batch dimension ``dim``: a bijection, L = 0."""

    exact = True

    def __init__(self, dim: int, sizes: Sequence[int]):
        super().__init__()
        self.dim = _check_dim(dim)
        self.sizes = tuple(int(s) for s in sizes)

    def _check_batch(self, x: Tensor, what: str) -> None:
        if self.dim < 0 and x.dim() + self.dim == 0:
            raise LayerConfigurationError(f"{what} along the batch dimension", code="FC215")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sizes={self.sizes}, exact=True"


class FlowCat(_AlongDim):
    """``torch.cat(xs, dim)`` along a non-batch dimension (bijection, L = 0); inverse splits by ``sizes``."""

    num_outputs = 1

    def __init__(self, dim: int, sizes: Sequence[int]):
        super().__init__(dim, sizes)
        self.num_inputs = len(self.sizes)

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(_unpack(xs), self.dim)

    def draw_noise(self, *xs: Tensor) -> None:
        return None

    def call_and_ll(self, *xs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xs = _unpack(xs)
        self._check_batch(xs[0], "torch.cat")
        return self.forward(*xs), zero_ll(xs[0])

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        return tuple(torch.split(y, list(self.sizes), self.dim))


class FlowSplit(_AlongDim):
    """``torch.split(x, sizes, dim)`` / ``torch.chunk`` along a non-batch dimension (bijection, L = 0)."""

    num_inputs = 1

    def __init__(self, dim: int, sizes: Sequence[int]):
        super().__init__(dim, sizes)
        self.num_outputs = len(self.sizes)

    @classmethod
    def from_chunk(cls, dim: int, chunks: int, length: int) -> "FlowSplit":
        """The split that ``torch.chunk(x, chunks, dim)`` performs on a dimension of size ``length``."""
        return cls(dim, [t.numel() for t in torch.empty(int(length)).chunk(int(chunks))])

    @classmethod
    def from_split(cls, dim: int, split_size_or_sections, length: int) -> "FlowSplit":
        """The split that ``torch.split(x, split_size_or_sections, dim)`` performs on a dimension of size ``length``."""
        return cls(dim, [t.numel() for t in torch.empty(int(length)).split(split_size_or_sections)])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.split(x, list(self.sizes), self.dim))

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[tuple[Tensor, ...], Tensor]:
        self._check_batch(x, "torch.split")
        return self.forward(x), zero_ll(x)

    def inverse(self, *ys: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return torch.cat(_unpack(ys), self.dim)
