r"""Exact elementwise bijections: BatchNorm (eval), ELU/SELU, Tanh, Sigmoid, Softplus, PReLU, scalar affine.

A strictly monotone map :math:`f` applied to every coordinate is a bijection onto its range,
with a diagonal Jacobian, so

.. math:: L(x) = \sum_i \log |f'(x_i)| , \qquad x = f^{-1}(y) \text{ coordinate by coordinate.}

The forward pass always calls the same torch function as the original layer, so the output
is bit-for-bit the original. The log-derivatives are written so that they stay finite for
every finite input (no ``log(0)`` when the activation saturates):

* sigmoid: :math:`\sigma'(x) = \sigma(x)\sigma(-x)`, so
  :math:`\log\sigma'(x) = \log\sigma(x) + \log\sigma(-x)` (two ``logsigmoid`` calls).
* tanh: :math:`\tanh'(x) = 4e^{-2x}/(1+e^{-2x})^2`, so
  :math:`\log\tanh'(x) = 2(\log 2 - x - \operatorname{softplus}(-2x))`.
* softplus with ``beta``: :math:`f'(x) = \sigma(\beta x)`, :math:`\log f' = \log\sigma(\beta x)`
  (0 where torch switches to the identity, ``beta * x > threshold``).
* ELU: :math:`\log f'(x) = \log\alpha + x` for :math:`x \le 0`, 0 otherwise.

Inverses. Where the forward pass saturates in floating point (``tanh(x) == 1`` for
:math:`x \gtrsim 9.1` in float32, ``sigmoid(x) == 1`` for :math:`x \gtrsim 16.6`), the
information is gone: the inverses clamp their argument into the open range (the largest
float below 1, etc.) and return a large finite value instead of ``inf``. Round trips are
exact only where the forward pass is not saturated.

Inverses of flows. A layer that drops coordinates after one of these activations (a
reducing linear map, a strided convolution, pooling) fills them in its inverse by
conditional means or Gaussian draws, which can leave the activation's range: the
activation's inverse clamps them, and ``flow(flow.inverse(y))`` then differs from ``y``.
Such flows have ``flow.exact_inverse == False`` (the report notes the activation); their
log-density is unaffected. Each layer's ``output_range`` states its interval.

Ranges. Tanh, Sigmoid, ELU and Softplus map onto an interval, not the whole line, so with a
density on their output the induced density of :math:`x` integrates to the output density's
mass on that interval (for a standard normal directly after a sigmoid: :math:`\Phi(1) -
\Phi(0) \approx 0.34`). The contribution is still the exact change of variables; the layers
after it and the base density decide how much mass the model puts outside the range.

>>> import torch
>>> layer = FlowTanh()
>>> y, ll = layer.call_and_ll(torch.tensor([[0.0, 30.0]]))
>>> bool(torch.isfinite(ll).all())
True
>>> bool(torch.allclose(layer.inverse(layer(torch.tensor([[0.5]]))), torch.tensor([[0.5]])))
True
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import FlowLayer, weight_only, zero_ll
from .densities import sum_except_batch
from .errors import LayerConfigurationError

__all__ = [
    "FlowBatchNorm",
    "FlowELU",
    "FlowTanh",
    "FlowSigmoid",
    "FlowSoftplus",
    "FlowPReLU",
    "FlowScalarAffine",
]


class _Elementwise(FlowLayer):
    """Shared plumbing: ``L = sum log|f'(x)|``; subclasses define ``forward``, ``log_derivative``, ``inverse``."""

    exact = True
    #: ``(low, high)``: the open interval the outputs lie in, or None for the whole line. An
    #: inverse given values outside it clamps them (see :attr:`FlowModel.exact_inverse`).
    output_range: tuple[float, float] | None = None

    @classmethod
    def from_module(cls, module: nn.Module | None = None) -> "_Elementwise":
        """The layer of ``module`` (a parameter-free activation by default)."""
        return cls()

    def log_derivative(self, x: Tensor) -> Tensor:
        """Elementwise :math:`\\log|f'(x)|`, same shape as ``x``."""
        raise NotImplementedError

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward(x), sum_except_batch(self.log_derivative(x))


