"""Random architectures from flowconvert's supported vocabulary, for the fuzzer.

:func:`build` turns a stream of choices into a real ``nn.Module`` (an ``nn.Sequential`` or a
small custom module with residual, concatenation and split structure), in eval mode, with
well-conditioned random weights. The choices come from a :class:`Choices` source:
:class:`HypothesisChoices` draws them from a hypothesis ``data`` object (so failures shrink
to a small architecture), :class:`RandomChoices` from a seeded ``random.Random`` (for
``benchmarks/fuzz.py``, which needs thousands of reproducible models).

Vocabulary: ``nn.Linear`` of all three shapes (square, reducing, increasing; also on the
last dimension of a sequence), ``nn.Conv1d`` / ``nn.Conv2d`` with random kernel, stride,
padding, dilation and groups, LeakyReLU, Tanh, Sigmoid, ELU, SELU, Softplus and PReLU with
positive slopes (as modules and as functions), BatchNorm in eval mode with random running
statistics, tiling max/avg pools and adaptive average pools, scalar affine maps, flatten /
view / reshape / unflatten / transpose / permute, residual sums (fan-out + add or subtract),
concatenation of two branches, split + per-piece maps + concatenation, and two outputs.

Besides the module, :class:`Architecture` records what the SPEC predicts for it: whether the
flow is exact (no augmenting layer anywhere), and whether a bounded-range activation feeds a
layer that drops coordinates (then the inverse can leave the activation's range: issue 11,
defect 8).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAX_NUMEL", "Architecture", "Choices", "HypothesisChoices", "RandomChoices", "build"]

#: Largest per-sample size of any value (keeps autograd Jacobians small).
MAX_NUMEL = 48
BOUNDED = ("tanh", "sigmoid", "elu", "selu", "softplus")


# -- sources of choices ------------------------------------------------------------------------
class Choices:
    """Where the generator's decisions come from."""

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def boolean(self) -> bool:
        return bool(self.integer(0, 1))

    def real(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.integer(0, 1000) / 1000


class RandomChoices(Choices):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class HypothesisChoices(Choices):
    """Choices drawn from ``hypothesis.strategies.data()``: shrinking goes to small integers."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


# -- the result --------------------------------------------------------------------------------
@dataclass
class Architecture:
    model: nn.Module
    input_shape: tuple[int, ...]  # per sample
    exact: bool  # the SPEC's prediction for flow.exact
    range_hazard: bool  # a Tanh/Sigmoid/ELU/SELU/Softplus upstream of a coordinate-dropping layer
    steps: list[str] = field(default_factory=list)  # readable description
    seed: int = 0

    def describe(self) -> str:
        return f"input {self.input_shape}: " + " -> ".join(self.steps)

    def inputs(self, batch: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape), generator=g, dtype=torch.float64).to(dtype)


# -- weights -------------------------------------------------------------------------------------
class _Weights:
    """Well-conditioned random tensors (singular values in [0.6, 1.6]) from a seeded generator."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, dtype=torch.float64)

    def uniform(self, lo: float, hi: float, *shape) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=self.g, dtype=torch.float64)

    def orthogonal(self, n: int) -> torch.Tensor:
        q, r = torch.linalg.qr(self.randn(n, n))
        return q * torch.sign(torch.diagonal(r))

    def matrix(self, m: int, n: int) -> torch.Tensor:
        r = min(m, n)
        s = self.uniform(0.6, 1.6, r)
        return self.orthogonal(m)[:, :r] @ torch.diag(s) @ self.orthogonal(n)[:, :r].T

    def fill_linear(self, layer: nn.Linear) -> nn.Linear:
        with torch.no_grad():
            layer.weight.copy_(self.matrix(*layer.weight.shape))
            if layer.bias is not None:
                layer.bias.copy_(0.3 * self.randn(*layer.bias.shape))
        return layer

    def fill_conv(self, conv: nn.Module) -> nn.Module:
        with torch.no_grad():
            c_out, g = conv.out_channels, conv.groups
            per = conv.weight[0].numel()
            blocks = [self.matrix(c_out // g, per) for _ in range(g)]
            conv.weight.copy_(torch.cat(blocks).reshape(conv.weight.shape))
            if conv.bias is not None:
                conv.bias.copy_(0.3 * self.randn(c_out))
        return conv

    def fill_batch_norm(self, bn: nn.Module) -> nn.Module:
        c = bn.num_features
        with torch.no_grad():
            bn.running_mean.copy_(0.5 * self.randn(c))
            bn.running_var.copy_(self.uniform(0.3, 3.0, c))
            if bn.weight is not None:
                sign = torch.where(self.uniform(0, 1, c) < 0.2, -1.0, 1.0)
                bn.weight.copy_(sign * self.uniform(0.5, 1.5, c))
                bn.bias.copy_(0.3 * self.randn(c))
        return bn


# -- small custom modules ----------------------------------------------------------------------------
def _affine_slope(pieces: list[_Piece]) -> float | None:
    """The slope of a chain made only of scalar affine maps (``Fn("affine", ...)``), else None."""
    slope = 1.0
    for p in pieces:
        if not (isinstance(p.module, Fn) and p.module.name == "affine"):
            return None
        op, c = p.module.args
        slope *= {"mul": c, "add": 1.0, "div": 1.0 / c, "rsub": -1.0, "neg": -1.0}[op]
    return slope


class Fn(nn.Module):
    """A functional call (``torch.tanh``, ``F.leaky_relu`` with arguments, ...) inside ``forward``."""

    def __init__(self, name: str, *args):
        super().__init__()
        self.name, self.args = name, args

    def forward(self, x):
        n, a = self.name, self.args
        if n == "leaky_relu":
            return F.leaky_relu(x, a[0])
        if n == "tanh":
            return torch.tanh(x)
        if n == "sigmoid":
            return x.sigmoid()
        if n == "elu":
            return F.elu(x, a[0])
        if n == "selu":
            return F.selu(x)
        if n == "softplus":
            return F.softplus(x, a[0], a[1])
        if n == "affine":  # op, constant
            op, c = a
            return {
                "mul": lambda: x * c,
                "add": lambda: x + c,
                "div": lambda: x / c,
                "rsub": lambda: c - x,
                "neg": lambda: -x,
            }[op]()
        if n == "flatten":
            return torch.flatten(x, 1)
        if n == "view_flat":
            return x.contiguous().view(x.size(0), -1)
        if n == "reshape_flat":
            return x.reshape(x.shape[0], -1)
        if n == "view":  # to a per-sample shape
            return x.view(x.shape[0], *a[0])
        if n == "transpose":
            return x.transpose(a[0], a[1])
        if n == "permute":
            return x.permute(*a[0])
        raise ValueError(n)

    def extra_repr(self):
        return f"{self.name}{self.args}"


class Functional(nn.Module):
    """The functional form of a layer (``F.linear``, ``F.conv2d``, ``F.batch_norm``, pools, ``F.prelu``) with the
    layer's tensors as parameters/buffers of this module (``get_attr`` nodes), arguments by position or keyword."""

    def __init__(self, layer: nn.Module, keywords: bool):
        super().__init__()
        self.kind, self.keywords = type(layer).__name__, keywords
        self.config = {}
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.PReLU)):
            self.weight = nn.Parameter(layer.weight.detach().clone())
            bias = getattr(layer, "bias", None)
            self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            self.config = {
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "groups": layer.groups,
            }
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            self.register_buffer("running_mean", layer.running_mean.clone())
            self.register_buffer("running_var", layer.running_var.clone())
            self.weight = nn.Parameter(layer.weight.detach().clone()) if layer.weight is not None else None
            self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
            self.config = {"eps": layer.eps}
        if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            self.config = {"kernel_size": layer.kernel_size}
        if isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            self.config = {"output_size": layer.output_size}

    def forward(self, x):
        k, c, kw = self.kind, self.config, self.keywords
        if k == "Linear":
            return F.linear(x, self.weight, bias=self.bias) if kw else F.linear(x, self.weight, self.bias)
        if k in ("Conv1d", "Conv2d"):
            conv = F.conv1d if k == "Conv1d" else F.conv2d
            if kw:
                return conv(
                    x,
                    self.weight,
                    self.bias,
                    stride=c["stride"],
                    padding=c["padding"],
                    dilation=c["dilation"],
                    groups=c["groups"],
                )
            return conv(x, self.weight, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])
        if k == "PReLU":
            return F.prelu(x, self.weight)
        if k.startswith("BatchNorm"):
            if kw:
                return F.batch_norm(
                    x,
                    self.running_mean,
                    self.running_var,
                    weight=self.weight,
                    bias=self.bias,
                    training=False,
                    eps=c["eps"],
                )
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, c["eps"])
        pools = {
            "MaxPool1d": F.max_pool1d,
            "MaxPool2d": F.max_pool2d,
            "AvgPool1d": F.avg_pool1d,
            "AvgPool2d": F.avg_pool2d,
            "AdaptiveAvgPool1d": F.adaptive_avg_pool1d,
            "AdaptiveAvgPool2d": F.adaptive_avg_pool2d,
        }
        if k.startswith("Adaptive"):
            return pools[k](x, c["output_size"])
        if kw:
            return pools[k](x, kernel_size=c["kernel_size"])
        return pools[k](x, c["kernel_size"])

    def extra_repr(self):
        return f"F.{self.kind}, keywords={self.keywords}"


