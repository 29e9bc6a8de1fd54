r"""Pooling over non-overlapping windows: average pooling (a funnel) and max pooling (a surjection).

Both layers need windows that tile the input: kernel == stride, no padding, no dilation, and
every spatial size divisible by the kernel. Each window holds :math:`K` values
:math:`x \in \mathbb R^K` of one channel (:math:`K = k_h k_w` in 2-D).

**Average pooling (exact).** :math:`y = \tfrac1D \sum_i x_i` (:math:`D = K`, or
``divisor_override``). Take the orthonormal basis of :math:`\mathbb R^K` made of
:math:`e_0 = \mathbf 1/\sqrt K` and the :math:`K-1` Helmert rows
:math:`h_j = (1, \dots, 1, -j, 0, \dots, 0)/\sqrt{j(j+1)}` (:math:`j` ones), which span the
complement of :math:`\mathbf 1` and need no SVD. Then
:math:`y = \tfrac{\sqrt K}{D}\langle e_0, x\rangle` and the dropped coordinates are
:math:`d = H x`. The map :math:`x \mapsto (y, d)` is linear with determinant
:math:`\sqrt K / D` (a rotation followed by a scaling of one axis), so per window

.. math:: L = \log\frac{\sqrt K}{D} + \log q(d \mid y) \qquad (= -\tfrac12\log K + \log q(d\mid y) \text{ for } D = K),

with :math:`q(d\mid y) = \mathcal N(a y + c, \operatorname{diag} \sigma^2)` and per-channel
parameters :math:`a, c, \log\sigma \in \mathbb R^{K-1}` (:class:`ChannelConditionalNormal`).
Inverse: :math:`x = \tfrac DK y\,\mathbf 1 + H^\top d`, so ``forward(inverse(y)) == y``.
Adaptive average pooling to an output size that divides the input size is the same map
(window size = input size / output size).

**Max pooling (exact, SurVAE max-pooling surjection).** :math:`y = \max_i x_i`. Given
:math:`y`, the input is described by the position :math:`i^*` of the maximum and the
non-negative gaps :math:`g_i = y - x_i` of the other :math:`K-1` values; the map
:math:`x \mapsto (y, i^*, g)` has unit Jacobian on each region where :math:`i^*` is fixed. With
:math:`i^*` uniform (probability :math:`1/K`) and each gap half-normal with a learnable
per-channel scale :math:`s`,

.. math:: L = -\log K + \sum_{i \ne i^*} \big(\log 2 + \log\mathcal N(g_i; 0, s^2)\big),

which is an exact density: summed over the :math:`K` regions it integrates to one. The
inverse puts :math:`y` at a position and :math:`y - g` elsewhere: sampled (position uniform,
from the argmax of :math:`K` standard normals; gaps :math:`s|\varepsilon|`), or with
``sample=False`` at the window's first position with the mean gap :math:`s\sqrt{2/\pi}`.

Overlapping, padded, ragged (``ceil_mode``) and adaptive pooling, and global pooling in any
spelling (``x.mean((2, 3))``, ``torch.sum``, ``x.amax``), are :class:`FlowWindowPool` and
:class:`FlowReduce` below: exact when no input cell is in two windows, a bound (Tile with
zero-sum noise) otherwise; :func:`pooling_layer` picks the layer for a module.

>>> import torch
>>> pool = FlowAvgPool.from_module(torch.nn.AvgPool2d(2), (3, 4, 4))
>>> x = torch.randn(5, 3, 4, 4)
>>> y, ll = pool.call_and_ll(x)
>>> torch.equal(y, torch.nn.functional.avg_pool2d(x, 2)), ll.shape
(True, torch.Size([5]))
>>> torch.allclose(pool(pool.inverse(y, sample=True)), y, atol=1e-6)
True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import DensityPart, FlowLayer
from .densities import (
    LOG_2PI,
    ConditionalNormal,
    GaussianNoise,
    HalfNormal,
    _read,
    _write,
    normal_log_prob,
    sum_except_batch,
)
from .errors import LayerConfigurationError

__all__ = [
    "FlowAvgPool",
    "FlowMaxPool",
    "FlowWindowPool",
    "FlowReduce",
    "ChannelConditionalNormal",
    "WindowConditionalNormal",
    "helmert",
    "helmert_apply",
    "helmert_adjoint",
    "pooling_layer",
]


def helmert(k: int, dtype=torch.float64) -> Tensor:
    r"""The ``(k-1, k)`` Helmert rows: an orthonormal basis of the complement of the ones-vector.

    >>> H = helmert(4)
    >>> torch.allclose(H @ H.T, torch.eye(3, dtype=H.dtype)), torch.allclose(H.sum(1), torch.zeros(3, dtype=H.dtype))
    (True, True)
    """
    H = torch.zeros(max(k - 1, 0), k, dtype=torch.float64)
    for j in range(1, k):
        H[j - 1, :j] = 1.0
        H[j - 1, j] = -float(j)
        H[j - 1] /= math.sqrt(j * (j + 1))
    return H.to(dtype)


def _ntuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(a) for a in v)
    return (int(v),) * n


def to_windows(x: Tensor, kernel: Sequence[int]) -> Tensor:
    """``(B, C, *spatial) -> (B, C, *out, K)`` for non-overlapping windows that tile the input."""
    B, C = x.shape[:2]
    if len(kernel) == 1:
        return x.reshape(B, C, x.shape[2] // kernel[0], kernel[0])
    (kh, kw), (H, W) = kernel, x.shape[2:]
    return x.reshape(B, C, H // kh, kh, W // kw, kw).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H // kh, W // kw, kh * kw)


def from_windows(w: Tensor, kernel: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_windows`."""
    B, C = w.shape[:2]
    if len(kernel) == 1:
        return w.reshape(B, C, -1)
    (kh, kw), (Ho, Wo) = kernel, w.shape[2:4]
    return w.reshape(B, C, Ho, Wo, kh, kw).permute(0, 1, 2, 4, 3, 5).reshape(B, C, Ho * kh, Wo * kw)


