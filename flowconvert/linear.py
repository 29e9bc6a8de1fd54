r"""Flowified linear map :math:`y = W x + b`, :math:`W \in \mathbb R^{m\times n}`.

At construction :math:`W = U \operatorname{diag}(s) V^\top` is factored once (full SVD in
float64); :math:`r=\min(m,n)`, the first :math:`r` columns of :math:`U, V` span the range
and row space, the rest are the complements :math:`U_\perp` (when :math:`m>n`) and
:math:`V_\perp` (when :math:`m<n`). Three shapes:

* :math:`m=n`, bijection (exact): :math:`L = \sum\log s`.
* :math:`m<n`, funnel (exact): the dropped coordinates :math:`d = V_\perp^\top x` get a
  conditional density :math:`q(d\mid y)`; :math:`L = \sum\log s + \log q(d\mid y)`.
* :math:`m>n`, augmentation (bound): :math:`y = Wx + b + U_\perp u`,
  :math:`u\sim\mathcal N(0,\tau^2)`; :math:`L = \sum\log s - \log\mathcal N(u;0,\tau^2)`.

The output is always ``F.linear(x, weight, bias)`` with the original weight. With
:math:`q = \mathcal N(Ay+c, \sigma^2)` the standardized residual of a funnel is affine in
:math:`x`, :math:`r = Mx + e` with :math:`M = \sigma^{-1}(V_\perp^\top - AW)`,
:math:`e = -\sigma^{-1}(Ab+c)`, so when no gradient is needed the likelihood pass is one
matrix product with the cached stack :math:`[W; M]` (computed as the original
``F.linear`` for :math:`y` plus one product with :math:`M` for :math:`r`, so :math:`y` stays
bit for bit the original output).

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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .core import DensityPart, FlowLayer
from .densities import LOG_2PI, ConditionalDiagonalNormal, GaussianNoise, sum_except_batch
from .errors import SingularWeightError

__all__ = ["FlowLinear", "DEFAULT_RTOL"]

#: Singular values at or below ``DEFAULT_RTOL * s_max`` are treated as zero.
DEFAULT_RTOL = 1e-6


class FlowLinear(FlowLayer):
    """Flowified ``nn.Linear`` / ``F.linear`` acting on the last dimension.

    Args:
        weight: ``(out_features, in_features)`` weight, copied (the caller's tensor is untouched).
        bias: optional ``(out_features,)`` bias.
        rtol: relative tolerance below which a singular value counts as zero (refused, FC201).
        noise_log_scale: initial ``log tau`` of the augmentation noise (increasing maps).

    Attributes:
        kind: ``"bijection"``, ``"funnel"`` (reducing) or ``"augment"`` (increasing).
        dropped: :class:`ConditionalDiagonalNormal` of the dropped coordinates (funnel).
        noise: :class:`GaussianNoise` of the added coordinates (augment).
    """

    orthogonal_factors = ("U", "V")
    #: Set by :meth:`prepare_for_export`: the caches are final, parameter versions are not checked.
    _frozen = False

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        rtol: float = DEFAULT_RTOL,
        noise_log_scale: float = 0.0,
    ):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"FlowLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        weight = weight.detach()
        dtype, device = weight.dtype, weight.device
        m, n = weight.shape
        U, s, Vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=True)
        if s.numel() == 0 or s.min() <= rtol * s.max():
            smin = s.min().item() if s.numel() else 0.0
            smax = s.max().item() if s.numel() else 0.0
            raise SingularWeightError(
                f"weight of shape {m}x{n} has smallest singular value {smin:.3g} <= {rtol:g} x largest "
                f"({smax:.3g}); the map is not injective on its row space, log|det| would be -inf",
                code="FC201",
            )
        self.in_features, self.out_features, self.rank = n, m, min(m, n)
        self.kind = "bijection" if m == n else ("funnel" if m < n else "augment")
        self.exact = m <= n
        as_param = lambda t: nn.Parameter(t.to(dtype=dtype, device=device).contiguous(), requires_grad=False)
        self.U = as_param(U)
        self.V = as_param(Vh.mT)
        self.log_s = as_param(s.log())
        self.bias = as_param(bias.detach().clone() if bias is not None else torch.zeros(m, dtype=dtype))
        self.register_buffer("weight", weight.clone())
        k = abs(n - m)
        self.dropped = ConditionalDiagonalNormal(k, m).to(dtype=dtype, device=device) if m < n else None
        self.noise = GaussianNoise(k, init_log_scale=noise_log_scale).to(dtype=dtype, device=device) if m > n else None
        for name in ("_pinv", "_stack", "_stack_bias", "_noise_map", "_row_const"):
            self.register_buffer(name, torch.empty(0, dtype=dtype, device=device), persistent=False)
        self._cache_key: tuple | None = None

    @classmethod
    def from_module(cls, module: nn.Linear, **kwargs) -> "FlowLinear":
        """Build from an ``nn.Linear`` (its weights are copied, the module is untouched)."""
        return cls(module.weight, module.bias, **kwargs)

    # -- shapes and noise --------------------------------------------------------------
    @property
    def dropped_features(self) -> int:
        return max(self.in_features - self.out_features, 0)

    @property
    def added_features(self) -> int:
        return max(self.out_features - self.in_features, 0)

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
        with torch.no_grad():
            rows = x.reshape(-1, self.in_features)
            W, _, _, V_perp = self._factors()
            if self.kind == "funnel":
                return {"dropped": (rows @ V_perp, F.linear(rows, W, self.bias))}
            if self.kind == "augment":
                # the signal's first `added_features` output coordinates (scale reference for tau)
                return {"noise": (F.linear(rows, W)[:, : self.added_features], None)}
        return {}

    def network_parameters(self) -> list[nn.Parameter]:
        params = [self.log_s, self.bias]
        for name in self.orthogonal_factors:
            if parametrize.is_parametrized(self, name):
                params.append(self.parametrizations[name].original)
        return params

    # -- weight-only quantities --------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W, pinv, U_perp, V_perp)`` from the current factors (differentiable)."""
        r = self.rank
        U, V, s = self.U, self.V, self.log_s.exp()
        if parametrize.is_parametrized(self):
            W = (U[:, :r] * s) @ V[:, :r].mT
        else:
            W = self.weight
        pinv = (V[:, :r] / s) @ U[:, :r].mT
        return W, pinv, U[:, r:], V[:, r:]

    def fused(self) -> bool:
        """True when the fused linear-Gaussian pass applies: the dropped part (if any) is a
        :class:`ConditionalDiagonalNormal` (chosen by the part's type; any other
        :class:`~flowconvert.densities.ConditionalDensity` goes through its own ``log_prob``)."""
        return self.dropped is None or type(self.dropped) is ConditionalDiagonalNormal

    def _needs_graph(self) -> bool:
        if "parametrizations" in self._modules:  # inside network_training
            return True
        if not self.fused():
            return True
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    # -- cache bookkeeping: the caches follow every in-place change of the tensors they are
    # computed from (optimizer steps, load_state_dict, calibrate), tracked by version counters.
    def _version_key(self) -> tuple:
        watched = self.__dict__.get("_watched")
        if watched is None:  # the tensors the caches depend on, collected once
            tensors = [*self._parameters.values(), self._buffers["weight"]]
            for density in (self.dropped, self.noise):
                if density is not None:
                    tensors.extend(density.parameters())
            watched = self.__dict__["_watched"] = tuple(tensors)
        return tuple([t._version for t in watched])

    def invalidate_cache(self) -> None:
        """Forget the cached weight-only tensors (needed only after replacing a parameter object
        of a density by hand; in-place changes are tracked automatically)."""
        self.__dict__.pop("_watched", None)
        self._cache_key = None

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda() replace tensors
        self.invalidate_cache()
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, (Tensor, nn.Module)):  # a tensor or density replaced: start over
            self.__dict__.pop("_watched", None)
            self.__dict__["_cache_key"] = None
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param) -> None:
        self.__dict__.pop("_watched", None)
        self.__dict__["_cache_key"] = None
        super().register_parameter(name, param)

    def _refresh(self) -> None:
        """Recompute the cached weight-only tensors when any parameter changed."""
        if self._frozen and "_fast" in self.__dict__:
            return
        key = self._version_key()
        if key == self._cache_key and "_fast" in self.__dict__:
            return
        with torch.no_grad():
            W, pinv, U_perp, V_perp = self._factors()
            logdet = self.log_s.sum()
            self._pinv = pinv.contiguous()
            if self.kind == "funnel" and self.fused():
                q = self.dropped
                inv_sigma = torch.exp(-q.log_scale)
                M = (V_perp.mT - q.weight @ W) * inv_sigma[:, None]
                e = -(q.weight @ self.bias + q.bias) * inv_sigma
                self._stack = torch.cat([W, M]).contiguous()
                self._stack_bias = torch.cat([self.bias, e])
                self._residual = (self._stack[self.out_features:], self._stack_bias[self.out_features:])
                const = logdet - q.log_scale.sum() - 0.5 * LOG_2PI * q.features
            elif self.kind == "funnel":
                self._residual = (None, None)
                const = logdet
            elif self.kind == "augment":
                tau = self.noise.log_scale.exp().expand(self.noise.features)
                self._noise_map = (U_perp * tau).contiguous()
                const = logdet + self.noise.log_scale.expand(self.noise.features).sum() + 0.5 * LOG_2PI * self.noise.features
            else:
                const = logdet
            self._row_const = const.reshape(())
        # what the fast path reads, in one plain tuple (no nn.Module attribute lookups per call)
        residual = self._residual if self.kind == "funnel" else (None, None)
        self.__dict__["_fast"] = (self.weight, self.bias, self._row_const, *residual, self._noise_map)
        self._cache_key = key

    def _cached(self) -> tuple:
        """``(weight, bias, row_const, residual_weight, residual_bias, noise_map)``, refreshed when stale."""
        if not self._frozen and self._version_key() != self._cache_key:
            self._refresh()
        fast = self.__dict__.get("_fast")
        if fast is None:
            self._refresh()
            fast = self.__dict__["_fast"]
        return fast

    def prepare_for_export(self) -> None:
        """Compute the caches now and stop re-checking them (on a copy about to be traced).

        Under ``torch.export`` the parameters are fake tensors whose ``_version`` says nothing
        about the real ones, so the staleness check in :meth:`_refresh` could trace the whole
        cache computation into the exported graph.
        """
        with torch.no_grad():
            self._cache_key = None
            self._refresh()
        self._frozen = True

    def sync_network(self) -> None:
        """After the factors were trained: set ``weight`` to ``U diag(s) V^T`` and refresh caches."""
        with torch.no_grad():
            r = self.rank
            self.weight.copy_((self.U[:, :r] * self.log_s.exp()) @ self.V[:, :r].mT)
        self.invalidate_cache()

    # -- the contract --------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        weight = self._factors()[0] if parametrize.is_parametrized(self) else self.weight
        return F.linear(x, weight, self.bias)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        rows = x.numel() // max(batch * self.in_features, 1)  # vectors the map acts on per sample
        if self._needs_graph():
            return self._call_graph(x, noise, rows)
        weight, bias, row_const, res_weight, res_bias, noise_map = self._cached()
        const = row_const if rows == 1 else rows * row_const
        y = F.linear(x, weight, bias)  # the original layer, bit for bit
        if res_weight is not None:  # funnel
            # the residual rows M, e of the cached stack [W; M]: together with y, n x n multiply-adds
            res = F.linear(x, res_weight, res_bias).reshape(batch, -1)
            return y, torch.add(const, torch.linalg.vecdot(res, res), alpha=-0.5)
        ll = const.expand(batch)
        if self.kind == "augment" and noise is not None:
            if torch.is_grad_enabled() and (x.requires_grad or noise.requires_grad):
                y = y + F.linear(noise, noise_map)
                ll = ll + 0.5 * sum_except_batch(noise * noise)
            else:  # y is ours: accumulate U_perp tau eps into it, no temporaries
                y.view(-1, self.out_features).addmm_(noise.reshape(-1, self.added_features), noise_map.mT)
                flat = noise.reshape(batch, -1)
                ll = ll + 0.5 * torch.linalg.vecdot(flat, flat)
        return y, ll

    def _call_graph(self, x: Tensor, noise: Tensor | None, rows: int) -> tuple[Tensor, Tensor]:
        W, _, U_perp, V_perp = self._factors()
        y = F.linear(x, W, self.bias)
        ll = (rows * self.log_s.sum()).expand(x.shape[0])
        if self.kind == "funnel":
            d = F.linear(x, V_perp.mT)
            ll = ll + self.dropped.log_prob(d, y)  # any ConditionalDensity
        elif self.kind == "augment":
            if noise is None:
                noise = x.new_zeros(x.shape[:-1] + (self.added_features,))
            u = self.noise.scale(noise)
            y = y + F.linear(u, U_perp)
            ll = ll - self.noise.log_prob(u)
        return y, ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        if self._needs_graph():
            _, pinv, _, V_perp = self._factors()
        else:
            self._refresh()
            pinv, V_perp = self._pinv, self.V[:, self.rank:]
        x = F.linear(y - self.bias, pinv)
        if self.kind == "funnel":
            q = self.dropped
            if sample:
                d = q.sample(y, noise)
            else:
                d = q.mean(y)
            x = x + F.linear(d, V_perp)
        return x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, exact={self.exact}"
