r"""Flowified convolution (``nn.Conv1d`` / ``nn.Conv2d``, zero padding, ``groups=1``).

A convolution is one linear map applied to every patch of the padded input. It is
flowified as the composition **Pad -> Tile -> Kernel**; every shape-only quantity (which
pixels are padding, how many windows cover each pixel, which pixels no window reaches) is
known from ``input_shape`` and precomputed once.

Notation: the padded grid has pixels :math:`p`; :math:`N_p` is the number of windows that
contain :math:`p` (the *coverage*), :math:`k` the number of kernel taps, :math:`L_o` the
number of output locations.

* **Pad** (bound). Padding pixels with :math:`N_p\ge1` are added coordinates. Stochastic
  mode fills them with :math:`\tau_{\text{pad}}\,\varepsilon` and adds
  :math:`-\log\mathcal N(\tau_{\text{pad}}\varepsilon;0,\tau_{\text{pad}}^2)`; deterministic
  mode uses zeros (a point evaluation). Padding pixels no window reaches are never created.
  Inverse: crop.
* **Tile**. A pixel with :math:`N_p>1` is duplicated into its :math:`N_p` window copies
  :math:`x_p+\sqrt{N_p}\,w_j` with :math:`\sum_j w_j=0`, :math:`w\sim\mathcal N(0,\tau_t^2)`
  on the :math:`(N_p-1)`-dimensional complement of the all-ones vector. The map
  :math:`(x_p,\omega)\mapsto` copies has orthogonal columns of norm :math:`\sqrt{N_p}`, so
  :math:`L=\tfrac{N_p}{2}\log N_p-\log q(\omega)`. The noise is drawn as i.i.d.
  :math:`g\sim\mathcal N(0,\tau_t^2)` per patch element minus the mean of the pixel's copies.
  Inverse: the mean of the copies.
* **Dropped pixels** (:math:`N_p=0`, inside the image): exact, :math:`L=\log q(x_p\mid y)`
  with a conditional diagonal Gaussian (:attr:`FlowConv.dropped_pixels`) whose mean is
  affine in the output at the nearest output location (a ``C_in x C_out`` matrix shared
  over positions). Inverse: its mean or a draw.
* **Kernel**: the :class:`~flowconvert.linear.FlowLinear` :attr:`FlowConv.kernel` built
  from ``weight.reshape(C_out, -1)``, applied to every patch (funnel, bijection or
  augmentation, as in the linear case, with the dropped coordinates conditioned on the
  output at the same location).

Deterministic mode never unfolds: the output is the original convolution (bit for bit),
and one more convolution with the residual rows :math:`M` of the kernel's cached stack
:math:`[W; M]` gives the standardized residuals of the dropped kernel coordinates.
``forward(x)`` is the original convolution.

>>> import torch
>>> torch.manual_seed(0) and None
>>> conv = torch.nn.Conv2d(2, 4, 3, padding=1)
>>> flow = FlowConv.from_module(conv, (2, 5, 5))
>>> x = torch.randn(3, 2, 5, 5)
>>> y, ll = flow.call_and_ll(x)
>>> torch.equal(y, conv(x)), ll.shape, flow.exact
(True, torch.Size([3]), False)
>>> torch.equal(flow(x), conv(x))
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import DensityPart, FlowLayer, weight_only
from .densities import LOG_2PI, ConditionalDiagonalNormal, GaussianNoise, sum_except_batch
from .errors import LayerConfigurationError, SingularWeightError
from .linear import DEFAULT_RTOL, FlowLinear, GroupedConditionalNormal

__all__ = ["FlowConv", "ConvGeometry", "conv_geometry"]


def _pair(v, dim: int, name: str, fill: int = 1) -> tuple[int, int]:
    """Normalize an int / tuple argument to (height, width); 1-D gets height ``fill``."""
    if isinstance(v, int):
        t = (v,) * dim
    else:
        t = tuple(int(a) for a in v)
        if len(t) == 1 and dim == 2:
            t = t * 2
    if len(t) != dim:
        raise LayerConfigurationError(f"{name}={v!r} does not fit a {dim}-D convolution", code="FC203")
    return (fill, t[0]) if dim == 1 else (t[0], t[1])


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when its strides are the row-major ones, else a row-major copy.

    PyTorch's CPU convolutions can crash (segfault) on an input whose length-1 dimensions carry
    odd strides, e.g. a transposed ``(B, C, 1)`` view that our identity layers pass through
    (``is_contiguous()`` is True for such views, so ``.contiguous()`` would not copy).
    """
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= max(size, 1)
    if tuple(reversed(expected)) == x.stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _conv1d_input(x: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """The input the 1-d convolution is called on: ``x`` itself (the user's call, bit for bit), except
    where PyTorch's CPU conv1d segfaults: a float32 length-1 view whose last stride is not 1 (a
    transposed ``(B, C, 1)``) with stride, padding and dilation all above their defaults (a sweep over
    stride 1-5, padding 0-3, dilation 1-3 crashed on exactly those; float64 never). That input is
    copied row-major."""
    odd_view = x.dtype == torch.float32 and x.shape[-1] == 1 and x.stride(-1) != 1
    if odd_view and stride > 1 and padding > 0 and dilation > 1:
        return _dense(x)
    return x


def _sum_squares(t: Tensor) -> Tensor:
    """Per-sample sum of squares of any-strided ``t`` (one pass when no gradient is recorded)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return sum_except_batch(t * t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim()))).square()


@dataclass(frozen=True)
class ConvGeometry:
    """The shape-only facts of a convolution on a given input shape (no weight is read).

    ``pads`` are (top, bottom, left, right); 1-D convolutions have height 1. ``n_pad``: padding
    pixels some window reaches; ``n_dropped``: input pixels no window reaches; ``tiles``: some
    pixel is in several windows. ``m`` / ``n``: rows and columns of each group's kernel matrix.
    """

    dim: int
    in_channels: int
    out_channels: int
    groups: int
    k: tuple[int, int]
    s: tuple[int, int]
    d: tuple[int, int]
    pads: tuple[int, int, int, int]
    padding_arg: str | tuple[int, ...]
    hw: tuple[int, int]
    padded: tuple[int, int]
    out_hw: tuple[int, int]
    n_pad: int
    n_dropped: int
    tiles: bool

    @property
    def m(self) -> int:
        return self.out_channels // self.groups

    @property
    def n(self) -> int:
        return self.in_channels // self.groups * self.k[0] * self.k[1]

    @property
    def n_locations(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def exact(self) -> bool:
        """Exact likelihood: no padding pixel is used, no window overlaps another, the kernel does not augment."""
        return self.n_pad == 0 and not self.tiles and self.m <= self.n

    def density_parameters(self) -> int:
        """Parameters of the layer's default densities (kernel funnel or noise, dropped pixels, pad/tile noise)."""
        G, m, n, C = self.groups, self.m, self.n, self.in_channels
        kernel = G * ((n - m) * m + 2 * (n - m)) if m < n else G * (m - n)
        pixels = C * (self.out_channels // G) + 2 * C if self.n_dropped else 0
        return kernel + pixels + C * (bool(self.n_pad) + self.tiles)

    def coverage(self) -> Tensor:
        """``(Hp, Wp)`` float64 window counts :math:`N_p` of the padded grid."""
        (kh, kw), (Ho, Wo) = self.k, self.out_hw
        ones = torch.ones(1, kh * kw, Ho * Wo, dtype=torch.float64)
        return F.fold(ones, self.padded, **self.fold_args)[0, 0]

    @property
    def fold_args(self) -> dict:
        return dict(kernel_size=self.k, dilation=self.d, padding=0, stride=self.s)

    def inside(self) -> Tensor:
        """``(Hp, Wp)`` mask of the input's own pixels in the padded grid."""
        pt, _, pl, _ = self.pads
        (H, W) = self.hw
        mask = torch.zeros(self.padded, dtype=torch.bool)
        mask[pt : pt + H, pl : pl + W] = True
        return mask


def conv_geometry(
    weight_shape, input_shape, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"
) -> ConvGeometry:
    """Check a convolution's configuration against ``input_shape`` and describe it (FC203 when unsupported).

    ``weight_shape`` ``(C_out, C_in / groups, *kernel)`` and the per-sample ``input_shape``
    ``(C_in, *spatial)`` are sequences of ints; the other arguments are as in ``nn.Conv2d``.

    Used by the flow layer's constructor and by ``audit`` (which decides without building).

    >>> g = conv_geometry((4, 1, 3, 3), (4, 8, 8), padding=1, groups=4)
    >>> g.out_hw, g.n_pad, g.tiles, g.exact, (g.m, g.n)
    ((8, 8), 36, True, False, (1, 9))
    """
    weight_shape, input_shape = tuple(int(s) for s in weight_shape), tuple(int(s) for s in input_shape)
    if len(weight_shape) not in (3, 4):
        raise LayerConfigurationError(
            f"FlowConv needs a Conv1d or Conv2d weight, got shape {weight_shape}", code="FC203"
        )
    dim = len(weight_shape) - 2
    if padding_mode != "zeros":
        raise LayerConfigurationError(
            f"padding_mode={padding_mode!r} is not supported; only 'zeros' is flowified", code="FC203"
        )
    groups = int(groups)
    C_out, c_in = weight_shape[:2]
    if len(input_shape) != dim + 1:
        raise LayerConfigurationError(
            f"a {dim}-D convolution needs a per-sample input of {dim + 1} dimensions, got {input_shape}", code="FC203"
        )
    if groups < 1 or C_out % groups or input_shape[0] != c_in * groups:
        raise LayerConfigurationError(
            f"groups={groups} with a weight of shape {weight_shape} does not fit {input_shape[0]} input and "
            f"{C_out} output channels",
            code="FC203",
        )
    kh, kw = (1, weight_shape[2]) if dim == 1 else weight_shape[2:]
    H, W = (1, input_shape[1]) if dim == 1 else input_shape[1:]
    sh, sw = _pair(stride, dim, "stride")
    dh, dw = _pair(dilation, dim, "dilation")

    # explicit per-side padding (top, bottom, left, right)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise LayerConfigurationError("padding='same' needs stride 1 (as in PyTorch)", code="FC203")
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise LayerConfigurationError(f"unknown padding {padding!r}", code="FC203")
        padding_arg = padding
    else:
        ph, pw = _pair(padding, dim, "padding", fill=0)
        pads = (ph, ph, pw, pw)
        padding_arg = tuple(int(p) for p in (padding if not isinstance(padding, int) else (padding,) * dim))
    if min(pads) < 0:
        raise LayerConfigurationError(f"negative padding {padding!r}", code="FC203")
    pt, pb, pl, pr = pads
    Hp, Wp = H + pt + pb, W + pl + pr
    Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise LayerConfigurationError(
            f"input of shape {input_shape} is smaller than the (dilated) kernel", code="FC203"
        )
    geometry = ConvGeometry(
        dim, c_in * groups, C_out, groups, (kh, kw), (sh, sw), (dh, dw), pads, padding_arg,
        (H, W), (Hp, Wp), (Ho, Wo), 0, 0, False,
    )  # fmt: skip
    cov, inside = geometry.coverage(), geometry.inside()
    used = cov >= 1
    return dataclasses.replace(
        geometry,
        n_pad=int((~inside & used).sum()),
        n_dropped=int((inside & ~used).sum()),
        tiles=bool((cov > 1).any()),
    )


class FlowConv(FlowLayer):
    """Flowified 1-D or 2-D convolution (zero padding, any stride, dilation, kernel size, ``groups=1``).

    Args:
        weight: ``(C_out, C_in, k)`` or ``(C_out, C_in, kh, kw)`` weight (copied).
        bias: optional ``(C_out,)`` bias.
        input_shape: per-sample input shape, ``(C, L)`` or ``(C, H, W)``.
        stride, padding, dilation, groups, padding_mode: as in ``nn.Conv1d`` / ``nn.Conv2d``;
            ``padding`` may be an int, a tuple, ``"valid"`` or ``"same"``.
        rtol: singular values of the kernel matrix at or below ``rtol * s_max`` are refused (FC201).

    Attributes:
        kernel: :class:`FlowLinear` of the ``C_out x C_in*k`` kernel matrix.
        pad_noise: :class:`GaussianNoise` (per input channel) of the used padding pixels, or None.
        tile_noise: :class:`GaussianNoise` (per input channel) of the duplication noise, or None.
        dropped_pixels: :class:`ConditionalDiagonalNormal` (``C_in`` given ``C_out``) of pixels
            no window covers, or None.
        tile_logdet: :math:`C_\\text{in}\\sum_p \\tfrac{N_p}{2}\\log N_p`, the Tile stage's log-determinant.
    """

    _record_own = ("weight", "bias")  # the record names the layer's copies, not the caller's tensors

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        input_shape: Sequence[int],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        rtol: float = DEFAULT_RTOL,
    ):
        super().__init__()
        geo = conv_geometry(weight.shape, input_shape, stride, padding, dilation, groups, padding_mode)
        weight = weight.detach()
        G, C_in, C_out = geo.groups, geo.in_channels, geo.out_channels
        (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = geo.k, geo.s, geo.d, geo.out_hw
        pt, pb, pl, pr = geo.pads
        H, W = geo.hw
        dim = geo.dim

        self.dim, self.groups = dim, G
        self.input_shape = tuple(int(s) for s in input_shape)
        self.in_channels, self.out_channels = C_in, C_out
        self._padding_arg = geo.padding_arg
        self._orig_stride = (sw,) if dim == 1 else (sh, sw)
        self._orig_dilation = (dw,) if dim == 1 else (dh, dw)
        self._weight_shape = tuple(weight.shape)
        self._hw, self._k, self._s, self._d = geo.hw, geo.k, geo.s, geo.d
        self._pads = geo.pads
        self._padded = geo.padded
        self._out_hw = geo.out_hw
        self.n_locations = Ho * Wo
        self.output_shape = (C_out, Wo) if dim == 1 else (C_out, Ho, Wo)

        try:
            self.kernel = FlowLinear(weight.reshape(C_out, -1), bias, rtol=rtol, groups=G)
        except SingularWeightError as err:
            shape = f"{C_out // G} x {geo.n}" + (f" (each of {G} groups)" if G > 1 else "")
            raise SingularWeightError(f"convolution kernel as a {shape} matrix: {err.message}", code="FC201") from None
        dtype, device = weight.dtype, weight.device
        self._init_dropped_taps(device)

        # -- shape-only precomputation (float64, then cast) ----------------------------------
        f64 = torch.float64
        fold_args = geo.fold_args
        cov, inside = geo.coverage(), geo.inside()
        used = cov >= 1
        pad_idx = torch.nonzero((~inside & used).reshape(-1)).reshape(-1)
        drop_mask = inside & ~used
        self.n_pad, self.n_dropped, self.tiles = geo.n_pad, geo.n_dropped, geo.tiles
        covu = cov[used]
        self.tile_logdet = C_in * float((0.5 * covu * covu.log()).sum())
        self._tile_extra = int((covu - 1).sum())  # sum over used pixels of (N_p - 1)
        self._fold_args = fold_args

        self.register_buffer("_pad_idx", pad_idx.to(device), persistent=False)
        inv_cov = torch.where(used, 1.0 / cov.clamp_min(1), torch.zeros((), dtype=f64))
        self.register_buffer("_inv_cov", inv_cov.to(dtype=dtype, device=device), persistent=False)
        cov_patch = F.unfold(cov[None, None], **fold_args)[0]  # (k, Lo)
        self.register_buffer("_sqrt_cov_patch", cov_patch.sqrt().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("_sqrt_cov_img", cov.sqrt().to(dtype=dtype, device=device), persistent=False)
        # dropped pixels: flat index in the unpadded grid, and the output location they condition on
        di, dj = torch.nonzero(drop_mask, as_tuple=True)
        oi = torch.floor((di - dh * (kh - 1) / 2) / sh + 0.5).clamp(0, Ho - 1).long()
        oj = torch.floor((dj - dw * (kw - 1) / 2) / sw + 0.5).clamp(0, Wo - 1).long()
        self.register_buffer("_drop_idx", ((di - pt) * W + (dj - pl)).to(device), persistent=False)
        self.register_buffer("_drop_loc", (oi * Wo + oj).to(device), persistent=False)

        self.pad_noise = GaussianNoise(C_in).to(dtype=dtype, device=device) if self.n_pad else None
        self.tile_noise = GaussianNoise(C_in).to(dtype=dtype, device=device) if self.tiles else None
        pixels = (
            ConditionalDiagonalNormal(C_in, C_out) if G == 1 else GroupedConditionalNormal(G, C_in // G, C_out // G)
        )
        self.dropped_pixels = pixels.to(dtype=dtype, device=device) if self.n_dropped else None
        self.exact = geo.exact

        Ck, Lo = C_in * kh * kw, Ho * Wo
        self._noise_sizes = (
            C_in * self.n_pad,
            Ck * Lo if self.tiles else 0,
            self.kernel.added_features * Lo,
        )
        self._inverse_noise_sizes = (self.kernel.dropped_features * Lo, C_in * self.n_dropped)

    def _init_dropped_taps(self, device) -> None:
        """Group the kernel's dropped patch entries by tap ``(a, b)``: each group is one strided slice
        of the padded input and a channel selection. ``_drop_perm[j]`` is the position in
        ``kernel.dropped_index`` of the ``j``-th entry in that grouped order."""
        self._drop_taps: list[tuple[int, int, str]] = []
        if self.kernel.kind != "funnel":
            return
        kh, kw = self._k
        S = self.kernel.dropped_index.cpu()
        chan, tap = S // (kh * kw), S % (kh * kw)
        order = []
        for t in range(kh * kw):
            where = torch.nonzero(tap == t).reshape(-1)
            if where.numel():
                name = f"_drop_ch{t}"
                self.register_buffer(name, chan[where].to(device), persistent=False)
                self._drop_taps.append((t // kw, t % kw, name))
                order.append(where)
        self.register_buffer("_drop_rows", torch.arange(S.numel()).to(device), persistent=False)
        # column of each dropped entry in its group's kernel matrix (the fused residual kernel M)
        self.register_buffer("_drop_cols", (S % self.kernel.group_in).to(device), persistent=False)
        perm = torch.cat(order)
        self.register_buffer("_drop_perm", perm.to(device), persistent=False)
        self.register_buffer("_drop_unperm", torch.argsort(perm).to(device), persistent=False)

    @classmethod
    def from_module(cls, module: nn.Conv1d | nn.Conv2d, input_shape: Sequence[int], **kwargs) -> "FlowConv":
        """Build from an ``nn.Conv1d`` / ``nn.Conv2d`` and the per-sample input shape (weights are copied)."""
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            raise LayerConfigurationError(f"expected nn.Conv1d or nn.Conv2d, got {type(module).__name__}", code="FC203")
        return cls(
            module.weight,
            module.bias,
            input_shape=input_shape,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            **kwargs,
        )

    # -- the original function ---------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The convolution weight (a view of the kernel's weight, kept in sync after training)."""
        return self.kernel.weight.view(self._weight_shape)

    @property
    def bias(self) -> Tensor:
        return self.kernel.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.dim == 1:
            conv, x = F.conv1d, _conv1d_input(x, self._orig_stride[0], max(self._pads), self._orig_dilation[0])
        else:
            conv = F.conv2d
        return conv(
            x,
            self.weight,
            self.kernel.bias,
            self._orig_stride,
            self._padding_arg,
            self._orig_dilation,
            self.groups,
        )

    # -- noise ---------------------------------------------------------------------------
    def noise_shape(self, input_shape: Sequence[int]) -> tuple[int, ...] | None:
        n = sum(self._noise_sizes)
        return (n,) if n else None

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...] | None:
        n = sum(self._inverse_noise_sizes)
        return (n,) if n else None

    def network_parameters(self) -> list[nn.Parameter]:
        # The kernel is a FlowLayer of its own: network_training finds it and trains its factors.
        return []

    def prepare_for_export(self) -> None:
        """Compute the kernel's caches now (see :meth:`FlowLinear.prepare_for_export`)."""
        self.kernel.prepare_for_export()

    def release_export(self) -> None:
        self.kernel.release_export()

    # -- helpers ------------------------------------------------------------------------
    def _as4d(self, x: Tensor) -> Tensor:
        C, (H, W) = self.in_channels, self._hw
        return x.reshape(x.shape[0], C, H, W)

    def _split(self, noise: Tensor, sizes: Sequence[int]) -> list[Tensor | None]:
        flat = noise.reshape(noise.shape[0], -1)
        if flat.shape[1] != sum(sizes):
            raise ValueError(f"noise has {flat.shape[1]} values per sample, the layer needs {sum(sizes)}")
        return [p if n else None for p, n in zip(flat.split(list(sizes), 1), sizes)]

    def _pad(self, x4: Tensor, eps: Tensor | None) -> Tensor:
        """Zero-pad; fill the used padding pixels with ``tau_pad * eps`` when ``eps`` is given."""
        pt, pb, pl, pr = self._pads
        xp = F.pad(x4, (pl, pr, pt, pb)) if any(self._pads) else x4
        if eps is not None:
            B, C = x4.shape[:2]
            vals = eps.reshape(B, C, self.n_pad) * self.pad_noise.log_scale.exp()[:, None]
            xp = xp.reshape(B, C, -1).index_copy(2, self._pad_idx, vals).reshape(xp.shape)
        return xp

    def _windows(self, xp: Tensor) -> Tensor:
        """View of the padded input as ``(B, C, kh, kw, Ho, Wo)`` windows (no copy)."""
        (kh, kw), (sh, sw), (dh, dw) = self._k, self._s, self._d
        v = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (B, C, Ho, Wo, span_h, span_w)
        return v[..., ::dh, ::dw].permute(0, 1, 4, 5, 2, 3)

    def _unfold(self, xp: Tensor) -> Tensor:
        """Patches ``(B, C*k, L_o)`` in the kernel matrix's column order (a strided copy)."""
        return self._windows(xp).reshape(xp.shape[0], self.kernel.in_features, self.n_locations)

    def _fold(self, cols: Tensor) -> Tensor:
        """Adjoint of :meth:`_unfold`: sum the patch entries ``(B, C*k, L_o)`` into the padded grid."""
        B, C = cols.shape[0], self.in_channels
        (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = self._k, self._s, self._d, self._out_hw
        c6 = cols.reshape(B, C, kh, kw, Ho, Wo)
        out = cols.new_zeros(B, C, *self._padded)
        for a in range(kh):
            for b in range(kw):
                out[:, :, a * dh : a * dh + sh * (Ho - 1) + 1 : sh, b * dw : b * dw + sw * (Wo - 1) + 1 : sw] += c6[
                    :, :, a, b
                ]
        return out

    def _tiled(self, xp: Tensor, eps: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
        """Patches with duplication noise ``(B, C*k, L_o)``, and ``|w / tau|^2`` per sample.

        ``eps`` holds i.i.d. standard normals per patch element; ``w / tau`` is ``eps`` minus
        the mean :math:`m_p` over the copies of the same pixel (copies share their channel's
        ``tau``), and each copy gets ``sqrt(N_p) w``. Since ``sqrt(N_p) tau m_p`` is a per-pixel
        quantity, the patches are ``windows(xp - sqrt(N) tau m) + sqrt(N) tau eps``, and
        ``|w / tau|^2 = sum eps^2 - sum_p N_p m_p^2``: no patch-sized temporary besides the result.
        """
        B, C = eps.shape[0], self.in_channels
        e = eps.reshape(B, -1, self.n_locations)
        sums = self._fold(e)  # per-pixel sums of the copies' noise
        mean = sums * self._inv_cov
        sq = _sum_squares(e) - sum_except_batch(sums * mean)
        tau = self.tile_noise.log_scale.exp()
        img = xp - (self._sqrt_cov_img * tau[:, None, None]) * mean
        scale = (tau[:, None, None] * self._sqrt_cov_patch).reshape(e.shape[1:])  # (C*k, L_o)
        shape6 = (B, C, *self._k, *self._out_hw)
        if inplace:
            patches = e * scale
            patches.view(shape6).add_(self._windows(img))
        else:
            patches = ((e * scale).view(shape6) + self._windows(img)).reshape(e.shape)
        return patches, sq

    def _weights(self) -> tuple[Tensor | None, ...]:
        """Every tensor the layer's weight-only quantities depend on (the key of :func:`~flowconvert.core.weight_only`)."""
        kernel, q = self.kernel, self.kernel.dropped
        noise = getattr(kernel, "noise", None)
        return (
            kernel.weight,
            kernel.bias,
            getattr(q, "weight", None),
            getattr(q, "bias", None),
            getattr(q, "log_scale", None),
            None if noise is None else noise.log_scale,
            None if self.pad_noise is None else self.pad_noise.log_scale,
            None if self.tile_noise is None else self.tile_noise.log_scale,
        )

    def _constant(self, deterministic: bool) -> Tensor:
        """The contribution per sample that does not depend on the input: the kernel's ``log|det|`` at
        every location, the tiling's, and the point constants of the noise that the deterministic
        mode sets to zero."""
        kernel, C = self.kernel, self.in_channels
        kconst = kernel.logdet()
        if kernel.kind == "augment" and deterministic:
            kconst = kconst + kernel.noise_point_constant()
        const = self.n_locations * kconst + self.tile_logdet
        if self.pad_noise is not None:
            const = const + self.n_pad * (self.pad_noise.log_scale.sum() + 0.5 * LOG_2PI * C)
        if self.tile_noise is not None:
            const = const + self._tile_extra * (self.tile_noise.log_scale.sum() + 0.5 * LOG_2PI * C)
        return const

    def _residual_constant(self) -> Tensor:
        """``L_o (sum log sigma + k/2 log 2 pi)``: the linear Gaussian's normalization over the locations."""
        q = self.kernel.dropped
        return self.n_locations * (q.log_scale.sum() + 0.5 * LOG_2PI * q.features)

    def kernel_patches(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """The patches the kernel multiplies, ``(B, C_in * k, L_o)``, in the kernel's column order.

        ``noise`` is the layer's forward noise (as for :meth:`call_and_ll`); its padding and
        duplication parts are included. ``noise=None``: the patches of the zero-padded input.
        """
        x4 = self._as4d(x)
        eps_pad = eps_tile = None
        if noise is not None and self.noise_shape(()) is not None:
            eps_pad, eps_tile, _ = self._split(noise, self._noise_sizes)
        xp = self._pad(x4, eps_pad)
        if eps_tile is not None:
            return self._tiled(xp, eps_tile)[0]
        return self._unfold(xp)

    def dropped_pixel_pairs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(pixels, context)`` of the pixels no window reaches: ``(B, n_dropped, C_in)`` input values
        and ``(B, n_dropped, C_out)`` outputs at the location :attr:`dropped_pixels` conditions on."""
        B = x.shape[0]
        xd = x.reshape(B, self.in_channels, -1)[:, :, self._drop_idx].mT
        yd = y.reshape(B, self.out_channels, -1)[:, :, self._drop_loc].mT
        return xd, yd

    def _dropped_ll(self, x4: Tensor, y: Tensor) -> Tensor:
        xd, yd = self.dropped_pixel_pairs(x4, y)
        return self.dropped_pixels.log_prob(xd, yd)  # any ConditionalDensity

    # -- density parts -------------------------------------------------------------------
    def density_parts(self) -> tuple[DensityPart, ...]:
        """``kernel.dropped`` / ``kernel.noise`` (per output location), ``dropped_pixels``,
        ``pad_noise`` and ``tile_noise`` (per input channel), those the layer has."""
        k, parts = self.kernel, []
        if k.kind == "funnel":
            parts.append(DensityPart("kernel.dropped", "conditional", k.dropped_features, self.out_channels))
        elif k.kind == "augment":
            parts.append(DensityPart("kernel.noise", "noise", k.added_features))
        if self.dropped_pixels is not None:
            parts.append(DensityPart("dropped_pixels", "conditional", self.in_channels, self.out_channels))
        if self.pad_noise is not None:
            parts.append(DensityPart("pad_noise", "noise", self.in_channels))
        if self.tile_noise is not None:
            parts.append(DensityPart("tile_noise", "noise", self.in_channels))
        return tuple(parts)

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Rows per part: the kernel's per-location rows ``(B * L_o, ...)`` (patches with the
        padding/duplication noise of ``noise`` included), the dropped pixels ``(B * n_dropped,
        C_in)`` with the output at their location, and for the padding and duplication noise
        the input pixels ``(B * H * W, C_in)`` they are compared with."""
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        with torch.no_grad():
            x4 = self._as4d(x)
            B, C = x4.shape[:2]
            k = self.kernel
            patches = self.kernel_patches(x4, noise).mT.reshape(-1, k.in_features)
            if k.kind != "bijection":
                out.update({f"kernel.{name}": rows for name, rows in k.observe(patches).items()})
            if self.dropped_pixels is not None:
                y = self.forward(x) if noise is None else self.call_and_ll(x, noise)[0]  # the output q conditions on
                xd, yd = self.dropped_pixel_pairs(x4, y)
                out["dropped_pixels"] = (xd.reshape(-1, C), yd.reshape(-1, self.out_channels))
            pixels = x4.reshape(B, C, -1).mT.reshape(-1, C)
            for name in ("pad_noise", "tile_noise"):
                if getattr(self, name) is not None:
                    out[name] = (pixels, None)
        return out

    def _out(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.output_shape)

    def _dropped_patch_entries(self, x4: Tensor) -> Tensor:
        """The kernel's dropped patch entries ``x_S`` at every location, ``(B, k, L_o)``, in the
        tap-grouped order :attr:`_drop_perm` (strided slices of the padded input; no unfold)."""
        pt, pb, pl, pr = self._pads
        xp = F.pad(x4, (pl, pr, pt, pb)) if any(self._pads) else x4
        (sh, sw), (dh, dw), (Ho, Wo) = self._s, self._d, self._out_hw
        pieces = []
        for a, b, name in self._drop_taps:
            window = xp[:, :, a * dh : a * dh + sh * (Ho - 1) + 1 : sh, b * dw : b * dw + sw * (Wo - 1) + 1 : sw]
            pieces.append(window.index_select(1, getattr(self, name)))
        d = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        return d.reshape(x4.shape[0], -1, self.n_locations)

    def _kernel_dropped_ll(self, d: Tensor, y: Tensor, permuted: bool) -> Tensor:
        """``log q(x_S | y)`` summed over locations; ``d`` ``(B, k, L_o)``, ``y`` ``(B, C_out, L_o)``.

        ``permuted``: ``d``'s rows are in the order :attr:`_drop_perm` (deterministic pass). The
        linear-Gaussian family is evaluated on its standardized residual with ``A y`` a 1x1
        convolution (a matmul over channels); any other family gets rows ``(B, L_o, k)`` in the
        kernel's order."""
        q = self.kernel.dropped
        if not self.kernel.fused() or self.n_locations < 64:
            # the kernel's own row-wise density (any family; for the Gaussian one (B L_o x m) product)
            d = d.index_select(1, self._drop_unperm) if permuted else d
            return self.kernel.dropped_log_prob(d.mT, y.mT)
        if permuted and self.groups == 1:
            # the density's rows permuted instead of d (k x m, not B x k x L_o): the sum of squares is the same
            A, c, inv_sigma, const = weight_only(self, "gather", self._weights(), self._gather_weights)
            r = torch.baddbmm(d, A.expand(d.shape[0], *A.shape), y, alpha=-1)  # x_S - A y, per sample
            return -const - 0.5 * _sum_squares((r - c) * inv_sigma)
        if permuted:
            d = d.index_select(1, self._drop_unperm)
        const = self._residual_constant()
        r = (d - self._grouped_matmul(q.weight, y) - q.bias[:, None]) * torch.exp(-q.log_scale)[:, None]
        return -const - 0.5 * _sum_squares(r)

    def _gather_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(A, c, 1/sigma, const)`` of the linear Gaussian in the tap-grouped row order (``c`` and
        ``1/sigma`` as columns), and its constant over the locations."""
        q, perm = self.kernel.dropped, self._drop_perm
        const = self._residual_constant()
        return q.weight.index_select(0, perm), q.bias[perm, None], torch.exp(-q.log_scale)[perm, None], const

    def _grouped_matmul(self, M: Tensor, cols: Tensor) -> Tensor:
        """``blockdiag(M_g) @ cols`` for ``cols`` ``(B, G * a, L)`` and ``M`` ``(G * b, a)`` (``M @ cols`` when ``G = 1``)."""
        G = self.groups
        if G == 1:
            return torch.matmul(M, cols)
        B, L = cols.shape[0], cols.shape[-1]
        out = torch.matmul(M.view(G, -1, M.shape[-1]), cols.view(B, G, -1, L))
        return out.reshape(B, -1, L)

    #: Cost, in multiply-adds, of gathering one dropped entry and passing over it (measured on CPU:
    #: the strided slices, the subtraction and the sum of squares); see :meth:`_fuse`.
    GATHER_COST = 500

    def _fuse(self, batch: int) -> bool:
        """Is the fused residual (one convolution with ``M``, built per call) cheaper than the gather?

        Fused: build ``M`` (``k m n`` per group, weighted 1.4: its elementwise passes) and convolve
        (``B L_o k n``). Gathered: ``A y`` (``B L_o k m``) and :attr:`GATHER_COST` per dropped
        entry. The gather wins on deep layers (many channels, few locations: ResNet-18's last
        block is 100x faster), the fused form on wide maps with few channels (a stem)."""
        kernel = self.kernel
        k, m, n = kernel.dropped_features, kernel.group_out, kernel.group_in  # n, m per group
        locations = batch * self.n_locations
        fused = 1.4 * k * m * n + locations * k * n
        gathered = locations * k * (m + self.GATHER_COST)
        return fused < gathered

    def _fused_residual_ll(self, x4: Tensor, weights: tuple) -> Tensor:
        r"""The deterministic contribution of a funnel whose density is the linear-Gaussian family,
        ``(B,)``: the layer's constant and :math:`\log q(x_S \mid y)` from one convolution of the input.

        The standardized residual is affine in the patch, :math:`\rho = M\pi + e` with
        :math:`M = \sigma^{-1}(E_S - AW)` and :math:`e = -\sigma^{-1}(Ab + c)`; ``M`` is built from
        the current parameters (``k x m x C_in k^d`` multiply-adds, amortized over all locations
        and samples) on every call that records a gradient, and kept between calls that do not
        (:func:`~flowconvert.core.weight_only`, when it is at most 8 times the kernel's size, as for
        every 3x3 convolution with as many outputs as inputs), together with the constant (the
        kernel's and the tiling's, minus the Gaussian's normalization). One convolution with ``M``
        (channels-last, which runs wide convolutions faster on CPU) replaces the gather of the
        dropped entries and the elementwise passes over them."""
        pt, pb, pl, pr = self._pads
        if pt == pb and pl == pr:
            xin, padding = x4, (pt, pl)
        else:
            xin, padding = F.pad(x4, (pl, pr, pt, pb)), 0
        # channels-last, except on a map of width or height 1: PyTorch's CPU convolution segfaults on
        # such channels-last inputs for some geometries (stride 3, padding 2, dilation 2: fuzzer model 1615)
        fmt = torch.channels_last if min(xin.shape[-2:]) > 1 else torch.contiguous_format
        if self.kernel.dropped.features <= 8 * self.out_channels:
            M, e, const = weight_only(self, f"fused_{fmt}", weights, lambda: self._fused_weights(fmt))
        else:
            M, e, const = self._fused_weights(fmt)
        res = F.conv2d(
            xin.contiguous(memory_format=fmt) if fmt is torch.channels_last else _dense(xin),
            M,
            e,
            self._s,
            padding,
            self._d,
            self.groups,
        )
        return torch.sub(const, _sum_squares(res), alpha=0.5)

    def _fused_weights(self, fmt: torch.memory_format) -> tuple[Tensor, Tensor, Tensor]:
        """``(M, e, const)`` of :meth:`_fused_residual_ll`: ``M`` as a convolution weight in memory format
        ``fmt``, ``const`` the deterministic constant minus the Gaussian's normalization."""
        kernel, q = self.kernel, self.kernel.dropped
        inv_sigma = torch.exp(-q.log_scale)
        W = kernel.weight
        k = q.features
        G = self.groups
        if G == 1:
            AW, Ab = torch.matmul(q.weight, W), torch.mv(q.weight, kernel.bias)
        else:  # per group: A_g (k_g x m) times W_g (m x n) and b_g
            A = q.weight.view(G, -1, kernel.group_out)
            AW = torch.matmul(A, W.view(G, kernel.group_out, -1)).reshape(k, -1)
            Ab = torch.matmul(A, kernel.bias.view(G, -1, 1)).reshape(k)
        M = AW.neg().index_put((self._drop_rows, self._drop_cols), W.new_ones(()), accumulate=True)
        M = (M * inv_sigma[:, None]).view(k, self.in_channels // G, *self._k).contiguous(memory_format=fmt)
        e = -(Ab + q.bias) * inv_sigma
        return M, e, self._constant(True) - self._residual_constant()

    # -- the contract --------------------------------------------------------------------
    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One code path with and without gradients; the deterministic mode never unfolds."""
        x4 = self._as4d(x)
        if noise is not None and self.noise_shape(()) is None:
            noise = None
        kernel = self.kernel
        B, Lo = x4.shape[0], self.n_locations
        kind = kernel.kind
        deterministic = noise is None
        weights = self._weights()

        def constant() -> Tensor:
            const = weight_only(self, f"constant_{deterministic}", weights, lambda: self._constant(deterministic))
            return const.expand(B)

        if noise is None:
            # the original convolution for y (bit for bit)
            y = self.forward(x).reshape(B, self.out_channels, Lo)
            # while torch.export traces, the batch is symbolic: decide per sample (no guard on it)
            if kind == "funnel" and kernel.fused() and self._fuse(B if isinstance(B, int) else 1):
                ll = self._fused_residual_ll(x4, weights)  # the constant is kept with M
            elif kind == "funnel":  # the dropped entries are strided slices
                ll = constant() + self._kernel_dropped_ll(self._dropped_patch_entries(x4), y, permuted=True)
            else:
                ll = constant()
        else:
            ll = constant()
            eps_pad, eps_tile, eps_aug = self._split(noise, self._noise_sizes)
            xp = self._pad(x4, eps_pad)
            if eps_pad is not None:
                ll = ll + 0.5 * sum_except_batch(eps_pad * eps_pad)
            if eps_tile is not None:  # unfold once, with the duplication noise added in the same pass
                inplace = not (torch.is_grad_enabled() and (x4.requires_grad or eps_tile.requires_grad))
                patches, sq = self._tiled(xp, eps_tile, inplace=inplace)
                ll = ll + 0.5 * sq
            else:
                patches = self._unfold(xp)
            y = self._grouped_matmul(kernel.weight, patches) + kernel.bias[:, None]
            if kind == "funnel":
                ll = ll + self._kernel_dropped_ll(patches.index_select(1, kernel.dropped_index), y, permuted=False)
            elif kind == "augment" and eps_aug is not None:
                tau = kernel.noise.log_scale.exp().expand(kernel.added_features)
                eps3 = eps_aug.reshape(B, -1, Lo)
                y = y.index_add(1, kernel.noise_index, eps3 * tau[:, None])
                ll = ll + 0.5 * _sum_squares(eps3) + Lo * kernel.noise_point_constant()
            elif kind == "augment":
                ll = ll + Lo * kernel.noise_point_constant()
        if self.dropped_pixels is not None:
            ll = ll + self._dropped_ll(x4, y)
        return self._out(y), ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        B = y.shape[0]
        C, (H, W), Lo = self.in_channels, self._hw, self.n_locations
        y3 = y.reshape(B, self.out_channels, Lo)
        eps_k = eps_px = None
        if sample and noise is not None and self.inverse_noise_shape(()) is not None:
            eps_k, eps_px = self._split(noise, self._inverse_noise_sizes)
        if eps_k is not None:
            eps_k = eps_k.reshape(B, Lo, -1)
        patches = self.kernel.inverse(y3.mT, sample=sample, noise=eps_k).mT  # (B, C*k, L_o)
        xp = self._fold(patches) * self._inv_cov  # mean of the copies
        pt, _, pl, _ = self._pads
        x = xp[:, :, pt : pt + H, pl : pl + W].reshape(B, C, H * W)
        if self.dropped_pixels is not None:
            q = self.dropped_pixels
            yd = y3[:, :, self._drop_loc].mT  # (B, n_dropped, C_out)
            if sample:
                xd = q.sample(yd, None if eps_px is None else eps_px.reshape(B, self.n_dropped, C))
            else:
                xd = q.mean(yd)
            x = x.index_copy(2, self._drop_idx, xd.mT)
        return x.reshape(B, *self.input_shape)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self._weight_shape[2:]}, "
            f"stride={self._orig_stride}, padding={self._padding_arg}, dilation={self._orig_dilation}, "
            f"input_shape={self.input_shape}, kernel={self.kernel.kind}, exact={self.exact}"
        )
