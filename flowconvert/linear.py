r"""Flowified linear map :math:`y = W x + b`, :math:`W \in \mathbb R^{m\times n}`.

The map is completed to a square one by **coordinates**, not by an orthogonal basis
(see ``docs/mathematics.md``, "The linear layer"):

* :math:`m=n`, bijection (exact): :math:`L = \log|\det W|`.
* :math:`m<n`, funnel (exact): a set :math:`S^c` of :math:`m` input coordinates with
  :math:`W_{S^c}` (the :math:`m\times m` block of those columns) well conditioned is chosen
  once; the dropped coordinates are the *other* inputs, :math:`d = x_S` (a gather). The map
  :math:`x\mapsto(y, d)` has :math:`|\det| = |\det W_{S^c}|`, so
  :math:`L = \log|\det W_{S^c}| + \log q(d\mid y)`. Inverse:
  :math:`x_{S^c} = W_{S^c}^{-1}(y - b - W_S d)`, :math:`x_S = d`.
* :math:`m>n`, augmentation (bound): noise is added on a set :math:`T` of :math:`m-n`
  output coordinates with :math:`W_{T^c}` invertible, :math:`y = Wx + b + E_T u`,
  :math:`u\sim\mathcal N(0,\tau^2)`; :math:`L = \log|\det W_{T^c}| - \log\mathcal N(u;0,\tau^2)`.
  Inverse: :math:`x = W_{T^c}^{-1}(y_{T^c} - b_{T^c})`.

The output is always ``F.linear(x, weight, bias)`` with the original weight. The
weight-only quantities (:math:`\log|\det|` and the :math:`r\times r` inverse) are computed
in float64 once, at construction and on :meth:`FlowLinear.refresh`, and stored in the
layer's dtype; nothing is factorized on the likelihood pass. With the linear-Gaussian
:math:`q = \mathcal N(Ay + c, \sigma^2)` the density term is the standardized residual
:math:`r = (x_S - Ay - c)/\sigma`, :math:`(n-m)\times m` multiply-adds on top of the forward.

>>> import torch
>>> torch.manual_seed(0) and None
>>> lin = torch.nn.Linear(4, 2)
>>> flow = FlowLinear.from_module(lin)
>>> x = torch.randn(3, 4)
>>> y, ll = flow.call_and_ll(x)
>>> torch.equal(y, lin(x)), ll.shape, flow.exact
(True, torch.Size([3]), True)
>>> torch.allclose(flow(flow.inverse(y, sample=True)), y, atol=1e-5)
True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import DensityPart, FlowLayer, tensor_key, weight_only
from .densities import (
    FULL_COVARIANCE_MAX,
    LOG_2PI,
    ConditionalDiagonalNormal,
    ConditionalFullNormal,
    ConditionalNormal,
    GaussianNoise,
    _write,
)
from .errors import SingularWeightError

__all__ = ["FlowLinear", "GroupedConditionalNormal", "DEFAULT_RTOL", "choose_square_block", "block_inverse"]

#: A kept block whose condition number exceeds ``1 / DEFAULT_RTOL`` is refused (FC201).
DEFAULT_RTOL = 1e-6
#: Beyond this condition number the block is numerically singular (rank-deficient weight).
_SINGULAR_COND = 1e14


def _pivot_permutation(pivots: Tensor, size: int) -> Tensor:
    """Row permutation (new order of the rows) from LAPACK's 1-based sequential row swaps, batched."""
    piv = (pivots - 1).reshape(-1, pivots.shape[-1]).tolist()
    perms = []
    for swaps in piv:
        perm = list(range(size))
        for i, p in enumerate(swaps):
            perm[i], perm[p] = perm[p], perm[i]
        perms.append(perm)
    return torch.tensor(perms, dtype=torch.long).reshape(*pivots.shape[:-1], size)


def _cond2(block: Tensor, inv: Tensor, iters: int = 6, vectors: int = 4) -> Tensor:
    """Estimate of the 2-norm condition number ``||B|| ||B^-1||`` (batched, float64).

    Subspace iteration on ``M^T M`` with a few fixed pseudo-random vectors: a lower bound
    that is within a few per cent after these iterations for the matrices met here, and it
    costs a few passes over the block (no SVD)."""

    def norm2(M: Tensor) -> Tensor:
        g = torch.Generator(device=M.device).manual_seed(0)
        v = torch.randn(M.shape[-1], vectors, generator=g, dtype=M.dtype, device=M.device).expand(*M.shape[:-2], -1, -1)
        for _ in range(iters):
            v = torch.linalg.qr(M.mT @ (M @ v)).Q
        return torch.linalg.matrix_norm(M @ v, 2)

    return norm2(block) * norm2(inv)