class Residual(nn.Module):
    """``x + f(x)`` (or ``f(x) - x``): a fan-out and a sum."""

    def __init__(self, inner: nn.Module, subtract: bool = False, functional: bool = False):
        super().__init__()
        self.inner, self.subtract, self.functional = inner, subtract, functional

    def forward(self, x):
        h = self.inner(x)
        if self.subtract:
            return h - x
        return torch.add(x, h) if self.functional else x + h


class Branches(nn.Module):
    """``torch.cat([a(x), b(x)], dim)``: a fan-out into two branches, concatenated."""

    def __init__(self, a: nn.Module, b: nn.Module, dim: int = 1):
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], self.dim)


class SplitCat(nn.Module):
    """Split along ``dim``, a map per piece, concatenate again (no fan-out: exact when the pieces are)."""

    def __init__(self, sizes: Sequence[int], a: nn.Module, b: nn.Module, dim: int = 1, chunk: bool = False):
        super().__init__()
        self.sizes, self.a, self.b, self.dim, self.chunk = list(sizes), a, b, dim, chunk

    def forward(self, x):
        if self.chunk:
            p, q = torch.chunk(x, 2, self.dim)
        else:
            p, q = torch.split(x, self.sizes, dim=self.dim)
        return torch.cat((self.a(p), self.b(q)), dim=self.dim)