def _below_one(t: Tensor) -> float:
    """The largest float of ``t``'s dtype below 1."""
    return 1.0 - torch.finfo(t.dtype).eps / 2


# ---------------------------------------------------------------------------------------
class FlowBatchNorm(FlowLayer):
    r"""``nn.BatchNorm1d/2d/3d`` in eval mode: per-channel affine :math:`y = a_c x + b_c` (exact).

    :math:`a_c = w_c / \sqrt{v_c + \epsilon}`, :math:`b_c = \beta_c - \mu_c a_c` from the running
    mean :math:`\mu`, running variance :math:`v`, weight :math:`w` and bias :math:`\beta`
    (``affine=False``: :math:`w = 1, \beta = 0`). Channels are dimension 1;
    :math:`L = (\text{positions per channel}) \sum_c \log|a_c|`. A channel with
    :math:`a_c = 0` is refused (FC210), and so is a module in training mode or without
    running statistics (FC211).

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3).eval()
    >>> flow = FlowBatchNorm.from_module(bn)
    >>> x = torch.randn(4, 3)
    >>> torch.equal(flow(x), bn(x))
    True
    """

    exact = True

    def __init__(
        self,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        mean = running_mean.detach().clone()
        var = running_var.detach().clone()
        c = mean.numel()
        self.num_features = c
        self.eps = float(eps)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)
        self.register_buffer("weight", weight.detach().clone() if weight is not None else None)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        with torch.no_grad():
            scale, _ = self._affine()
            bad = ~((scale != 0) & torch.isfinite(scale))
        if bad.any():
            channels = bad.nonzero().flatten().tolist()
            raise LayerConfigurationError(
                f"BatchNorm scale weight/sqrt(running_var+eps) is zero or not finite for channel(s) "
                f"{channels[:10]}{'...' if len(channels) > 10 else ''}; the map is not invertible",
                code="FC210",
            )

    @classmethod
    def from_module(cls, module: nn.modules.batchnorm._BatchNorm) -> "FlowBatchNorm":
        if module.training or module.running_mean is None or module.running_var is None:
            why = "is in training mode" if module.training else "has no running statistics (track_running_stats=False)"
            raise LayerConfigurationError(f"{type(module).__name__} {why}", code="FC211")
        return cls(module.running_mean, module.running_var, module.weight, module.bias, module.eps)

    def _affine(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(a, b)`` with ``y = a x + b``."""
        inv_std = torch.rsqrt(self.running_var + self.eps)
        a = inv_std if self.weight is None else self.weight * inv_std
        b = -self.running_mean * a
        if self.bias is not None:
            b = b + self.bias
        return a, b

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        return t.reshape(1, -1, *([1] * (like.dim() - 2)))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def log_abs_det(self) -> Tensor:
        r""":math:`\sum_c \log|a_c| = \sum_c \log|w_c| - \tfrac12 \sum_c \log(v_c + \epsilon)` (without
        forming :math:`a`), kept until a statistic or the weight changes (:func:`~flowconvert.core.weight_only`)."""

        def compute() -> Tensor:
            log_abs = torch.log(self.running_var + self.eps).sum().mul(-0.5)
            return log_abs if self.weight is None else log_abs + self.weight.abs().log().sum()

        return weight_only(self, "log_abs_det", (self.running_var, self.weight), compute)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_abs = self.log_abs_det()
        positions = x[0].numel() // self.num_features
        return self.forward(x), (positions * log_abs).to(x.dtype).expand(x.shape[0])

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        a, b = self._affine()
        return (y - self._view(b, y)) / self._view(a, y)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, eps={self.eps:g}, exact=True"


# ---------------------------------------------------------------------------------------
class FlowELU(_Elementwise):
    r"""``nn.ELU(alpha)`` (and ``nn.SELU`` via ``scale``): :math:`y = s\,x` for :math:`x>0`,
    :math:`s\,\alpha(e^x - 1)` otherwise; needs :math:`\alpha > 0` (FC212).

    :math:`\log f'(x) = \log s + (\log\alpha + x)[x\le 0]`. The range of the negative branch is
    :math:`(-s\alpha, 0)`; the inverse :math:`\log(1 + y/(s\alpha))` clamps :math:`y/(s\alpha)`
    above :math:`-1` (outputs that rounded to :math:`-s\alpha` come back as a large negative
    finite value).

    >>> import torch
    >>> x = torch.tensor([[-1.5, 0.5]])
    >>> torch.allclose(FlowELU(0.7).inverse(FlowELU(0.7)(x)), x)
    True
    """

    def __init__(self, alpha: float = 1.0, scale: float = 1.0, selu: bool = False):
        super().__init__()
        alpha, scale = float(alpha), float(scale)
        if not (alpha > 0 and math.isfinite(alpha)) or not (scale > 0 and math.isfinite(scale)):
            raise LayerConfigurationError(f"ELU alpha={alpha:g}, scale={scale:g}: both must be > 0", code="FC212")
        self.alpha, self.scale, self.selu = alpha, scale, bool(selu)
        self.log_alpha, self.log_scale = math.log(alpha), math.log(scale)
        self.output_range = (-scale * alpha, math.inf)

    @classmethod
    def from_module(cls, module: nn.Module) -> "FlowELU":
        if isinstance(module, nn.SELU):
            return cls.selu()
        return cls(module.alpha)

    @classmethod
    def selu(cls) -> "FlowELU":
        """``nn.SELU`` (fixed alpha and scale of Klambauer et al.)."""
        return cls(1.6732632423543772848170429916717, 1.0507009873554804934193349852946, selu=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.selu:
            return F.selu(x)
        y = F.elu(x, self.alpha)
        return y if self.scale == 1.0 else self.scale * y

    def log_derivative(self, x: Tensor) -> Tensor:
        neg = torch.where(x > 0, torch.zeros_like(x), x + self.log_alpha)
        return neg + self.log_scale if self.scale != 1.0 else neg

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        u = y / self.scale if self.scale != 1.0 else y
        ratio = (u / self.alpha).clamp_min(-_below_one(u))
        return torch.where(u > 0, u, torch.log1p(ratio))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, scale={self.scale:g}, exact=True"


class FlowTanh(_Elementwise):
    r"""``nn.Tanh`` (exact). :math:`\log\tanh'(x) = 2(\log 2 - x - \operatorname{softplus}(-2x))`;
    inverse ``atanh`` of the output clamped into :math:`(-1, 1)`."""

    output_range = (-1.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def log_derivative(self, x: Tensor) -> Tensor:
        return 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        top = _below_one(y)
        return torch.atanh(y.clamp(-top, top))


class FlowSigmoid(_Elementwise):
    r"""``nn.Sigmoid`` (exact). :math:`\log\sigma'(x) = \log\sigma(x) + \log\sigma(-x)`;
    inverse ``logit`` of the output clamped into :math:`(0, 1)`."""

    output_range = (0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def log_derivative(self, x: Tensor) -> Tensor:
        return F.logsigmoid(x) + F.logsigmoid(-x)

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        tiny = torch.finfo(y.dtype).tiny
        y = y.clamp(tiny, _below_one(y))
        return torch.log(y) - torch.log1p(-y)


class FlowSoftplus(_Elementwise):
    r"""``nn.Softplus(beta, threshold)`` exactly as torch computes it (exact).

    :math:`y = \tfrac1\beta\log(1 + e^{\beta x})` where :math:`\beta x \le` ``threshold``, else
    :math:`y = x`. :math:`\log f'(x) = \log\sigma(\beta x)` on the smooth branch, 0 on the
    linear one. (torch's switch leaves a jump of :math:`\log(1+e^{-t})/\beta` at
    :math:`\beta x = t`, about :math:`2\cdot10^{-9}/\beta` for the default :math:`t = 20`:
    below float32 resolution there, and a negligible non-monotone sliver in float64.) A
    threshold whose jump exceeds float32 resolution, :math:`\log(1+e^{-t}) > 2^{-23}\max(|t|, 1)`
    (:math:`t \lesssim 13.5`), makes the map visibly non-injective (outputs just above
    :math:`t/\beta` have two preimages) and is refused (FC212).
    Inverse, stably: :math:`x = y + \tfrac1\beta\log(-\operatorname{expm1}(-\beta y))`; an
    output that underflowed to 0 (:math:`\beta x \lesssim -103` in float32) has no finite
    preimage and is clamped to the smallest positive float.

    >>> import torch
    >>> m = torch.nn.Softplus(beta=2.0)
    >>> x = torch.linspace(-5, 15, 9).reshape(1, 9)
    >>> torch.equal(FlowSoftplus.from_module(m)(x), m(x))
    True
    """

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__()
        beta = float(beta)
        if not (beta > 0 and math.isfinite(beta)):
            raise LayerConfigurationError(f"Softplus beta={beta:g} must be > 0", code="FC212")
        t = float(threshold)
        jump = max(-t, 0.0) + math.log1p(math.exp(-abs(t))) if math.isfinite(t) else (0.0 if t > 0 else math.inf)
        if not jump <= 2.0**-23 * max(abs(t), 1.0):
            raise LayerConfigurationError(
                f"Softplus threshold={t:g}: torch switches to the identity at beta * x = threshold with a downward "
                f"jump of {jump / beta:.3g}, so the map is not injective there (use threshold >= 15; the default is 20)",
                code="FC212",
            )
        self.beta, self.threshold = beta, t
        self.output_range = (0.0, math.inf)

    @classmethod
    def from_module(cls, module: nn.Softplus) -> "FlowSoftplus":
        return cls(module.beta, module.threshold)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, self.beta, self.threshold)

    def log_derivative(self, x: Tensor) -> Tensor:
        bx = x * self.beta
        return torch.where(bx > self.threshold, torch.zeros_like(x), F.logsigmoid(bx))

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        by = (y * self.beta).clamp_min(torch.finfo(y.dtype).tiny)
        # log(1 - e^{-t}) = log(-expm1(-t)); below t = 0.1 its series log t - t/2 + t^2/24 - t^4/2880 +
        # t^6/181440 (error < 1e-15), which stays accurate where expm1 is not available: ONNX
        # has no Expm1, and exp(-t) - 1 cancels to 0 in float32 for t < 6e-8 (an inverse of -inf)
        small = by < 0.1
        t = torch.where(small, by, torch.ones_like(by))
        t2 = t * t
        series = torch.log(t) - 0.5 * t + t2 / 24 - t2 * t2 / 2880 + t2 * t2 * t2 / 181440
        smooth = y + torch.where(small, series, torch.log(-torch.expm1(-by))) / self.beta
        return torch.where(by > self.threshold, y, smooth)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, threshold={self.threshold:g}, exact=True"


class FlowPReLU(_Elementwise):
    r"""``nn.PReLU`` with every slope > 0 (FC212 otherwise): one slope, or one per channel (dim 1).

    :math:`\log f'(x) = \log a_c` where :math:`x < 0`, else 0; inverse divides the negative
    part by :math:`a_c`.
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        w = weight.detach().clone().reshape(-1)
        if not (torch.isfinite(w).all() and (w > 0).all()):
            bad = (~(w > 0)).nonzero().flatten().tolist()
            raise LayerConfigurationError(
                f"PReLU slope(s) not > 0 at index {bad[:10]} (min {w.min().item():.3g}); the activation is not injective",
                code="FC212",
            )
        self.register_buffer("weight", w)

    @classmethod
    def from_module(cls, module: nn.PReLU) -> "FlowPReLU":
        return cls(module.weight)

    def _per_channel(self, t: Tensor, like: Tensor) -> Tensor:
        if t.numel() == 1 or like.dim() < 2:
            return t.reshape(())
        return t.reshape(1, -1, *([1] * (like.dim() - 2)))

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.weight)

    def log_derivative(self, x: Tensor) -> Tensor:
        log_a = self._per_channel(self.weight.log(), x)
        return torch.where(x < 0, log_a.expand_as(x), torch.zeros_like(x))

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return torch.where(y >= 0, y, y / self._per_channel(self.weight, y))

    def extra_repr(self) -> str:
        return f"num_parameters={self.weight.numel()}, exact=True"


