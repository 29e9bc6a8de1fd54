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

Overlapping or padded pooling is refused (FC214).

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
from .densities import LOG_2PI, ConditionalNormal, HalfNormal, _read, _write, normal_log_prob, sum_except_batch
from .errors import LayerConfigurationError

__all__ = ["FlowAvgPool", "FlowMaxPool", "ChannelConditionalNormal", "helmert"]


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
        stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _ntuple(stride, nd)
        if stride != kernel:
            raise LayerConfigurationError(f"{name} with kernel {kernel} != stride {stride} (overlapping or gapped windows)", code="FC214")
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

    def __init__(self, in_shape: Sequence[int], kernel: Sequence[int], divisor: int | None = None,
                 adaptive: Sequence[int] | None = None):
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