class TwoOutputs(nn.Module):
    """The model returns two pieces of a split: two outputs, each with its own base density."""

    def __init__(self, sizes: Sequence[int], dim: int = 1):
        super().__init__()
        self.sizes, self.dim = list(sizes), dim

    def forward(self, x):
        a, b = x.split(self.sizes, self.dim)
        return a, b


class Net(nn.Module):
    """Blocks applied in order (a custom module, traced through)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


# -- the generator ----------------------------------------------------------------------------------
@dataclass
class _Piece:
    module: nn.Module
    shape: tuple[int, ...]
    exact: bool = True
    drops: bool = False  # drops coordinates (funnel)
    bounded: bool = False  # a bounded-range activation
    text: str = ""
    plain: bool = True  # a plain nn module (Sequential-friendly)


def _coverage(size: int, k: int, s: int, p: int, d: int) -> tuple[list[int], int]:
    """Per padded position how many windows cover it (1-D), and the number of windows."""
    padded = size + 2 * p
    out = (padded - d * (k - 1) - 1) // s + 1
    cov = [0] * padded
    for o in range(max(out, 0)):
        for t in range(k):
            cov[o * s + t * d] += 1
    return cov, out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Builder:
    def __init__(self, choices: Choices, weights: _Weights):
        self.c, self.w = choices, weights

    # activations ---------------------------------------------------------------------------
    def activation(self, shape) -> _Piece:
        c = self.c
        kind = c.choice(["leaky", "tanh", "sigmoid", "elu", "selu", "softplus", "prelu"])
        functional = c.boolean()
        if kind == "leaky":
            slope = c.choice([0.01, 0.1, 0.2, 0.5, 2.0])
            m = Fn("leaky_relu", slope) if functional else nn.LeakyReLU(slope)
            return _Piece(m, shape, text=f"LeakyReLU({slope})", plain=not functional)
        if kind == "prelu":
            channels = shape[0] if c.boolean() else 1
            m = nn.PReLU(channels)
            with torch.no_grad():
                m.weight.copy_(self.w.uniform(0.05, 2.0, channels))
            return _Piece(m, shape, text=f"PReLU({channels})")
        if kind == "elu":
            alpha = c.choice([0.3, 1.0, 1.7])
            m = Fn("elu", alpha) if functional else nn.ELU(alpha)
            return _Piece(m, shape, bounded=True, text=f"ELU({alpha})", plain=not functional)
        if kind == "softplus":
            beta, threshold = c.choice([0.5, 1.0, 2.0]), c.choice([20.0, 20.0, 15.0])
            m = Fn("softplus", beta, threshold) if functional else nn.Softplus(beta, threshold)
            return _Piece(m, shape, bounded=True, text=f"Softplus({beta}, {threshold})", plain=not functional)
        mods = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU}
        m = Fn(kind) if functional else mods[kind]()
        return _Piece(m, shape, bounded=True, text=kind, plain=not functional)

    def batch_norm(self, shape) -> _Piece:
        cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        bn = self.w.fill_batch_norm(cls(shape[0], affine=self.c.integer(0, 3) > 0))
        return _Piece(bn.eval(), shape, text=f"{cls.__name__}({shape[0]})")

    def affine(self, shape) -> _Piece:
        op = self.c.choice(["mul", "add", "div", "rsub", "neg"])
        const = self.c.choice([-1.5, -0.5, 0.7, 2.0])
        return _Piece(Fn("affine", op, const), shape, text=f"{op} {const}", plain=False)

    # linear ---------------------------------------------------------------------------------
    def linear(self, shape, square_only: bool = False) -> _Piece:
        n = shape[-1]
        rest = math.prod(shape[:-1])
        hi = max(1, MAX_NUMEL // rest)
        m = (
            n
            if square_only
            else self.c.choice([n, self.c.integer(1, max(1, n - 1)), self.c.integer(n, max(n, min(hi, 2 * n + 2)))])
        )
        m = max(1, min(m, hi))
        layer = self.w.fill_linear(nn.Linear(n, m, bias=self.c.integer(0, 3) > 0))
        kind = "square" if m == n else ("reducing" if m < n else "increasing")
        return _Piece(layer, (*shape[:-1], m), exact=m <= n, drops=m < n, text=f"Linear({n}->{m}, {kind})")

    # convolution -------------------------------------------------------------------------------
    def conv(self, shape, same: bool = False) -> _Piece | None:
        c = self.c
        dim = len(shape) - 1
        c_in, spatial = shape[0], shape[1:]
        for _ in range(8):
            groups = c.choice(_divisors(c_in)) if c.integer(0, 2) == 0 else 1
            ks = tuple(c.integer(1, min(3, s)) for s in spatial)
            if same:
                ks = tuple(k if k % 2 else max(1, k - 1) for k in ks)
                stride, dil = (1,) * dim, tuple(c.integer(1, 2) for _ in spatial)
                pad = tuple(d * (k - 1) // 2 for k, d in zip(ks, dil))
                c_out = c_in
                groups = groups if c_out % groups == 0 else 1
            else:
                stride = tuple(c.integer(1, 3) for _ in spatial)
                dil = tuple(c.integer(1, 2) for _ in spatial)
                pad = tuple(c.integer(0, 2) if c.integer(0, 2) == 0 else 0 for _ in spatial)
                c_out = groups * c.integer(1, max(1, 6 // groups))
            covs = [_coverage(s, k, st, p, d) for s, k, st, p, d in zip(spatial, ks, stride, pad, dil)]
            out_spatial = tuple(o for _, o in covs)
            if min(out_spatial) < 1 or c_out * math.prod(out_spatial) > MAX_NUMEL:
                continue
            cls = nn.Conv1d if dim == 1 else nn.Conv2d
            padding_arg = (
                "same"
                if same and c.integer(0, 3) == 0 and all(p * 2 == d * (k - 1) for p, k, d in zip(pad, ks, dil))
                else pad
            )
            conv = cls(
                c_in,
                c_out,
                ks if dim == 2 else ks[0],
                stride=stride if dim == 2 else stride[0],
                padding=padding_arg if isinstance(padding_arg, str) or dim == 2 else padding_arg[0],
                dilation=dil if dim == 2 else dil[0],
                groups=groups,
                bias=c.integer(0, 3) > 0,
            )
            self.w.fill_conv(conv)
            # the SPEC's prediction: padding that a window reaches or overlapping windows add
            # coordinates (bound); a kernel matrix with more rows than columns augments
            pads_used = tiles = dropped_pixels = False
            for (cov, _), s, p in zip(covs, spatial, pad):
                pads_used |= any(cov[i] for i in range(p)) or any(cov[i] for i in range(p + s, len(cov)))
                tiles |= any(v > 1 for v in cov)
                dropped_pixels |= any(cov[i] == 0 for i in range(p, p + s))
            k_cols = (c_in // groups) * math.prod(ks)
            k_rows = c_out // groups
            exact = not pads_used and not tiles and k_rows <= k_cols
            drops = dropped_pixels or k_rows < k_cols
            text = f"{cls.__name__}({c_in}->{c_out}, k={ks}, s={stride}, p={padding_arg}, d={dil}, g={groups})"
            return _Piece(conv, (c_out, *out_spatial), exact=exact, drops=drops, text=text)
        return None

    # pooling ------------------------------------------------------------------------------------
    def pool(self, shape) -> _Piece | None:
        c = self.c
        dim = len(shape) - 1
        spatial = shape[1:]
        kind = c.choice(["max", "avg", "adaptive"])
        if kind == "adaptive":
            out = tuple(c.choice(_divisors(s)) for s in spatial)
            cls = nn.AdaptiveAvgPool1d if dim == 1 else nn.AdaptiveAvgPool2d
            m = cls(out if dim == 2 else out[0])
            window = math.prod(s // o for s, o in zip(spatial, out))
            return _Piece(m, (shape[0], *out), drops=window > 1, text=f"{cls.__name__}({out})")
        ks = tuple(c.choice([d for d in _divisors(s) if d <= 3]) for s in spatial)
        if dim == 1:
            m = nn.MaxPool1d(ks[0]) if kind == "max" else nn.AvgPool1d(ks[0])
        else:
            m = nn.MaxPool2d(ks) if kind == "max" else nn.AvgPool2d(ks)
        out = tuple(s // k for s, k in zip(spatial, ks))
        return _Piece(m, (shape[0], *out), drops=math.prod(ks) > 1, text=f"{type(m).__name__}({ks})")

    # shape operations -------------------------------------------------------------------------------
    def flatten(self, shape) -> _Piece:
        how = self.c.choice(["module", "flatten", "view_flat", "reshape_flat"])
        m = nn.Flatten() if how == "module" else Fn(how)
        return _Piece(m, (math.prod(shape),), text=f"flatten[{how}]", plain=how == "module")

    def unflatten(self, shape) -> _Piece | None:
        (d,) = shape
        options = [(a, d // a) for a in _divisors(d) if d // a > 1]
        if not options:
            return None
        target = self.c.choice(options)
        if d >= 4 and self.c.boolean():  # an image
            a = target[0]
            hw = [(h, (d // a) // h) for h in _divisors(d // a)]
            target = (a, *self.c.choice(hw))
        m = nn.Unflatten(1, target) if self.c.boolean() else Fn("view", target)
        return _Piece(m, target, text=f"unflatten{target}", plain=isinstance(m, nn.Unflatten))

    def permute(self, shape) -> _Piece:
        if len(shape) == 2:
            return _Piece(Fn("transpose", 1, 2), (shape[1], shape[0]), text="transpose(1, 2)", plain=False)
        perm = self.c.choice([(0, 1, 3, 2), (0, 2, 1, 3), (0, 3, 2, 1)])
        out = tuple(shape[p - 1] for p in perm[1:])
        return _Piece(Fn("permute", perm), out, text=f"permute{perm}", plain=False)

    # structure -----------------------------------------------------------------------------------------
    def same_shape(self, shape) -> _Piece:
        """A shape-preserving map for residual branches and split pieces."""
        options = ["act", "bn", "affine", "linear"] + (["conv"] if len(shape) > 1 else [])
        kind = self.c.choice(options)
        if kind == "conv":
            piece = self.conv(shape, same=True)
            if piece is not None and piece.shape == shape:
                return piece
            kind = "act"
        if kind == "linear":
            return self.linear(shape, square_only=True)
        return {"act": self.activation, "bn": self.batch_norm, "affine": self.affine}[kind](shape)

    def chain(self, pieces: list[_Piece], shape) -> _Piece:
        if not pieces:
            return _Piece(nn.Identity(), shape, text="identity")
        if len(pieces) == 1:
            return pieces[0]
        return _Piece(
            nn.Sequential(*(p.module for p in pieces)),
            pieces[-1].shape,
            exact=all(p.exact for p in pieces),
            drops=any(p.drops for p in pieces),
            bounded=any(p.bounded for p in pieces),
            text=" -> ".join(p.text for p in pieces),
            plain=True,
        )

    def residual(self, shape) -> _Piece:
        parts = [self.same_shape(shape) for _ in range(self.c.integer(1, 2))]
        inner = self.chain(parts, shape)
        # f(x) - x with f an activation alone is exactly 0 wherever f is the identity: a degenerate
        # (constant) map; subtract only around a branch that mixes coordinates or scales them
        mixes = any(
            not isinstance(p.module, (nn.LeakyReLU, nn.ELU, nn.SELU, nn.PReLU, nn.Softplus, nn.Tanh, nn.Sigmoid, Fn))
            for p in parts
        )
        subtract, functional = self.c.integer(0, 3) == 0 and mixes, self.c.boolean()
        # a branch of scalar affine maps with slope -1 (x + (c - x)) or +1 (x - (x + c)) makes the
        # sum a constant: degenerate; flip the sign then (no extra draw, other models stay the same)
        slope = _affine_slope(parts)
        if slope is not None and math.isclose(slope, 1.0 if subtract else -1.0):
            subtract = not subtract
        hazard_inside = inner.bounded  # the sum is a funnel after the branch
        text = f"residual[{'sub' if subtract else 'add'}]({inner.text})"
        return _Piece(
            Residual(inner.module, subtract, functional),
            shape,
            exact=False,
            drops=True,
            bounded=hazard_inside,
            text=text,
            plain=False,
        )

    def branches(self, shape) -> _Piece | None:
        """Two branches of the same input, concatenated along dim 1."""
        if len(shape) == 1:
            a, b = self.linear(shape), self.linear(shape)
            if a.shape[0] + b.shape[0] > MAX_NUMEL:
                return None
            out = (a.shape[0] + b.shape[0],)
        else:
            a = self.same_shape(shape) if self.c.boolean() else _Piece(nn.Identity(), shape, text="identity")
            b = self.same_shape(shape)
            if 2 * math.prod(shape) > MAX_NUMEL:
                return None
            out = (2 * shape[0], *shape[1:])
        return _Piece(
            Branches(a.module, b.module),
            out,
            exact=False,
            drops=a.drops or b.drops,
            bounded=a.bounded or b.bounded,
            text=f"cat[{a.text} | {b.text}]",
            plain=False,
        )

    def split_cat(self, shape) -> _Piece | None:
        n = shape[0]
        if n < 2:
            return None
        chunk = self.c.integer(0, 2) == 0
        first = (n + 1) // 2 if chunk else self.c.integer(1, n - 1)
        sizes = [first, n - first]
        pa = (sizes[0], *shape[1:])
        pb = (sizes[1], *shape[1:])
        a = self.same_shape(pa)
        b = self.same_shape(pb) if self.c.boolean() else _Piece(nn.Identity(), pb, text="identity")
        return _Piece(
            SplitCat(sizes, a.module, b.module, chunk=chunk),
            shape,
            exact=a.exact and b.exact,
            drops=a.drops or b.drops,
            bounded=a.bounded or b.bounded,
            text=f"split{sizes}[{a.text} | {b.text}]",
            plain=False,
        )

    # one step -----------------------------------------------------------------------------------
    def step(self, shape) -> _Piece | None:
        c = self.c
        if len(shape) == 1:
            kind = c.choice(
                ["linear", "linear", "act", "act", "bn", "affine", "residual", "branches", "split", "unflatten"]
            )
        else:
            kind = c.choice(
                [
                    "conv",
                    "conv",
                    "act",
                    "act",
                    "bn",
                    "pool",
                    "residual",
                    "branches",
                    "split",
                    "flatten",
                    "permute",
                    "linear",
                    "affine",
                ]
            )
        builder = {
            "linear": self.linear,
            "act": self.activation,
            "bn": self.batch_norm,
            "affine": self.affine,
            "residual": self.residual,
            "branches": self.branches,
            "split": self.split_cat,
            "unflatten": self.unflatten,
            "conv": self.conv,
            "pool": self.pool,
            "flatten": self.flatten,
            "permute": self.permute,
        }[kind]
        piece = builder(shape)
        if piece is not None and isinstance(piece.module, _FUNCTIONAL) and c.integer(0, 3) == 0:
            piece.module = Functional(piece.module, keywords=c.boolean())
            piece.text = f"F[{piece.text}]"
            piece.plain = False
        return piece


_FUNCTIONAL = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.PReLU,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)


def build(choices: Choices, seed: int | None = None) -> Architecture:
    """A random convertible architecture (float64, eval mode) and the SPEC's predictions for it."""
    if seed is None:
        seed = choices.integer(0, 2**31 - 1)
    builder = _Builder(choices, _Weights(seed))
    c = choices
    start = c.choice(["flat", "seq", "img"])
    if start == "flat":
        shape: tuple[int, ...] = (c.integer(1, 12),)
    elif start == "seq":
        shape = (c.integer(1, 4), c.integer(1, 10))
    else:
        shape = (c.integer(1, 3), c.integer(1, 4), c.integer(1, 4))
    input_shape = shape
    pieces: list[_Piece] = []
    for _ in range(c.integer(1, 6)):
        piece = builder.step(shape)
        if piece is None or math.prod(piece.shape) > MAX_NUMEL or math.prod(piece.shape) < 1:
            continue
        pieces.append(piece)
        shape = piece.shape
    if not pieces:
        pieces.append(builder.activation(shape))
    two = shape[0] >= 2 and c.integer(0, 5) == 0
    if two:
        first = c.integer(1, shape[0] - 1)
        pieces.append(
            _Piece(
                TwoOutputs([first, shape[0] - first]), shape, text=f"outputs{[first, shape[0] - first]}", plain=False
            )
        )
    exact = all(p.exact for p in pieces)
    # a bounded activation before (or inside, before the sum of) a layer that drops coordinates
    hazard, seen_bounded = False, False
    for p in pieces:
        if p.drops and (seen_bounded or p.bounded):
            hazard = True
        seen_bounded |= p.bounded
    modules = [p.module for p in pieces]
    if all(p.plain for p in pieces) and c.boolean():
        model: nn.Module = nn.Sequential(*modules)
    else:
        model = Net(modules)
    model = model.double().eval()
    return Architecture(model, input_shape, exact, hazard, [p.text for p in pieces], seed)