# ---------------------------------------------------------------------------------------
class FlowScalarAffine(FlowLayer):
    r"""Arithmetic with a constant: ``x * c``, ``c * x``, ``x + c``, ``c + x``, ``x - c``, ``c - x``, ``x / c``, ``-x``.

    ``op`` is one of ``"mul"``, ``"add"``, ``"sub"`` (:math:`x - c`), ``"rsub"``
    (:math:`c - x`), ``"div"`` (:math:`x / c`), ``"neg"``. The constant is a Python number
    or a tensor that broadcasts to the per-sample shape without changing it (a 0-d tensor, or
    e.g. a per-channel ``(C, 1, 1)`` scale). The forward pass evaluates the same expression as
    the original (``x / c`` is not replaced by ``x * (1/c)``). The map is affine with a
    diagonal Jacobian: :math:`L = \sum_i \log|s_i|` with :math:`s = c, 1/c, -1, 1`; a zero
    (or non-finite) multiplier or divisor is refused (FC213).

    >>> import torch
    >>> layer = FlowScalarAffine("div", 4.0)
    >>> y, ll = layer.call_and_ll(torch.ones(2, 3))
    >>> y[0, 0].item(), round(ll[0].item(), 4) == round(-3 * math.log(4.0), 4)
    (0.25, True)
    """

    exact = True
    OPS = ("mul", "add", "sub", "rsub", "div", "neg")

    def __init__(self, op: str, constant: float | Tensor | None = None):
        super().__init__()
        if op not in self.OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {self.OPS}")
        self.op = op
        if op == "neg":
            constant = -1.0
            op = "mul"
        self._mul = op in ("mul", "div")
        if isinstance(constant, Tensor) and constant.dim() == 0:
            constant = constant.item()
        if isinstance(constant, bool) or not isinstance(constant, (numbers.Real, Tensor)):
            raise ValueError(f"FlowScalarAffine needs a real constant, got {constant!r}")
        if isinstance(constant, Tensor):
            c = constant.detach().clone()
            finite = torch.isfinite(c).all()
            if not finite or (self._mul and (c == 0).any()):
                raise LayerConfigurationError(f"{self.op} by a constant with zero or non-finite entries", code="FC213")
            self.register_buffer("constant", c)
            self._scalar = None
        else:
            c = float(constant)
            if not math.isfinite(c) or (self._mul and c == 0.0):
                raise LayerConfigurationError(f"{self.op} by the constant {c:g}", code="FC213")
            self.constant = None
            self._scalar = c

    @property
    def value(self) -> float | Tensor:
        return self._scalar if self.constant is None else self.constant

    def _log_scale(self) -> float | Tensor:
        """Elementwise log|dy/dx| (a float or a tensor broadcastable to the sample shape)."""
        c = self.value
        if self.op == "rsub" or self.op in ("add", "sub"):
            return 0.0
        if self.op == "neg":
            return 0.0
        logc = math.log(abs(c)) if self.constant is None else c.abs().log()
        return logc if self.op == "mul" else -logc

    def forward(self, x: Tensor) -> Tensor:
        c = self.value
        return {
            "mul": lambda: x * c,
            "add": lambda: x + c,
            "sub": lambda: x - c,
            "rsub": lambda: c - x,
            "div": lambda: x / c,
            "neg": lambda: -x,
        }[self.op]()

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.forward(x)
        if y.shape != x.shape:
            raise LayerConfigurationError(
                f"constant of shape {tuple(self.constant.shape)} broadcasts the value from {tuple(x.shape)} to "
                f"{tuple(y.shape)}; only constants that keep the shape are bijections",
                code="FC213",
            )
        s = self._log_scale()
        if isinstance(s, Tensor):
            per_sample = torch.broadcast_to(s, x.shape)[0].sum().to(x.dtype)
            return y, per_sample.expand(x.shape[0])
        if s == 0.0:
            return y, zero_ll(x)
        return y, x.new_full((x.shape[0],), x[0].numel() * s)

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        c = self.value
        return {
            "mul": lambda: y / c,
            "add": lambda: y - c,
            "sub": lambda: y + c,
            "rsub": lambda: c - y,
            "div": lambda: y * c,
            "neg": lambda: -y,
        }[self.op]()

    def extra_repr(self) -> str:
        c = self._scalar if self.constant is None else f"tensor{tuple(self.constant.shape)}"
        return f"op={self.op}, constant={c}, exact=True"