class ChannelConditionalNormal(ConditionalNormal):
    r"""Per-channel :math:`q(d_c \mid y_c) = \mathcal N(a_c y_c + b_c, \operatorname{diag}\sigma_c^2)` on rows of one location.

    A row holds the ``per_channel`` dropped values of each of ``channels`` channels
    (``features = channels * per_channel``, channel-major) given the ``channels`` kept values
    (``context_features = channels``). ``weight``, ``bias``, ``log_scale`` are
    ``(channels, per_channel)`` and start at 0 (a standard normal).

    >>> q = ChannelConditionalNormal(2, 3)
    >>> q.log_prob(torch.zeros(4, 5, 6), torch.randn(4, 5, 2)).shape
    torch.Size([4])
    """

    def __init__(self, channels: int, per_channel: int):
        super().__init__()
        self.channels, self.per_channel = int(channels), int(per_channel)
        self.features, self.context_features = self.channels * self.per_channel, self.channels
        self.weight = nn.Parameter(torch.zeros(self.channels, self.per_channel))
        self.bias = nn.Parameter(torch.zeros(self.channels, self.per_channel))
        self.log_scale = nn.Parameter(torch.zeros(self.channels, self.per_channel))

    def mean(self, y: Tensor) -> Tensor:
        return (y.unsqueeze(-1) * self.weight + self.bias).flatten(-2)

    def log_scale_for(self, y: Tensor) -> Tensor:
        return self.log_scale.reshape(-1)

    def linear_regressors(self) -> Tensor:
        return torch.arange(self.channels).repeat_interleave(self.per_channel)

    def read_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        return _read(self)

    def write_linear(self, A, c, var, context_mean=None, context_var=None) -> None:
        _write(self, A, c, var)


class _WindowPool(FlowLayer):
    """Shared configuration checks and shapes for pooling over tiling windows."""

    def __init__(self, in_shape: Sequence[int], kernel: Sequence[int]):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.kernel = tuple(int(k) for k in kernel)
        nd = len(self.kernel)
        if nd not in (1, 2) or len(self.in_shape) != nd + 1:
            raise LayerConfigurationError(
                f"{nd}-d pooling on per-sample shape {self.in_shape}: expected (C, *{nd} spatial sizes)", code="FC214"
            )
        spatial = self.in_shape[1:]
        if any(k < 1 or s % k for s, k in zip(spatial, self.kernel)):
            raise LayerConfigurationError(
                f"windows of size {self.kernel} do not tile the input of spatial size {spatial}", code="FC214"
            )
        self.channels = self.in_shape[0]
        self.out_spatial = tuple(s // k for s, k in zip(spatial, self.kernel))
        self.window = math.prod(self.kernel)
        self.num_windows = math.prod(self.out_spatial)

    @staticmethod
    def _check(kernel, stride, padding, dilation=1, name="pooling"):
        nd = len(kernel)
        stride = (
            kernel
            if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
            else _ntuple(stride, nd)
        )
        if stride != kernel:
            raise LayerConfigurationError(
                f"{name} with kernel {kernel} != stride {stride} (overlapping or gapped windows)", code="FC214"
            )
        if any(p != 0 for p in _ntuple(padding, nd)):
            raise LayerConfigurationError(f"{name} with padding {padding}", code="FC214")
        if any(d != 1 for d in _ntuple(dilation, nd)):
            raise LayerConfigurationError(f"{name} with dilation {dilation}", code="FC214")

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.out_spatial)