def block_inverse(block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log|det B|, B^{-1}, cond estimate)`` of square (batched) blocks, in float64 (one LU each).

    ``log|det|`` is ``-inf`` and the condition ``inf`` when an LU pivot is exactly zero.
    """
    B = block.to(torch.float64)
    LU, piv = torch.linalg.lu_factor(B)
    diag = LU.diagonal(dim1=-2, dim2=-1).abs()
    logdet = diag.log().sum(-1)
    eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand_as(B)
    if bool((diag == 0).any()):
        ok = (diag > 0).all(-1)
        inv = torch.where(ok[..., None, None], torch.linalg.lu_solve(LU, piv, eye), torch.zeros_like(B))
        cond = torch.where(ok, _cond2(B, inv), torch.full_like(logdet, math.inf))
        return logdet, inv, cond
    inv = torch.linalg.lu_solve(LU, piv, eye)
    return logdet, inv, _cond2(B, inv)


def choose_square_block(
    weight: Tensor, rtol: float = DEFAULT_RTOL
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Choose ``r = min(m, n)`` columns (m < n) or rows (m > n) of ``weight`` forming a well-conditioned block.

    Works on a batch of weights ``(..., m, n)``. Returns ``(kept, rest, (logdet, inverse, cond))``:
    the indices of the block's columns/rows ``(..., r)`` (sorted), of the others
    ``(..., |m - n|)`` (sorted), and :func:`block_inverse` of the chosen block. The first choice is the pivots of a
    partial-pivoting LU of ``W^T`` (``W`` for rows): ``O(m n r)``, no ``n x n`` matrix. When
    that block's condition exceeds ``1 / rtol``, a column-pivoted QR (rank revealing) is tried.
    """
    W = weight.detach()
    if not W.dtype.is_floating_point or W.dtype not in (torch.float32, torch.float64):
        W = W.to(torch.float64)
    m, n = W.shape[-2:]
    tall = W.mT if m < n else W  # choose rows of this (size x r) matrix
    size, r = tall.shape[-2], tall.shape[-1]
    if size == r:
        idx = torch.arange(r).expand(*W.shape[:-2], r)
        return idx, idx[..., :0], block_inverse(W)
    # the pivots only choose the block (its condition is then measured in float64): a float32
    # weight is factorized in float32, half the memory and time of a float64 copy
    _, piv = torch.linalg.lu_factor(tall)
    perm = _pivot_permutation(piv, size)
    kept, rest = perm[..., :r].sort(-1).values, perm[..., r:].sort(-1).values

    def block_of(k: Tensor) -> Tensor:
        return (
            tall.gather(-2, k[..., None].expand(*k.shape, r)).mT
            if m < n
            else tall.gather(-2, k[..., None].expand(*k.shape, r))
        )

    result = block_inverse(block_of(kept))
    cond = result[2]
    bad = (cond > 1.0 / rtol).reshape(-1)
    if bool(bad.any()):  # rank-revealing fallback for the blocks that came out ill-conditioned
        import scipy.linalg

        flat_tall = tall.reshape(-1, size, r)
        kept_f, rest_f = kept.reshape(-1, r).clone(), rest.reshape(-1, size - r).clone()
        for i in torch.nonzero(bad).reshape(-1).tolist():
            _, p = scipy.linalg.qr(flat_tall[i].mT.double().numpy(), mode="r", pivoting=True)
            p = torch.from_numpy(p).long()
            kept_f[i], rest_f[i] = p[:r].sort().values, p[r:].sort().values
        kept2, rest2 = kept_f.reshape(kept.shape), rest_f.reshape(rest.shape)
        result2 = block_inverse(block_of(kept2))
        better = result2[2] < cond
        kept = torch.where(better[..., None], kept2, kept)
        rest = torch.where(better[..., None], rest2, rest)
        result = (
            torch.where(better, result2[0], result[0]),
            torch.where(better[..., None, None], result2[1], result[1]),
            torch.where(better, result2[2], result[2]),
        )
    return kept, rest, result