class FlowAvgPool(_WindowPool):
    """Average pooling over tiling windows (``AvgPool1d/2d``, ``AdaptiveAvgPool1d/2d``): an exact funnel.

    Args:
        in_shape: per-sample input shape ``(C, L)`` or ``(C, H, W)``.
        kernel: window size per spatial dimension (== stride).
        divisor: the divisor ``D`` of the window sum (default: the window size).
        adaptive: output size of the original adaptive pool (then ``forward`` calls it), or None.

    Attributes:
        dropped: :class:`ChannelConditionalNormal` of the ``K - 1`` dropped coordinates per window.
    """

    exact = True

    def __init__(
        self,
        in_shape: Sequence[int],
        kernel: Sequence[int],
        divisor: int | None = None,
        adaptive: Sequence[int] | None = None,
    ):
        super().__init__(in_shape, kernel)
        self.divisor = int(divisor) if divisor is not None else None
        if self.divisor is not None and self.divisor == 0:
            raise LayerConfigurationError("avg pooling with divisor_override=0", code="FC214")
        self.adaptive = tuple(adaptive) if adaptive is not None else None
        D = self.divisor or self.window
        self.log_gain = math.log(math.sqrt(self.window) / abs(D))  # log|det| per window
        # float64 master copy, cast on use: a module-level .to(dtype) must not round it
        self._helmert = helmert(self.window)
        self.dropped = ChannelConditionalNormal(self.channels, self.window - 1) if self.window > 1 else None

    @classmethod
    def from_module(cls, module: nn.Module, in_shape: Sequence[int]) -> "FlowAvgPool":
        in_shape = tuple(int(s) for s in in_shape)
        nd = len(in_shape) - 1
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            return cls.adaptive_from_size(in_shape, module.output_size)
        if not isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
            raise TypeError(f"FlowAvgPool cannot be built from {type(module).__name__}")
        kernel = _ntuple(module.kernel_size, nd)
        cls._check(kernel, module.stride, module.padding, name=type(module).__name__)
        return cls(in_shape, kernel, divisor=getattr(module, "divisor_override", None))

    @classmethod
    def adaptive_from_size(cls, in_shape: Sequence[int], output_size) -> "FlowAvgPool":
        """An adaptive average pool to ``output_size`` (ints or None per dimension)."""
        in_shape = tuple(int(s) for s in in_shape)
        spatial = in_shape[1:]
        out = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * len(spatial)
        if len(out) != len(spatial):
            raise LayerConfigurationError(f"adaptive pool output {output_size} for input {in_shape}", code="FC214")
        out = tuple(s if o is None else int(o) for s, o in zip(spatial, out))
        if any(o < 1 or s % o for s, o in zip(spatial, out)):
            raise LayerConfigurationError(
                f"adaptive pool from spatial size {spatial} to {out}: the output size must divide the input size "
                f"(otherwise the windows overlap or differ in size)",
                code="FC214",
            )
        return cls(in_shape, tuple(s // o for s, o in zip(spatial, out)), adaptive=out)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.kernel) == 1:
            if self.adaptive is not None:
                return F.adaptive_avg_pool1d(x, self.adaptive)
            return F.avg_pool1d(x, self.kernel, self.kernel)
        if self.adaptive is not None:
            return F.adaptive_avg_pool2d(x, self.adaptive)
        return F.avg_pool2d(x, self.kernel, self.kernel, divisor_override=self.divisor)

    def _H(self, like: Tensor) -> Tensor:
        return self._helmert.to(dtype=like.dtype, device=like.device)

    def dropped_coordinates(self, x: Tensor) -> Tensor:
        """``d = H x`` per window: ``(B, C, *out, K - 1)``."""
        return to_windows(x, self.kernel) @ self._H(x).mT

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...] | None:
        return (*output_shape, self.window - 1) if self.window > 1 else None

    # -- rows: one per output location, channels x dropped values ---------------------------------
    def output_rows(self, y: Tensor) -> Tensor:
        """``(B, C, *out) -> (B, L, C)``: the kept values at each output location."""
        return y.reshape(y.shape[0], self.channels, -1).transpose(1, 2)

    def dropped_rows(self, d: Tensor) -> Tensor:
        """``(B, C, *out, K - 1) -> (B, L, C (K - 1))``, channel-major within a row."""
        B, k = d.shape[0], self.window - 1
        return d.reshape(B, self.channels, -1, k).permute(0, 2, 1, 3).reshape(B, -1, self.channels * k)

    def _unrow(self, r: Tensor) -> Tensor:
        B, k = r.shape[0], self.window - 1
        return r.reshape(B, -1, self.channels, k).permute(0, 2, 1, 3).reshape(B, self.channels, *self.out_spatial, k)

    def density_parts(self) -> tuple[DensityPart, ...]:
        if self.window == 1:
            return ()
        return (DensityPart("dropped", "conditional", self.channels * (self.window - 1), self.channels),)

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        if self.window == 1:
            return {}
        with torch.no_grad():
            d, y = self.dropped_rows(self.dropped_coordinates(x)), self.output_rows(self.forward(x))
        return {"dropped": (d.reshape(-1, d.shape[-1]), y.reshape(-1, self.channels))}

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.forward(x)
        ll = x.new_full((x.shape[0],), self.channels * self.num_windows * self.log_gain)
        if self.window > 1:
            ll = ll + self.dropped.log_prob(self.dropped_rows(self.dropped_coordinates(x)), self.output_rows(y))
        return y, ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        D = self.divisor or self.window
        w = (y * (D / self.window)).unsqueeze(-1).expand(*y.shape, self.window)
        if self.window > 1:
            rows = self.output_rows(y)
            if sample:
                d = self.dropped.sample(rows, None if noise is None else self.dropped_rows(noise))
            else:
                d = self.dropped.mean(rows)
            w = w + self._unrow(d) @ self._H(y)
        return from_windows(w, self.kernel)

    def extra_repr(self) -> str:
        extra = f", adaptive={self.adaptive}" if self.adaptive is not None else ""
        return f"in_shape={self.in_shape}, kernel={self.kernel}{extra}, exact=True"


class FlowMaxPool(_WindowPool):
    """Max pooling over tiling windows (``MaxPool1d/2d``): the SurVAE max-pooling surjection (exact).

    Attributes:
        gaps: :class:`~flowconvert.densities.HalfNormal` of the gaps ``max - x_i``, one learnable
            scale per channel (``gap_log_scale`` is its ``log_scale``); a density part of kind
            ``"gaps"`` (rows: one gap per channel).
    """

    exact = True

    def __init__(self, in_shape: Sequence[int], kernel: Sequence[int]):
        super().__init__(in_shape, kernel)
        self.gaps = HalfNormal(self.channels)

    @property
    def gap_log_scale(self) -> nn.Parameter:
        return self.gaps.log_scale

    def density_parts(self) -> tuple[DensityPart, ...]:
        return (DensityPart("gaps", "gaps", self.channels),) if self.window > 1 else ()

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, None]]:
        """The ``K - 1`` gaps of every window (the maximum's zero gap left out), as rows ``(N, C)``."""
        if self.window == 1:
            return {}
        with torch.no_grad():
            gaps = self.forward(x).unsqueeze(-1) - to_windows(x, self.kernel)
            gaps = gaps.sort(-1, descending=True).values[..., : self.window - 1]  # drop one zero (the maximum)
            rows = gaps.reshape(x.shape[0], self.channels, -1).transpose(1, 2).reshape(-1, self.channels)
        return {"gaps": (rows, None)}

    @classmethod
    def from_module(cls, module: nn.Module, in_shape: Sequence[int]) -> "FlowMaxPool":
        in_shape = tuple(int(s) for s in in_shape)
        nd = len(in_shape) - 1
        if not isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            raise TypeError(f"FlowMaxPool cannot be built from {type(module).__name__}")
        if module.return_indices:
            raise LayerConfigurationError(f"{type(module).__name__} with return_indices=True", code="FC214")
        kernel = _ntuple(module.kernel_size, nd)
        cls._check(kernel, module.stride, module.padding, module.dilation, name=type(module).__name__)
        return cls(in_shape, kernel)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.kernel) == 1:
            return F.max_pool1d(x, self.kernel, self.kernel)
        return F.max_pool2d(x, self.kernel, self.kernel)

    def _log_scale_view(self, like: Tensor) -> Tensor:
        return self.gap_log_scale.reshape(self.channels, *([1] * (like.dim() - 2)))

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...] | None:
        return (*output_shape, 2, self.window)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.forward(x)
        if self.window == 1:
            return y, x.new_zeros(x.shape[0])
        gaps = y.unsqueeze(-1) - to_windows(x, self.kernel)  # >= 0, zero at the maximum
        log_s = self._log_scale_view(y).unsqueeze(-1)
        # sum over all K entries, then remove the argmax entry (gap 0) once per window
        per_entry = math.log(2.0) + normal_log_prob(gaps, 0.0, log_s)
        at_max = (math.log(2.0) - 0.5 * LOG_2PI - self.gap_log_scale).sum() * self.num_windows
        ll = sum_except_batch(per_entry) - at_max - self.channels * self.num_windows * math.log(self.window)
        return y, ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        K = self.window
        scale = self._log_scale_view(y).exp().unsqueeze(-1)
        if sample:
            if noise is None:
                noise = torch.randn(*y.shape, 2, K, dtype=y.dtype, device=y.device)
            position = noise[..., 0, :].argmax(-1, keepdim=True)
            gaps = noise[..., 1, :].abs() * scale
        else:
            position = torch.zeros(*y.shape, 1, dtype=torch.long, device=y.device)
            gaps = (scale * math.sqrt(2.0 / math.pi)).expand(*y.shape, K)
        gaps = gaps.scatter(-1, position, 0.0)
        return from_windows(y.unsqueeze(-1) - gaps, self.kernel)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, kernel={self.kernel}, exact=True"


# ---------------------------------------------------------------------------------------------
# Pooling as real networks use it: overlapping, padded, ragged (ceil_mode), adaptive and global
# ---------------------------------------------------------------------------------------------
def helmert_apply(t: Tensor) -> Tensor:
    r"""``t @ helmert(K).T`` in :math:`O(K)` with a cumulative sum: ``(..., K) -> (..., K-1)``.

    Row :math:`j` of the Helmert basis is :math:`(1,\dots,1,-j,0,\dots)/\sqrt{j(j+1)}`, so
    :math:`(Ht)_j = (\sum_{i<j} t_i - j\,t_j)/\sqrt{j(j+1)}`.

    >>> t = torch.randn(3, 5, dtype=torch.float64)
    >>> torch.allclose(helmert_apply(t), t @ helmert(5).T)
    True
    """
    K = t.shape[-1]
    if K <= 1:
        return t[..., :0]
    j = torch.arange(1, K, dtype=t.dtype, device=t.device)
    prefix = torch.cumsum(t, -1)[..., :-1]
    return (prefix - j * t[..., 1:]) * torch.rsqrt(j * (j + 1))