def singular_message(shape: str, cond: float, logdet: float, rtol: float, block: str) -> str:
    """The FC201 text: singular (no finite log|det|) or ill-conditioned (finite, above the threshold)."""
    if not math.isfinite(logdet) or cond > _SINGULAR_COND:
        return (
            f"weight of shape {shape} is singular: its {block} has no finite log|det| (condition number "
            f"{cond:.3g}); the map is not injective on the coordinates it keeps, log|det| would be -inf"
        )
    return (
        f"weight of shape {shape} is ill-conditioned but invertible: the {block} has condition number "
        f"{cond:.3g} > 1/rtol = {1.0 / rtol:.3g} (log|det| = {logdet:.6g}, finite); its inverse would lose "
        f"about {math.log10(cond):.0f} digits. Build the layer with a smaller rtol (e.g. rtol={min(rtol, 0.1 / cond):.0e}) to accept it"
    )


def _invalidate_after_load(module: "FlowLinear", incompatible_keys) -> None:
    module.invalidate_cache()


def _apply(x: Tensor, M: Tensor) -> Tensor:
    """``x @ M^T`` on the last dimension; a 3-D ``M`` ``(G, b, a)`` is block diagonal (``x``: ``(..., G * a)``)."""
    if M.dim() == 2:
        return F.linear(x, M)
    G, b, a = M.shape
    out = torch.einsum("...ga,gba->...gb", x.reshape(*x.shape[:-1], G, a), M)
    return out.reshape(*x.shape[:-1], G * b)


class GroupedConditionalNormal(ConditionalNormal):
    r"""Block-diagonal linear Gaussian of ``groups`` independent groups (grouped convolution kernels).

    Group :math:`g` has ``features`` dropped coordinates :math:`d_g` and ``context_features``
    outputs :math:`y_g`: :math:`q(d\mid y) = \prod_g \mathcal N(d_g; A_g y_g + c_g,
    \operatorname{diag}\sigma_g^2)`. As a :class:`~flowconvert.densities.ConditionalDensity` it models
    ``groups * features`` coordinates given ``groups * context_features``, group-major. ``weight``
    stacks the :math:`A_g` as ``(groups * features, context_features)``; calibration fits each
    row on its group's outputs in closed form (:meth:`linear_regressors`). Starts standard normal.

    >>> q = GroupedConditionalNormal(3, 2, 1)
    >>> q.features, q.context_features, q.log_prob(torch.zeros(5, 6), torch.randn(5, 3)).shape
    (6, 3, torch.Size([5]))
    """

    def __init__(self, groups: int, features: int, context_features: int):
        super().__init__()
        self.groups, self.group_features, self.group_context = int(groups), int(features), int(context_features)
        self.features, self.context_features = self.groups * self.group_features, self.groups * self.group_context
        self.weight = nn.Parameter(torch.zeros(self.features, self.group_context))
        self.bias = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))

    def blocks(self) -> Tensor:
        """The :math:`A_g` as ``(groups, features, context_features)`` (a view)."""
        return self.weight.view(self.groups, self.group_features, self.group_context)

    def mean(self, y: Tensor) -> Tensor:
        return _apply(y, self.blocks()) + self.bias

    def linear_regressors(self) -> Tensor:
        """``(features, context_features)`` indices: row ``(g, j)`` regresses on group ``g``'s outputs."""
        g = torch.arange(self.groups).repeat_interleave(self.group_features)
        return g[:, None] * self.group_context + torch.arange(self.group_context)

    def read_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        var = (2 * self.log_scale.detach().double()).exp()
        return self.weight.detach().double(), self.bias.detach().double(), var

    def write_linear(self, A, c, var, context_mean=None, context_var=None) -> None:
        _write(self, A, c, var)