def helmert_adjoint(d: Tensor) -> Tensor:
    r"""``d @ helmert(K)`` in :math:`O(K)` (a reversed cumulative sum): ``(..., K-1) -> (..., K)``.

    With :math:`a_j = d_j/\sqrt{j(j+1)}` (:math:`a_0 = 0`), entry :math:`i` is
    :math:`\sum_{j\ge i} a_j - (i+1)\,a_i`.

    >>> d = torch.randn(3, 4, dtype=torch.float64)
    >>> torch.allclose(helmert_adjoint(d), d @ helmert(5))
    True
    """
    K = d.shape[-1] + 1
    j = torch.arange(1, K, dtype=d.dtype, device=d.device)
    a = torch.cat([torch.zeros_like(d[..., :1]), d * torch.rsqrt(j * (j + 1))], -1)
    tail = torch.flip(torch.cumsum(torch.flip(a, (-1,)), -1), (-1,))
    i = torch.arange(K, dtype=d.dtype, device=d.device)
    return tail - (i + 1) * a


class WindowConditionalNormal(ConditionalNormal):
    r"""Per-channel :math:`q(d \mid y) = \mathcal N(a_c y + b_c, \operatorname{diag}\sigma_c^2)` on window rows.

    ``d`` is ``(B, C, L, features)`` (``L`` windows per channel), ``y`` is ``(B, C, L, 1)``
    (the window's pooled value): the last dimensions are ``features`` and ``context = 1`` as
    for any :class:`~flowconvert.densities.ConditionalDensity`, and the channel is the
    second dimension. ``weight``, ``bias``, ``log_scale`` are ``(C, features)``, initially 0.
    """

    def __init__(self, channels: int, features: int):
        super().__init__()
        self.channels, self.features, self.context_features = int(channels), int(features), 1
        self.weight = nn.Parameter(torch.zeros(self.channels, self.features))
        self.bias = nn.Parameter(torch.zeros(self.channels, self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.channels, self.features))

    def mean(self, y: Tensor) -> Tensor:
        return y * self.weight[:, None, :] + self.bias[:, None, :]

    def log_scale_for(self, y: Tensor) -> Tensor:
        return self.log_scale[:, None, :]


def _dim_windows(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> list[list[int]]:
    """The input cells (padding removed) of each window along one dimension, as PyTorch places them."""
    span = dilation * (kernel - 1) + 1
    num = size + 2 * padding - span
    if num < 0:
        return []
    out = (num + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # the last window must start inside
        out -= 1
    cells = []
    for i in range(out):
        start = i * stride - padding
        cells.append([c for c in range(start, start + span, dilation) if 0 <= c < size])
    return cells


def _adaptive_windows(size: int, out: int) -> list[list[int]]:
    """Cells of each adaptive-pooling window: ``[floor(i n / m), ceil((i + 1) n / m))``."""
    return [list(range((i * size) // out, -((-(i + 1) * size) // out))) for i in range(out)]


class FlowWindowPool(FlowLayer):
    r"""Average or max pooling over any windows: overlapping, padded, ragged, adaptive or global.

    Every configuration of ``nn.MaxPool1d/2d``, ``nn.AvgPool1d/2d`` (``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``ceil_mode``, ``count_include_pad``, ``divisor_override``) and
    ``nn.AdaptiveAvgPool1d/2d`` / ``nn.AdaptiveMaxPool1d/2d`` (any output size) is one set
    :math:`S_o` of input cells per output location :math:`o`. Padding cells are *absent*:
    a zero pad adds nothing to an average (only the divisor :math:`D_o` counts it), and a
    :math:`-\infty` pad never wins a max. The layer is **Tile -> pool without overlap**:

    * **Tile** (as in :mod:`flowconvert.conv`): a cell in :math:`N_p > 1` windows is copied
      :math:`N_p` times, :math:`x_p + \sqrt{N_p}\,w_j` with zero-sum noise
      :math:`w \sim \mathcal N(0, \tau^2)` on the complement of the ones-vector (per-channel
      :math:`\tau`, :attr:`tile_noise`): :math:`L = \tfrac{N_p}2 \log N_p - \log q(w)`, a
      **bound**. Deterministic mode uses :math:`w = 0` (a point evaluation). Inverse: the mean
      of the copies. A cell in no window (:math:`N_p = 0`) is dropped, with the exact
      :math:`\log q(x_p \mid y)` of :attr:`dropped_pixels` (conditioned on the nearest output).
    * **Average** over the :math:`K_o = |S_o|` copies: :math:`y_o = \tfrac1{D_o}\sum t`, the
      Helmert coordinates :math:`d_o = H_{K_o} t` are dropped: :math:`L = \log\frac{\sqrt{K_o}}{D_o}
      + \log q(d_o \mid y_o)` (exact), one :class:`WindowConditionalNormal` per window size
      (:attr:`dropped`, keyed by ``str(K)``).
    * **Max**: the SurVAE max surjection per window (exact, as :class:`FlowMaxPool`), with
      per-channel half-normal gaps of scale :attr:`gap_log_scale`. The deterministic pass sums
      the gaps' squares through one window sum (:meth:`_max_by_sums`) instead of gathering every
      window, wherever a convolution has the same windows (no dilation, not adaptive).

    Without duplicated cells (windows that do not overlap, padded or ragged or not) the layer
    is exact. The deterministic output is the original PyTorch op, bit for bit.

    >>> pool = FlowWindowPool.from_module(torch.nn.MaxPool2d(3, 2, 1), (2, 6, 6))
    >>> x = torch.randn(4, 2, 6, 6)
    >>> y, ll = pool.call_and_ll(x)
    >>> torch.equal(y, torch.nn.functional.max_pool2d(x, 3, 2, 1)), pool.exact
    (True, False)
    >>> torch.equal(FlowWindowPool.from_module(torch.nn.MaxPool2d(2, 2, 1), (2, 6, 6)).call_and_ll(x)[0],
    ...             torch.nn.functional.max_pool2d(x, 2, 2, 1))
    True
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        mode: str,
        *,
        kernel: Sequence[int] = (),
        stride: Sequence[int] | None = None,
        padding: Sequence[int] | int = 0,
        dilation: Sequence[int] | int = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        adaptive: Sequence[int | None] | None = None,
    ):
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
        self.mode = mode
        self.in_shape = tuple(int(s) for s in in_shape)
        nd = len(self.in_shape) - 1
        if nd not in (1, 2):
            raise LayerConfigurationError(
                f"pooling on per-sample shape {self.in_shape}: expected (C, L) or (C, H, W)", code="FC214"
            )
        spatial = self.in_shape[1:]
        self.channels = self.in_shape[0]
        if adaptive is not None:
            out = tuple(adaptive) if isinstance(adaptive, (tuple, list)) else (adaptive,) * nd
            if len(out) == 1 and nd == 2:
                out = out * 2
            out = tuple(s if o is None else int(o) for s, o in zip(spatial, out))
            if len(out) != nd or any(o < 1 for o in out):
                raise LayerConfigurationError(
                    f"adaptive pool output {adaptive} for input {self.in_shape}", code="FC214"
                )
            self.config = dict(adaptive=out)
            per_dim = [_adaptive_windows(s, o) for s, o in zip(spatial, out)]
        else:
            kernel = _ntuple(kernel, nd)
            stride = (
                kernel
                if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
                else _ntuple(stride, nd)
            )
            padding, dilation = _ntuple(padding, nd), _ntuple(dilation, nd)
            if any(k < 1 for k in kernel) or any(s < 1 for s in stride) or any(d < 1 for d in dilation):
                raise LayerConfigurationError(
                    f"pooling with kernel {kernel}, stride {stride}, dilation {dilation}", code="FC214"
                )
            if any(2 * p > k for p, k in zip(padding, kernel)):
                raise LayerConfigurationError(
                    f"pooling with padding {padding} larger than half the kernel {kernel}", code="FC214"
                )
            if mode == "avg" and any(d != 1 for d in dilation):
                raise LayerConfigurationError("average pooling has no dilation", code="FC214")
            if divisor_override is not None and int(divisor_override) == 0:
                raise LayerConfigurationError("avg pooling with divisor_override=0", code="FC214")
            divisor = None if divisor_override is None else int(divisor_override)
            self.config = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation}
            self.config.update(ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad))
            self.config["divisor_override"] = divisor
            per_dim = [
                _dim_windows(s, k, st, p, d, bool(ceil_mode))
                for s, k, st, p, d in zip(spatial, kernel, stride, padding, dilation)
            ]
        if any(not w for w in per_dim) or any(not c for w in per_dim for c in w):
            raise LayerConfigurationError(
                f"pooling {self.config} leaves an empty window on input {self.in_shape}", code="FC214"
            )
        self.out_spatial = tuple(len(w) for w in per_dim)
        self.out_shape = (self.channels, *self.out_spatial)
        if nd == 1:
            windows = [cells for cells in per_dim[0]]
        else:
            W = spatial[1]
            windows = [[r * W + c for r in rows for c in cols] for rows in per_dim[0] for cols in per_dim[1]]
        S = math.prod(spatial)
        self.num_cells, self.num_locations = S, len(windows)

        # -- geometry, checked against PyTorch itself on a float64 probe -------------------------
        f64 = torch.float64
        probe = torch.randn(1, 1, *spatial, dtype=f64, generator=torch.Generator().manual_seed(0))
        ref = self._op(probe).reshape(-1)
        if ref.numel() != len(windows):
            raise LayerConfigurationError(
                f"pooling {self.config}: {ref.numel()} outputs, expected {len(windows)}", code="FC214"
            )
        flat = probe.reshape(-1)
        sizes = torch.tensor([len(w) for w in windows])
        if mode == "avg":
            divisor = sizes.to(f64) / self._op(torch.ones_like(probe)).reshape(-1)
            got = torch.stack([flat[w].sum() for w in windows]) / divisor
        else:
            divisor = torch.ones(len(windows), dtype=f64)
            got = torch.stack([flat[w].max() for w in windows])
        if not torch.allclose(got, ref, rtol=1e-9, atol=1e-12):
            raise LayerConfigurationError(
                f"pooling {self.config}: the window geometry does not match PyTorch", code="FC214"
            )

        cov = torch.zeros(S, dtype=f64)
        for w in windows:
            cov[w] += 1
        self.tiles = bool((cov > 1).any())
        used = cov >= 1
        self.tile_logdet = self.channels * float((0.5 * cov[used] * cov[used].log()).sum())
        self._tile_extra = int((cov[used] - 1).sum())
        self.register_buffer("_cov", cov, persistent=False)
        self.register_buffer(
            "_inv_cov", torch.where(used, 1.0 / cov.clamp_min(1), torch.zeros((), dtype=f64)), persistent=False
        )
        self.register_buffer("_sqrt_cov", cov.sqrt(), persistent=False)

        # -- windows grouped by size: one (L_g, K) gather each -------------------------------------
        self.group_sizes: tuple[int, ...] = tuple(sorted(set(sizes.tolist())))
        self.dropped = nn.ModuleDict()
        log_gain = 0.0
        all_idx = []
        for K in self.group_sizes:
            locs = torch.nonzero(sizes == K).reshape(-1)
            idx = torch.tensor([windows[o] for o in locs.tolist()], dtype=torch.long)
            self.register_buffer(f"_idx{K}", idx, persistent=False)
            self.register_buffer(f"_loc{K}", locs, persistent=False)
            self.register_buffer(f"_div{K}", divisor[locs], persistent=False)
            all_idx.append(idx.reshape(-1))
            if mode == "avg":
                log_gain += float((0.5 * math.log(K) - divisor[locs].abs().log()).sum())
                if K > 1:
                    self.dropped[str(K)] = WindowConditionalNormal(self.channels, K - 1)
        self.register_buffer("_all_idx", torch.cat(all_idx), persistent=False)
        self.log_gain = self.channels * log_gain
        self.num_copies = int(sizes.sum())
        if mode == "max":
            self.gap_log_scale = nn.Parameter(torch.zeros(self.channels))
        # max pooling's window sums by one depthwise convolution with a kernel of ones, where the
        # windows are a convolution's (no dilation, not adaptive): its zero padding adds nothing
        self._sum_pool = (
            mode == "max" and "adaptive" not in self.config and all(d == 1 for d in self.config["dilation"])
        )
        self._sum_extra: tuple[int, ...] = (0,) * nd
        if self._sum_pool:
            c = self.config
            # ceil_mode's last window can reach past the padding: the end is extended by what it needs
            self._sum_extra = tuple(
                max(0, (o - 1) * st + k - (n + 2 * p))
                for o, n, k, st, p in zip(self.out_spatial, spatial, c["kernel"], c["stride"], c["padding"])
            )
            self.register_buffer("_sum_kernel", torch.ones(self.channels, 1, *c["kernel"]), persistent=False)
            sums = torch.stack([flat[w].sum() for w in windows])
            try:
                got = self._window_sums(probe.expand(1, self.channels, *spatial))[0, 0].reshape(-1)
                self._sum_pool = got.shape == sums.shape and bool(torch.allclose(got, sums, rtol=1e-9, atol=1e-12))
            except RuntimeError:  # a geometry the convolution refuses: the windows are gathered instead
                self._sum_pool = False
        self.register_buffer("_sizes", sizes.to(f64), persistent=False)
        self._size_terms = (float((sizes - 1).sum()), float(sizes.to(f64).log().sum()))  # sum (K_o - 1), sum log K_o

        # -- cells no window reaches: dropped, conditioned on the output of the nearest window ------
        dropped_cells = torch.nonzero(~used).reshape(-1)
        self.n_dropped = int(dropped_cells.numel())
        self.tile_noise = GaussianNoise(self.channels) if self.tiles else None
        self.dropped_pixels = WindowConditionalNormal(self.channels, 1) if self.n_dropped else None
        if self.n_dropped:
            coords = lambda flat_index: (
                (flat_index // spatial[-1], flat_index % spatial[-1]) if nd == 2 else (0, flat_index)
            )
            centres = torch.tensor(
                [[sum(coords(c)[i] for c in w) / len(w) for i in (0, 1)] for w in windows], dtype=f64
            )
            cells = torch.tensor([coords(int(c)) for c in dropped_cells], dtype=f64)
            nearest = torch.cdist(cells, centres).argmin(1)
        else:
            nearest = torch.zeros(0, dtype=torch.long)
        self.register_buffer("_drop_idx", dropped_cells, persistent=False)
        self.register_buffer("_drop_loc", nearest, persistent=False)
        self.exact = not self.tiles

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, in_shape: Sequence[int]) -> "FlowWindowPool":
        """Build from a (possibly overlapping, padded or adaptive) 1-D / 2-D pooling module."""
        in_shape = tuple(int(s) for s in in_shape)
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            return cls(in_shape, "avg", adaptive=module.output_size)
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            if module.return_indices:
                raise LayerConfigurationError(f"{type(module).__name__} with return_indices=True", code="FC214")
            return cls(in_shape, "max", adaptive=module.output_size)
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            if getattr(module, "return_indices", False):
                raise LayerConfigurationError(f"{type(module).__name__} with return_indices=True", code="FC214")
            if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
                mode, extra = "max", {"dilation": module.dilation}
            else:
                divisor = getattr(module, "divisor_override", None)
                mode, extra = "avg", {"count_include_pad": module.count_include_pad, "divisor_override": divisor}
            window = {"kernel": module.kernel_size, "stride": module.stride, "padding": module.padding}
            return cls(in_shape, mode, **window, ceil_mode=module.ceil_mode, **extra)
        raise TypeError(f"FlowWindowPool cannot be built from {type(module).__name__}")

    # -- the original function --------------------------------------------------------------------
    def _op(self, x: Tensor) -> Tensor:
        c, nd = self.config, len(self.in_shape) - 1
        if "adaptive" in c:
            fn = {
                ("avg", 1): F.adaptive_avg_pool1d,
                ("avg", 2): F.adaptive_avg_pool2d,
                ("max", 1): F.adaptive_max_pool1d,
                ("max", 2): F.adaptive_max_pool2d,
            }[self.mode, nd]
            return fn(x, c["adaptive"] if nd == 2 else c["adaptive"][0])
        if self.mode == "max":
            fn = F.max_pool1d if nd == 1 else F.max_pool2d
            return fn(x, c["kernel"], c["stride"], c["padding"], c["dilation"], ceil_mode=c["ceil_mode"])
        if nd == 1:
            return F.avg_pool1d(x, c["kernel"], c["stride"], c["padding"], c["ceil_mode"], c["count_include_pad"])
        return F.avg_pool2d(
            x, c["kernel"], c["stride"], c["padding"], c["ceil_mode"], c["count_include_pad"], c["divisor_override"]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._op(x)

    def _window_sums(self, x: Tensor) -> Tensor:
        r""":math:`\sum_{j \in S_o} x_j` at every output location: a depthwise convolution with a kernel
        of ones (absent padding cells add 0; faster on CPU than an average pool times its divisor)."""
        c = self.config
        kernel = self._sum_kernel.to(x.dtype)
        extra = self._sum_extra
        if x.dim() == 3:
            if extra[0]:
                x = F.pad(x, (0, extra[0]))
            return F.conv1d(x, kernel, None, c["stride"], c["padding"], 1, self.channels)
        if extra[0] or extra[1]:
            x = F.pad(x, (0, extra[1], 0, extra[0]))
        return F.conv2d(x, kernel, None, c["stride"], c["padding"], 1, self.channels)

    # -- layout hooks (FlowReduce permutes the reduced dimensions last) ---------------------------------
    def _to_cells(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.channels, self.num_cells)

    def _from_cells(self, cells: Tensor) -> Tensor:
        return cells.reshape(cells.shape[0], *self.in_shape)

    def _to_locations(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], self.channels, self.num_locations)

    def _from_locations(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.out_shape)

    # -- noise and density parts ------------------------------------------------------------------------
    def noise_shape(self, input_shape: Sequence[int]) -> tuple[int, ...] | None:
        return (self.channels * self.num_copies,) if self.tiles else None

    def _inverse_sizes(self) -> list[int]:
        per_window = (lambda K: K - 1) if self.mode == "avg" else (lambda K: 2 * K)
        sizes = [self.channels * len(getattr(self, f"_loc{K}")) * per_window(K) for K in self.group_sizes]
        return sizes + [self.channels * self.n_dropped]

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...] | None:
        n = sum(self._inverse_sizes())
        return (n,) if n else None

    def density_parts(self) -> tuple[DensityPart, ...]:
        parts = [DensityPart(f"dropped.{key}", "conditional", q.features, 1) for key, q in self.dropped.items()]
        if self.dropped_pixels is not None:
            parts.append(DensityPart("dropped_pixels", "conditional", 1, 1))
        if self.tile_noise is not None:
            parts.append(DensityPart("tile_noise", "noise", self.channels))
        return tuple(parts)

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Rows per part: a window's Helmert coordinates ``(N, K-1)`` with its pooled value ``(N, 1)``
        (one row per sample, channel and window); dropped cells with the nearest output; for the
        tile noise the duplicated input values ``(N, C)`` (one row per sample and cell)."""
        with torch.no_grad():
            cells = self._to_cells(x)
            copies = self._copies(cells, None if noise is None else noise.reshape(x.shape[0], -1))[0]
            out: dict[str, tuple[Tensor, Tensor | None]] = {}
            y = self._to_locations(self.forward(x)) if noise is None else None
            for K, t in zip(self.group_sizes, copies):
                if str(K) in self.dropped:
                    yk = t.sum(-1) / self._buf("_div", K, t) if y is None else y[:, :, getattr(self, f"_loc{K}")]
                    out[f"dropped.{K}"] = (helmert_apply(t).reshape(-1, K - 1), yk.reshape(-1, 1))
            if self.dropped_pixels is not None:
                yy = self._to_locations(self.forward(x))
                out["dropped_pixels"] = (
                    cells[:, :, self._drop_idx].reshape(-1, 1),
                    yy[:, :, self._drop_loc].reshape(-1, 1),
                )
            if self.tile_noise is not None:
                dup = cells[:, :, self._cov > 1]
                out["tile_noise"] = (dup.transpose(1, 2).reshape(-1, self.channels), None)
        return out

    # -- the two stages -----------------------------------------------------------------------------------
    def _buf(self, name: str, K: int, like: Tensor) -> Tensor:
        return getattr(self, f"{name}{K}").to(dtype=like.dtype)

    def _copies(self, cells: Tensor, eps: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        """Tile: the window copies ``(B, C, L_K, K)`` per window size, and ``|w / tau|^2`` per sample.

        Copy ``j`` of cell ``p`` is ``x_p + sqrt(N_p) tau (eps_j - m_p)``, ``m_p`` the mean of the
        cell's draws, so the noise sums to zero over each cell's copies.
        """
        B, C = cells.shape[:2]
        if eps is None:
            src, sq = cells, None
        else:
            e = eps.reshape(B, C, self.num_copies)
            sums = cells.new_zeros(B, C, self.num_cells).index_add_(2, self._all_idx, e)
            mean = sums * self._inv_cov.to(cells.dtype)
            sq = sum_except_batch(e * e) - sum_except_batch(sums * mean)
            tau = self.tile_noise.log_scale.exp()[:, None]
            src = cells - self._sqrt_cov.to(cells.dtype) * tau * mean
            parts = e.split([len(getattr(self, f"_loc{K}")) * K for K in self.group_sizes], -1)
        copies = []
        for g, K in enumerate(self.group_sizes):
            idx = getattr(self, f"_idx{K}")
            t = src[:, :, idx.reshape(-1)].reshape(B, C, *idx.shape)
            if eps is not None:
                scale = self._sqrt_cov.to(cells.dtype)[idx] * tau[:, :, None]
                t = t + parts[g].reshape(B, C, *idx.shape) * scale
            copies.append(t)
        return copies, sq

    def _pool(self, copies: list[Tensor], y_locations: Tensor | None) -> tuple[Tensor, Tensor]:
        """Pool each window's copies without overlap: ``(y at every location, ll)``."""
        B, C = copies[0].shape[:2]
        y = y_locations
        if y is None:
            y = copies[0].new_zeros(B, C, self.num_locations)
            for K, t in zip(self.group_sizes, copies):
                yk = t.sum(-1) / self._buf("_div", K, t) if self.mode == "avg" else t.amax(-1)
                y = y.index_copy(2, getattr(self, f"_loc{K}"), yk)
        ll = copies[0].new_zeros(B)
        for K, t in zip(self.group_sizes, copies):
            if K == 1:
                continue
            yk = y[:, :, getattr(self, f"_loc{K}")]
            if self.mode == "avg":
                ll = ll + self.dropped[str(K)].log_prob(helmert_apply(t), yk.unsqueeze(-1))
            else:
                log_s = self.gap_log_scale[:, None, None]
                per_entry = math.log(2.0) + normal_log_prob(yk.unsqueeze(-1) - t, 0.0, log_s)
                at_max = (math.log(2.0) - 0.5 * LOG_2PI - self.gap_log_scale).sum() * yk.shape[-1]
                ll = ll + sum_except_batch(per_entry) - at_max - C * yk.shape[-1] * math.log(K)
        return y, ll

    def _max_by_sums(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Deterministic max pooling's ``(y at every location, ll)`` without gathering the windows.

        The gaps' log-density needs :math:`Q_c = \sum_o \sum_{j \in S_o} (y_o - x_j)^2
        = \sum_o (K_o y_o - 2 S_o) y_o + \sum_j N_j x_j^2` with the window sums :math:`S_o` of
        :math:`x` (:meth:`_window_sums`) and the number :math:`N_j` of windows that hold cell
        :math:`j` (each square is counted once per window), all centred on each channel's mean output
        so that nothing cancels at the values' magnitude. With
        :math:`\sum_o (K_o - 1)` gaps of scale :math:`s_c` and :math:`\sum_o \log K_o` choices of
        position, as :meth:`_pool` sums entry by entry:

        .. math:: L = \sum_c \Bigl[\bigl(\log 2 - \tfrac12\log 2\pi - \log s_c\bigr)\sum_o (K_o - 1)
                  - \frac{Q_c}{2 s_c^2}\Bigr] - C \sum_o \log K_o.
        """
        B, C = x.shape[:2]
        y = self.forward(x).reshape(B, C, -1)
        # the centre: each channel's mean output (a quarter of the cells to read; within the values' spread)
        centre = y.detach().mean(-1, keepdim=True)
        K = self._sizes.to(x.dtype)
        yc = y - centre
        s1 = self._window_sums(x).reshape(B, C, -1) - K * centre  # window sums of x - centre
        xc = x.reshape(B, C, -1) - centre
        squares = xc * xc if torch.is_grad_enabled() and x.requires_grad else xc.square_()
        # sum_o S2_o = sum_j N_j xc_j^2, N_j the windows that hold cell j
        q = ((K * yc - 2.0 * s1) * yc).sum(-1) + squares @ self._cov.to(x.dtype)
        q = q.clamp_min(0.0)  # (B, C); >= 0 up to rounding
        gaps, choices = self._size_terms
        log_s = self.gap_log_scale
        per_gap = math.log(2.0) - 0.5 * LOG_2PI - log_s
        ll = gaps * per_gap.sum() - C * choices - 0.5 * (q * torch.exp(-2.0 * log_s)).sum(-1)
        return y, ll

    # -- the contract -------------------------------------------------------------------------------------
    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B = x.shape[0]
        cells = self._to_cells(x)
        if noise is not None and not self.tiles:
            noise = None
        sq = None
        if noise is None and self._sum_pool:
            y_loc, ll = self._max_by_sums(x)
        else:
            copies, sq = self._copies(cells, None if noise is None else noise.reshape(B, -1))
            y_loc = self._to_locations(self.forward(x)) if noise is None else None
            y_loc, ll = self._pool(copies, y_loc)
        ll = ll + (self.log_gain + self.tile_logdet)
        if self.tile_noise is not None:
            ll = ll + self._tile_extra * (self.tile_noise.log_scale.sum() + 0.5 * LOG_2PI * self.channels)
            if sq is not None:
                ll = ll + 0.5 * sq
        if self.dropped_pixels is not None:
            d = cells[:, :, self._drop_idx].unsqueeze(-1)
            ll = ll + self.dropped_pixels.log_prob(d, y_loc[:, :, self._drop_loc].unsqueeze(-1))
        return self._from_locations(y_loc), ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        B = y.shape[0]
        y_loc = self._to_locations(y)
        C = self.channels
        eps = [None] * (len(self.group_sizes) + 1)
        if sample and noise is not None:
            eps = noise.reshape(B, -1).split(self._inverse_sizes(), -1)
        cells = y.new_zeros(B, C, self.num_cells)
        for g, K in enumerate(self.group_sizes):
            yk = y_loc[:, :, getattr(self, f"_loc{K}")]
            Lk = yk.shape[-1]
            if self.mode == "avg":
                t = (yk * (self._buf("_div", K, yk) / K)).unsqueeze(-1).expand(B, C, Lk, K)
                if K > 1:
                    q = self.dropped[str(K)]
                    e = None if eps[g] is None else eps[g].reshape(B, C, Lk, K - 1)
                    d = q.sample(yk.unsqueeze(-1), e) if sample else q.mean(yk.unsqueeze(-1))
                    t = t + helmert_adjoint(d)
            else:
                scale = self.gap_log_scale.exp()[:, None, None]
                if sample:
                    e = (
                        torch.randn(B, C, Lk, 2, K, dtype=y.dtype, device=y.device)
                        if eps[g] is None
                        else eps[g].reshape(B, C, Lk, 2, K)
                    )
                    position = e[..., 0, :].argmax(-1, keepdim=True)
                    gaps = e[..., 1, :].abs() * scale
                else:
                    position = torch.zeros(B, C, Lk, 1, dtype=torch.long, device=y.device)
                    gaps = (scale * math.sqrt(2.0 / math.pi)).expand(B, C, Lk, K)
                t = yk.unsqueeze(-1) - gaps.scatter(-1, position, 0.0)
            idx = getattr(self, f"_idx{K}")
            cells = cells.index_add(2, idx.reshape(-1), t.reshape(B, C, -1))
        cells = cells * self._inv_cov.to(y.dtype)  # the mean of each cell's copies
        if self.dropped_pixels is not None:
            ctx = y_loc[:, :, self._drop_loc].unsqueeze(-1)
            e = None if eps[-1] is None else eps[-1].reshape(B, C, self.n_dropped, 1)
            d = self.dropped_pixels.sample(ctx, e) if sample else self.dropped_pixels.mean(ctx)
            cells = cells.index_copy(2, self._drop_idx, d.squeeze(-1))
        return self._from_cells(cells)

    def extra_repr(self) -> str:
        return f"{self.mode}, in_shape={self.in_shape}, {self.config}, windows of {list(self.group_sizes)}, exact={self.exact}"


class FlowReduce(FlowWindowPool):
    r"""``x.mean(dims)``, ``x.sum(dims)``, ``x.amax(dims)`` (and ``torch.mean`` ...): global pooling over any dimensions.

    The reduced dimensions are moved last and flattened into one window of :math:`K` cells
    per position of the kept dimensions (the "channels" :math:`R`); the layer is then the
    exact funnel (mean: :math:`D = K`, sum: :math:`D = 1`) or max surjection of
    :class:`FlowWindowPool` with a single window.

    >>> layer = FlowReduce((3, 4, 4), dims=(1, 2), keepdim=False, how="mean")
    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.equal(layer(x), x.mean((2, 3))), layer.exact
    (True, True)
    """

    def __init__(self, in_shape: Sequence[int], dims: Sequence[int] | None, keepdim: bool = False, how: str = "mean"):
        in_shape = tuple(int(s) for s in in_shape)
        n = len(in_shape)
        dims = tuple(range(n)) if dims is None else tuple(sorted({int(d) % n for d in dims}))
        kept = tuple(d for d in range(n) if d not in dims)
        if how not in ("mean", "sum", "amax"):
            raise ValueError(f"how must be 'mean', 'sum' or 'amax', got {how!r}")
        R, K = math.prod(in_shape[d] for d in kept), math.prod(in_shape[d] for d in dims)
        # the single window of K cells per kept position: a 2-D pool over (R, 1, K)
        super().__init__(
            (R, 1, K), "max" if how == "amax" else "avg", kernel=(1, K), divisor_override=1 if how == "sum" else None
        )
        self.how, self.dims, self.keepdim, self._kept = how, dims, bool(keepdim), kept
        self._sum_pool = False  # its input is not laid out as the (R, 1, K) windows: they are gathered
        self._perm = (0, *(d + 1 for d in kept), *(d + 1 for d in dims))
        self._permuted = (*(in_shape[d] for d in kept), *(in_shape[d] for d in dims))
        self.in_shape = in_shape
        self.out_shape = (
            tuple(1 if d in dims else s for d, s in enumerate(in_shape))
            if keepdim
            else tuple(in_shape[d] for d in kept)
        )

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(d + 1 for d in self.dims)
        if self.how == "mean":
            return torch.mean(x, dims, keepdim=self.keepdim)
        if self.how == "sum":
            return torch.sum(x, dims, keepdim=self.keepdim)
        return torch.amax(x, dims, keepdim=self.keepdim)

    def _to_cells(self, x: Tensor) -> Tensor:
        return x.permute(self._perm).reshape(x.shape[0], self.channels, self.num_cells)

    def _from_cells(self, cells: Tensor) -> Tensor:
        inv = [0] * len(self._perm)
        for i, p in enumerate(self._perm):
            inv[p] = i
        return cells.reshape(cells.shape[0], *self._permuted).permute(inv)

    def extra_repr(self) -> str:
        return f"{self.how} over dims {self.dims} of {self.in_shape}, keepdim={self.keepdim}, exact={self.exact}"


def pooling_layer(module: nn.Module, in_shape: Sequence[int]) -> FlowLayer:
    """The flow layer of a 1-D / 2-D pooling module: :class:`FlowAvgPool` / :class:`FlowMaxPool`
    for windows that tile the input, :class:`FlowWindowPool` for every other configuration.

    >>> type(pooling_layer(torch.nn.MaxPool2d(2), (1, 4, 4))).__name__, type(pooling_layer(torch.nn.MaxPool2d(3, 2, 1), (1, 4, 4))).__name__
    ('FlowMaxPool', 'FlowWindowPool')
    """
    simple = (nn.MaxPool1d, nn.MaxPool2d) if not getattr(module, "ceil_mode", False) else ()
    try:
        if isinstance(module, simple):
            return FlowMaxPool.from_module(module, in_shape)
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and not getattr(
            module, "ceil_mode", False
        ):
            return FlowAvgPool.from_module(module, in_shape)
    except LayerConfigurationError:
        pass
    return FlowWindowPool.from_module(module, in_shape)