class FlowLinear(FlowLayer):
    """Flowified ``nn.Linear`` / ``F.linear`` acting on the last dimension (optionally block diagonal).

    Args:
        weight: ``(out_features, in_features)`` weight, copied (the caller's tensor is untouched);
            with ``groups = G`` the ``G`` blocks stacked, ``(G * m, n)``: the map is block diagonal,
            ``in_features = G * n`` (group-major), each block flowified on its own (the per-patch
            map of a grouped convolution).
        bias: optional ``(out_features,)`` bias.
        rtol: a kept block whose condition number exceeds ``1 / rtol`` is refused (FC201);
            a singular weight (no finite ``log|det|``) is always refused.
        noise_log_scale: initial ``log tau`` of the augmentation noise (increasing maps).
        groups: the number of diagonal blocks ``G`` (default 1, a dense map).
        covariance: the layer's own density of the dropped coordinates (funnel, one group):
            ``"diagonal"`` (default), a :class:`ConditionalDiagonalNormal` with its fused residual;
            ``"full"``, a :class:`~flowconvert.densities.ConditionalFullNormal` (correlations of
            the dropped coordinates, a kink calibration may choose; ``k^2`` more multiply-adds per
            row for ``k`` dropped coordinates); ``"auto"``, full when ``k <= FULL_COVARIANCE_MAX``
            (what the converter asks for ``nn.Linear``).
        fold_strided: how a non-contiguous input of 3 or more dimensions is multiplied. PyTorch's
            ``F.linear`` folds it to 2-D and calls ``mm`` when the weight requires grad (an
            ``nn.Parameter``, the default ``True``), and batches it otherwise; the layer's own
            weight is frozen, so it follows the user's weight here to stay bit for bit
            (the converter passes ``weight.requires_grad`` of the user's layer).

    Attributes:
        kind: ``"bijection"``, ``"funnel"`` (reducing) or ``"augment"`` (increasing).
        kept_index: the ``r = min(m, n)`` input coordinates ``S^c`` (funnel) or output
            coordinates ``T^c`` (augment) of the square block; ``arange(n)`` for a bijection
            (per group, ``G * r`` in all, as indices of the whole input or output).
        dropped_index: the dropped input coordinates ``S`` (funnel; empty otherwise).
        noise_index: the output coordinates ``T`` the noise is added to (augment; empty otherwise).
        dropped: :class:`ConditionalDiagonalNormal` (:class:`GroupedConditionalNormal` for ``G > 1``,
            :class:`~flowconvert.densities.ConditionalFullNormal` with ``covariance="full"``;
            or any ``ConditionalDensity``) of ``x_S`` given ``y``.
        noise: :class:`GaussianNoise` of the added coordinates (augment).

    **Caches.** ``log|det|`` of the block and its inverse depend on ``weight`` only. They are
    recomputed by :meth:`refresh` (called at construction, by :func:`network_training` on
    exit, after ``load_state_dict``) and recomputed lazily when ``weight`` was changed in
    place through autograd-visible operations (optimizer steps, ``copy_``), replaced
    (``layer.weight.data = t``) or moved (``.to()``, ``.double()``). While ``weight`` requires
    grad (:func:`network_training`) they are computed from the current weight on every call,
    differentiably. An in-place edit through ``.data`` (``layer.weight.data.mul_(2)``) bypasses
    PyTorch's version counter: call :meth:`refresh` after it.
    """

    _record_own = ("weight", "bias")  # the record names the layer's copies, not the caller's tensors

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        rtol: float = DEFAULT_RTOL,
        noise_log_scale: float = 0.0,
        groups: int = 1,
        covariance: str = "diagonal",
        fold_strided: bool = True,
    ):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"FlowLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        weight = weight.detach()
        dtype, device = weight.dtype, weight.device
        G = int(groups)
        rows, n = weight.shape
        if G < 1 or rows % G:
            raise ValueError(f"groups={groups} does not divide the {rows} rows of the weight")
        m = rows // G
        self.groups, self.group_in, self.group_out = G, n, m
        self.fold_strided = bool(fold_strided)
        self.in_features, self.out_features, self.rank = G * n, rows, min(m, n)
        self.kind = "bijection" if m == n else ("funnel" if m < n else "augment")
        self.exact = m <= n
        if m == 0 or n == 0:
            raise SingularWeightError(f"weight of shape {m}x{n} is empty", code="FC201")
        kept, rest, (logdet, inv, cond) = choose_square_block(self._blocks(weight.cpu()), rtol)
        if G > 1:  # per-group indices -> indices of the whole input (funnel) or output (augment)
            offset = torch.arange(G)[:, None] * (m if self.kind == "augment" else n)
            kept, rest = (kept + offset).reshape(-1), (rest + offset).reshape(-1)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(
            bias.detach().clone() if bias is not None else torch.zeros(rows, dtype=dtype, device=device),
            requires_grad=False,
        )
        empty = torch.zeros(0, dtype=torch.long, device=device)
        self.register_buffer("kept_index", kept.to(device))
        self.register_buffer("dropped_index", rest.to(device) if m < n else empty)
        self.register_buffer("noise_index", rest.to(device) if m > n else empty.clone())
        for name in ("_logdet", "_inverse"):
            self.register_buffer(name, torch.empty(0, dtype=dtype, device=device), persistent=False)
        self._set_cache(logdet, inv)
        worst = int(torch.argmax(torch.where(torch.isfinite(logdet), cond, torch.inf).reshape(-1))) if G > 1 else 0
        cond, logdet = float(cond.reshape(-1)[worst]), float(logdet.reshape(-1)[worst])
        if not math.isfinite(logdet) or cond > 1.0 / rtol:
            block = {"funnel": f"kept {m} x {m} column block", "augment": f"kept {n} x {n} row block"}.get(
                self.kind, "matrix"
            )
            if G > 1:
                block += f" of group {worst} of {G}"
            raise SingularWeightError(singular_message(f"{m}x{n}", cond, logdet, rtol, block), code="FC201")
        self.condition, self.rtol = cond, float(rtol)
        k = abs(n - m)
        if covariance not in ("diagonal", "full", "auto"):
            raise ValueError(f'covariance must be "diagonal", "full" or "auto", got {covariance!r}')
        full = G == 1 and (covariance == "full" or (covariance == "auto" and k <= FULL_COVARIANCE_MAX))
        if m < n:
            if full:
                q = ConditionalFullNormal(k, m)
            else:
                q = ConditionalDiagonalNormal(k, m) if G == 1 else GroupedConditionalNormal(G, k, m)
            self.dropped = q.to(dtype=dtype, device=device)
        else:
            self.dropped = None
        self.noise = (
            GaussianNoise(G * k, init_log_scale=noise_log_scale).to(dtype=dtype, device=device) if m > n else None
        )
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    @classmethod
    def from_module(cls, module: nn.Linear, **kwargs) -> "FlowLinear":
        """Build from an ``nn.Linear`` (its weights are copied, the module is untouched)."""
        return cls(module.weight, module.bias, **kwargs)

    # -- shapes and noise --------------------------------------------------------------
    @property
    def dropped_features(self) -> int:
        return self.groups * max(self.group_in - self.group_out, 0)

    @property
    def added_features(self) -> int:
        return self.groups * max(self.group_out - self.group_in, 0)

    def noise_shape(self, input_shape: Sequence[int]) -> tuple[int, ...] | None:
        return (*input_shape[:-1], self.added_features) if self.kind == "augment" else None

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...] | None:
        return (*output_shape[:-1], self.dropped_features) if self.kind == "funnel" else None

    def density_parts(self) -> tuple[DensityPart, ...]:
        if self.kind == "funnel":
            return (DensityPart("dropped", "conditional", self.dropped_features, self.out_features),)
        if self.kind == "augment":
            return (DensityPart("noise", "noise", self.added_features),)
        return ()

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Funnel: ``(x_S, y)`` rows; augment: the signal ``(W x)_T`` the noise is added to."""
        with torch.no_grad():
            rows = x.reshape(-1, self.in_features)
            if self.kind == "funnel":
                return {"dropped": (rows[:, self.dropped_index], self.forward(rows))}
            if self.kind == "augment":
                if self.groups == 1:
                    return {"noise": (F.linear(rows, self.weight[self.noise_index]), None)}
                return {"noise": ((self.forward(rows) - self.bias)[:, self.noise_index], None)}
        return {}

    def network_parameters(self) -> list[nn.Parameter]:
        return [self.weight, self.bias]

    def dropped_choice_features(self) -> int:
        return self.in_features if self.kind == "funnel" and self.groups == 1 else 0

    @torch.no_grad()
    def choose_dropped(self, input_std: Tensor) -> bool:
        r"""Keep the inputs that carry the data's spread: the LU pivots of :math:`W\operatorname{diag}(s)`
        (``s`` the inputs' standard deviations) choose :math:`S^c`, so near-constant inputs are the
        dropped ones, which a density models easily (a funnel's :math:`\log p` is the same for every
        choice; its density's difficulty is not). The new block is taken when it is within ``1/rtol``
        and within 100 times the current block's condition number."""
        if not self.dropped_choice_features():
            return False
        W = self.weight.detach()
        std = input_std.detach().reshape(-1).to(device=W.device, dtype=torch.float64)
        if std.numel() != self.in_features or not bool(torch.isfinite(std).all()):
            return False
        scaled = W.double() * std
        _, piv = torch.linalg.lu_factor(scaled.mT)
        perm = _pivot_permutation(piv, self.in_features)
        kept, rest = perm[: self.rank].sort().values, perm[self.rank :].sort().values
        kept, rest = kept.to(self.kept_index.device), rest.to(self.kept_index.device)
        if torch.equal(kept, self.kept_index):
            return False
        logdet, inv, cond = block_inverse(W[:, kept])
        cond = float(cond)
        if not (math.isfinite(float(logdet)) and cond <= 1.0 / self.rtol and cond <= 100.0 * self.condition):
            return False
        self.kept_index.copy_(kept)
        self.dropped_index.copy_(rest)
        self.condition = cond
        self._set_cache(logdet, inv)
        return True

    # -- weight-only quantities --------------------------------------------------------
    def _blocks(self, weight: Tensor) -> Tensor:
        """The weight as ``(G, m, n)`` blocks (``(m, n)`` when ``G = 1``)."""
        return weight if self.groups == 1 else weight.view(self.groups, self.group_out, self.group_in)

    def _local(self, index: Tensor, size: int) -> Tensor:
        """Per-group positions ``(G, -1)`` of global indices into a group-major axis of ``G * size``."""
        return index.view(self.groups, -1) % size

    def block(self, weight: Tensor | None = None) -> Tensor:
        """The square block ``W_{S^c}`` (funnel), ``W_{T^c}`` (augment) or ``W`` (bijection); ``(G, r, r)`` for ``G > 1``."""
        W = self._blocks(self.weight if weight is None else weight)
        if self.groups == 1:
            if self.kind == "funnel":
                return W[:, self.kept_index]
            if self.kind == "augment":
                return W[self.kept_index]
            return W
        G, m, n, r = self.groups, self.group_out, self.group_in, self.rank
        if self.kind == "funnel":
            return W.gather(2, self._local(self.kept_index, n)[:, None, :].expand(G, m, r))
        if self.kind == "augment":
            return W.gather(1, self._local(self.kept_index, m)[:, :, None].expand(G, r, n))
        return W

    def _dropped_columns(self) -> Tensor:
        """``W_S``, the weight's columns of the dropped inputs (funnel; ``(G, m, k)`` for ``G > 1``)."""
        if self.groups == 1:
            return self.weight[:, self.dropped_index]
        G, m, n = self.groups, self.group_out, self.group_in
        local = self._local(self.dropped_index, n)
        return self._blocks(self.weight).gather(2, local[:, None, :].expand(G, m, local.shape[1]))

    def refresh(self) -> None:
        """Recompute ``log|det|`` of the block and its inverse from the current weight (float64, one LU)."""
        with torch.no_grad():
            logdet, inv, _ = block_inverse(self.block())
        self._set_cache(logdet, inv)

    def _set_cache(self, logdet: Tensor, inv: Tensor) -> None:
        w = self.weight
        self._logdet = logdet.sum().to(dtype=w.dtype, device=w.device)
        self._inverse = inv.to(dtype=w.dtype, device=w.device).contiguous()
        self._cache_key = self._key()

    def invalidate_cache(self) -> None:
        """Mark the caches stale; the next use recomputes them (see the class docstring)."""
        self._cache_key = None

    def _key(self) -> tuple:
        return tensor_key(self.weight)

    def _fresh(self) -> None:
        if not self._frozen and self._cache_key != self._key():
            self.refresh()

    _frozen = False

    def logdet(self) -> Tensor:
        """``log|det|`` of the block (summed over groups): differentiable from the current weight while
        it requires grad, else cached."""
        if self.weight.requires_grad:
            return torch.linalg.slogdet(self.block())[1].sum()
        self._fresh()
        return self._logdet

    def block_inverse(self) -> Tensor:
        """The block's inverse (cached; solved from the current weight while it requires grad)."""
        if self.weight.requires_grad:
            return torch.linalg.inv(self.block())
        self._fresh()
        return self._inverse

    def prepare_for_export(self) -> None:
        """Compute the caches now and stop re-checking them (before tracing; see :meth:`release_export`).

        The fused Gaussian density's weight-only parts (:meth:`_diagonal_residual`) are fixed as
        buffers too, so that the traced graph holds no weight-only arithmetic."""
        self.refresh()
        q = self.dropped
        if q is not None and self.fused():
            with torch.no_grad():
                for name, t in zip(self._EXPORT_PARTS, self._diagonal_residual(q)):
                    if t is not None:
                        self.register_buffer(name, t.detach().clone(), persistent=False)
        self._frozen = True

    #: Buffer names of the fixed density parts during an export (see :meth:`prepare_for_export`).
    _EXPORT_PARTS = ("_export_At", "_export_e", "_export_inv_sigma", "_export_neg_row_const")

    def release_export(self) -> None:
        """Undo :meth:`prepare_for_export`: the fixed constants are dropped, the caches follow the weight again."""
        for name in self._EXPORT_PARTS:
            self._buffers.pop(name, None)
        self.__dict__.pop("_frozen", None)
        self.invalidate_cache()

    def sync_network(self) -> None:
        """After the weight was trained: recompute the caches."""
        self.refresh()

    def fused(self) -> bool:
        """True when the dropped part (if any) is the layer's own linear Gaussian (:class:`ConditionalDiagonalNormal`,
        :class:`GroupedConditionalNormal` for ``G > 1``), whose density term is computed from its standardized
        residual (chosen by the part's type)."""
        return self.dropped is None or type(self.dropped) is self.linear_gaussian

    @property
    def linear_gaussian(self) -> type:
        """The type of the layer's own linear-Gaussian density of the dropped coordinates."""
        return ConditionalDiagonalNormal if self.groups == 1 else GroupedConditionalNormal

    def dropped_log_prob(self, d: Tensor, y: Tensor) -> Tensor:
        """``log q(d | y)`` per sample, rows in the last dimension (any ConditionalDensity; fused for the Gaussian)."""
        q = self.dropped
        if type(q) is not self.linear_gaussian:
            return q.log_prob(d, y)
        rows = d.numel() // max(d.shape[0] * q.features, 1)
        if self._frozen and "_export_inv_sigma" in self._buffers:  # prepared for export: fixed parts
            At, e, inv_sigma, neg_row_const = (self._buffers.get(name) for name in self._EXPORT_PARTS)
        else:
            At, e, inv_sigma, neg_row_const = weight_only(
                self, "diagonal_residual", (q.weight, q.bias, q.log_scale), lambda: self._diagonal_residual(q)
            )
        if self.groups == 1:  # r = (d - c) / sigma - (A / sigma) y: one fused multiply-add and one product
            r = torch.addcmul(e, d.reshape(-1, q.features), inv_sigma)
            r = r.addmm_(y.reshape(-1, q.context_features), At)
        else:
            r = (d.reshape(-1, q.features) - q.mean(y.reshape(-1, q.context_features))) * inv_sigma
        r = r.reshape(d.shape[0], -1)
        return torch.sub(neg_row_const if rows == 1 else rows * neg_row_const, torch.linalg.vecdot(r, r), alpha=0.5)

    def _diagonal_residual(self, q: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """Weight-only parts of the diagonal density's residual: ``-(A / sigma)^T`` and ``-c / sigma``
        (one group; None for several, whose density gives its mean), ``1 / sigma`` and minus the
        constant of one row."""
        inv_sigma = torch.exp(-q.log_scale).expand(q.features)
        row_const = q.log_scale.expand(q.features).sum() + 0.5 * LOG_2PI * q.features
        if self.groups > 1:
            return None, None, inv_sigma, -row_const
        At = (q.weight * inv_sigma[:, None]).mT.neg()
        return At, -q.bias * inv_sigma, inv_sigma, -row_const

    def _input_whitening(self) -> tuple[Tensor, Tensor, Tensor] | None:
        r"""The funnel's whole term from its input, when its density is an unkinked full-covariance
        Gaussian (:meth:`ConditionalFullNormal.affine_whitening`): with :math:`d = x_S` and
        :math:`y = Wx + c` the whitened residual is affine in :math:`x`,

        .. math:: r = d P^\top + y M + b = x G^\top + b', \quad G^\top = E_S P^\top + W^\top M,
                  \quad b' = b + c M, \qquad L = -\tfrac12\lVert r\rVert^2 + \log|\det W_{S^c}| - C,

        the same :math:`(m + k)k = nk` multiply-adds as the two products from :math:`(d, y)` in one
        product and no gather. ``(G^T, b', log|det| - C)``, composed in float64 and kept; None for
        other densities, a kink, several groups, while a gradient is recorded for the parts (they are
        not kept then) and while traced (the density reports a kink there): the term is then computed
        from :math:`(d, y)`."""
        q = self._modules.get("dropped")
        if type(q) is not ConditionalFullNormal or self.groups != 1:
            return None
        # every tensor of the layer and its density (read from the dicts: nn.Module's attribute lookup
        # costs a microsecond each, and this runs at every call)
        tensors = (*self._parameters.values(), *self._buffers.values(), *q._parameters.values(), *q._buffers.values())
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return None
        return weight_only(self, "input_whitening", tensors, self._compose_input_whitening)

    def _compose_input_whitening(self) -> tuple[Tensor, Tensor, Tensor] | None:
        parts = self.dropped.affine_whitening()
        if parts is None:
            return None
        Pt, Mt, b, neg_const = (t.double() for t in parts)
        Gt = self.weight.double().mT @ Mt
        Gt.index_add_(0, self.dropped_index, Pt)
        b = torch.addmv(b, Mt.mT, self.bias.double())
        dtype = self.weight.dtype
        return Gt.to(dtype).contiguous(), b.to(dtype), (self.logdet().double() + neg_const).to(dtype)

    def noise_point_constant(self) -> Tensor:
        """``-log N(0; 0, tau^2)`` summed over the added coordinates of one row (augment)."""
        return self.noise.log_scale.expand(self.added_features).sum() + 0.5 * LOG_2PI * self.added_features

    # -- the contract --------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:
            if self.fold_strided and x.dim() >= 3 and not x.is_contiguous() and not self.weight.requires_grad:
                # what F.linear does with a weight that requires grad: fold to 2-D, mm, add the bias
                y = torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t()).view(*x.shape[:-1], self.out_features)
                return y.add_(self.bias)
            return F.linear(x, self.weight, self.bias)
        return _apply(x, self._blocks(self.weight)) + self.bias

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        rows = x.numel() // max(batch * self.in_features, 1)  # vectors the map acts on per sample
        y = self.forward(x)  # the original layer, bit for bit
        whitening = self._input_whitening() if self.kind == "funnel" else None
        if whitening is not None:  # r = G x + b': the whole term in one product from the input, no gather
            Gt, b, row_const = whitening
            r = torch.addmm(b, x.reshape(-1, self.in_features), Gt).reshape(batch, -1)
            norm = torch.linalg.vector_norm(r, dim=1)
            return y, torch.addcmul(row_const if rows == 1 else rows * row_const, norm, norm, value=-0.5)
        logdet = self.logdet()
        const = logdet if rows == 1 else rows * logdet
        if self.kind == "funnel":
            d = x.index_select(-1, self.dropped_index)
            return y, const + self.dropped_log_prob(d, y)
        if self.kind == "bijection":
            return y, const.expand(batch)
        if noise is None:  # deterministic: the point u = 0, -log N(0; 0, tau^2) per row
            return y, (const + rows * self.noise_point_constant()).expand(batch)
        u = self.noise.scale(noise)
        y = y.index_add(-1, self.noise_index, u)
        return y, const - self.noise.log_prob(u)

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        inv = self.block_inverse()
        if self.kind == "augment":
            kept = self.kept_index
            return _apply(y.index_select(-1, kept) - self.bias[kept], inv)
        if self.kind == "bijection":
            return _apply(y - self.bias, inv)
        q = self.dropped
        d = q.sample(y, noise) if sample else q.mean(y)
        rhs = y - self.bias - _apply(d, self._dropped_columns())
        x_kept = _apply(rhs, inv)
        x = y.new_zeros(*y.shape[:-1], self.in_features)
        x = x.index_copy(-1, self.kept_index, x_kept)
        return x.index_copy(-1, self.dropped_index, d.reshape(*y.shape[:-1], -1))

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}{groups}, kind={self.kind}, "
            f"exact={self.exact}"
        )
