r"""The registry of conversion rules: the single place that says how a node becomes a flow layer.

A rule is keyed by a module type (``call_module`` nodes), a function (``call_function``)
or a tensor method name (``call_method``). Its ``build(ctx)`` receives a
:class:`NodeContext` (the node, its module, its arguments with weights resolved, and the
per-sample input/output shapes from shape propagation) and returns a
:class:`~flowconvert.core.FlowLayer`, or raises :class:`Rejection` with a diagnostic code.
Rules are only consulted for nodes with exactly one data input; merges are the graph
analysis' business.

Adding support for a node kind is one decorated function:

>>> import torch
>>> from flowconvert.shapes import FlowIdentity
>>> registry = Registry()
>>> @registry.add_method("clone")
... def _clone(ctx):
...     return FlowIdentity()
>>> registry.lookup_method("clone").description
'clone'
>>> registry.lookup_method("cumsum") is None
True

The default rules live in :data:`REGISTRY`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .activations import FlowLeakyReLU
from .core import FlowLayer
from .linear import FlowLinear
from .shapes import FlowIdentity, Permute, Reshape
from .tracing import DATA

__all__ = ["Rule", "Rejection", "NodeContext", "Registry", "REGISTRY", "describe_target", "DATA_ARG"]


class _DataArg:
    """Stands for the node's data input inside :attr:`NodeContext.args`."""

    def __repr__(self) -> str:
        return "<data>"


DATA_ARG = _DataArg()


class Rejection(Exception):
    """Raised by a rule: the node cannot become a flow layer. ``code`` is a diagnostic code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class NodeContext:
    """What a rule sees of one node.

    ``args``/``kwargs`` have fx nodes replaced by their recorded values (weights, sizes) and
    the data input replaced by :data:`DATA_ARG`; ``in_shape``/``out_shape`` are per-sample.
    """

    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] | None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument by position (counting the data input) or by keyword."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    def require_data_first(self) -> None:
        if not self.args or self.args[0] is not DATA_ARG:
            raise Rejection(_unsupported_code(self.node), "the data value is not the first argument")

    def tensor(self, index: int, name: str, default: Any = None) -> Any:
        value = self.arg(index, name, default)
        if value is DATA_ARG:
            raise Rejection(_unsupported_code(self.node), f"argument {name!r} is the data value itself")
        return value


Builder = Callable[[NodeContext], FlowLayer]


@dataclass(frozen=True)
class Rule:
    """A conversion rule: ``kind`` (module/function/method), ``key`` and ``build``."""

    kind: str
    key: Any
    build: Builder
    description: str


def _unsupported_code(node: fx.Node) -> str:
    return {"call_module": "FC110", "call_function": "FC111", "call_method": "FC112"}.get(node.op, "FC111")


def function_name(fn: Any) -> str:
    """Readable name of a function target: ``F.linear``, ``torch.flatten``, ``operator.add``.

    >>> function_name(torch.nn.functional.leaky_relu), function_name(torch.flatten), function_name(operator.add)
    ('F.leaky_relu', 'torch.flatten', 'operator.add')
    """
    name = getattr(fn, "__name__", None) or repr(fn)
    for prefix, namespace in (("F", F), ("torch", torch), ("operator", operator)):
        if getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def describe_target(node: fx.Node, module: nn.Module | None = None) -> str:
    """How a node's target reads in a report: ``fc1 (Linear)``, ``F.linear``, ``.view()``."""
    if node.op == "call_module":
        kind = type(module).__name__ if module is not None else "?"
        return f"{node.target} ({kind})"
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1:
            return f"getattr(.{node.args[1]})"
        return function_name(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return str(node.target)


@dataclass
class Registry:
    """Conversion rules keyed by module type, function and method name."""

    modules: dict[type, Rule] = field(default_factory=dict)
    functions: dict[Any, Rule] = field(default_factory=dict)
    methods: dict[str, Rule] = field(default_factory=dict)

    # -- registration -------------------------------------------------------------------
    def add_module(self, *types: type) -> Callable[[Builder], Builder]:
        """Decorator: ``build(ctx)`` for ``call_module`` nodes of exactly these types."""
        def register(build: Builder) -> Builder:
            for t in types:
                self.modules[t] = Rule("module", t, build, f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__qualname__)
            return build

        return register

    def add_function(self, *functions: Any) -> Callable[[Builder], Builder]:
        """Decorator: ``build(ctx)`` for ``call_function`` nodes calling one of ``functions``."""
        def register(build: Builder) -> Builder:
            for fn in functions:
                self.functions[fn] = Rule("function", fn, build, function_name(fn))
            return build

        return register

    def add_method(self, *names: str) -> Callable[[Builder], Builder]:
        """Decorator: ``build(ctx)`` for ``call_method`` nodes with one of these method names."""
        def register(build: Builder) -> Builder:
            for name in names:
                self.methods[name] = Rule("method", name, build, name)
            return build

        return register

    def reject(self, code: str, what: str, *, modules: Sequence[type] = (), functions: Sequence[Any] = (), methods: Sequence[str] = ()) -> None:
        """Register rules that always refuse with ``code``; ``what`` names the operation in messages."""
        def refuse(ctx: NodeContext) -> FlowLayer:
            raise Rejection(code, f"{what} `{ctx.node.name}` cannot be part of a flow")

        self.add_module(*modules)(refuse)
        self.add_function(*functions)(refuse)
        self.add_method(*methods)(refuse)

    # -- lookup -----------------------------------------------------------------------------
    def lookup_module(self, module: nn.Module) -> Rule | None:
        return self.modules.get(type(module))

    def lookup_function(self, fn: Any) -> Rule | None:
        try:
            return self.functions.get(fn)
        except TypeError:  # unhashable target
            return None

    def lookup_method(self, name: str) -> Rule | None:
        return self.methods.get(name)

    def lookup(self, node: fx.Node, module: nn.Module | None = None) -> Rule | None:
        if node.op == "call_module":
            return self.lookup_module(module) if module is not None else None
        if node.op == "call_function":
            return self.lookup_function(node.target)
        if node.op == "call_method":
            return self.lookup_method(node.target)
        return None

    @property
    def leaf_types(self) -> frozenset[type]:
        """Module types the tracer must keep as leaves."""
        return frozenset(self.modules)

    def build(self, ctx: NodeContext) -> FlowLayer:
        """Build the flow layer of ``ctx.node`` or raise :class:`Rejection`."""
        rule = self.lookup(ctx.node, ctx.module)
        if rule is None:
            what = {"call_module": "module", "call_function": "function", "call_method": "tensor method"}.get(ctx.node.op, "operation")
            raise Rejection(_unsupported_code(ctx.node), f"no conversion rule for {what} {describe_target(ctx.node, ctx.module)}")
        return rule.build(ctx)


REGISTRY = Registry()
"""The default rules (linear, convolution, LeakyReLU, shape operations, identities, refusals)."""


# -- linear ---------------------------------------------------------------------------------
@REGISTRY.add_module(nn.Linear)
def _linear_module(ctx: NodeContext) -> FlowLayer:
    return FlowLinear.from_module(ctx.module)


@REGISTRY.add_function(F.linear)
def _linear_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    weight, bias = ctx.tensor(1, "weight"), ctx.tensor(2, "bias")
    if not isinstance(weight, Tensor):
        raise Rejection("FC111", "F.linear weight is not a tensor")
    return FlowLinear(weight, bias)


# -- convolution (layers in flowconvert.conv) ------------------------------------------------
def _flow_conv():
    try:
        from .conv import FlowConv
    except ImportError as exc:
        raise Rejection("FC120", f"convolutions need flowconvert.conv, which is not available ({exc})") from exc
    return FlowConv


@REGISTRY.add_module(nn.Conv1d, nn.Conv2d)
def _conv_module(ctx: NodeContext) -> FlowLayer:
    return _flow_conv().from_module(ctx.module, ctx.in_shape)


@REGISTRY.add_function(F.conv1d, F.conv2d)
def _conv_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return _flow_conv()(
        ctx.tensor(1, "weight"),
        ctx.tensor(2, "bias"),
        input_shape=ctx.in_shape,
        stride=ctx.arg(3, "stride", 1),
        padding=ctx.arg(4, "padding", 0),
        dilation=ctx.arg(5, "dilation", 1),
        groups=ctx.arg(6, "groups", 1),
    )


# -- activations ----------------------------------------------------------------------------
@REGISTRY.add_module(nn.LeakyReLU)
def _leaky_relu_module(ctx: NodeContext) -> FlowLayer:
    return FlowLeakyReLU.from_module(ctx.module)


@REGISTRY.add_function(F.leaky_relu)
def _leaky_relu_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowLeakyReLU(ctx.arg(1, "negative_slope", 0.01))


# -- shape operations: per-sample shapes come from shape propagation --------------------------
@REGISTRY.add_module(nn.Flatten, nn.Unflatten)
@REGISTRY.add_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
@REGISTRY.add_method("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten")
def _reshape(ctx: NodeContext) -> FlowLayer:
    if ctx.node.op != "call_module":
        ctx.require_data_first()
    if ctx.out_shape is None:
        raise Rejection(_unsupported_code(ctx.node), "the result is not a tensor")
    return Reshape(ctx.in_shape, ctx.out_shape)


def _permutation(ctx: NodeContext, dims: Sequence[int]) -> Permute:
    ndim = len(ctx.in_shape) + 1
    dims = tuple(int(d) % ndim for d in dims)
    if sorted(dims) != list(range(ndim)):
        raise Rejection("FC112" if ctx.node.op == "call_method" else "FC111", f"{dims} is not a permutation of {ndim} dims")
    if dims[0] != 0:
        raise Rejection("FC113", f"the permutation {dims} moves the batch dimension")
    return Permute(dims)


@REGISTRY.add_function(torch.permute)
@REGISTRY.add_method("permute")
def _permute(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    rest = ctx.args[1:] or (ctx.kwargs.get("dims"),)
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    return _permutation(ctx, dims)


@REGISTRY.add_function(torch.transpose, torch.swapaxes, torch.swapdims)
@REGISTRY.add_method("transpose", "swapaxes", "swapdims")
def _transpose(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    ndim = len(ctx.in_shape) + 1
    a, b = (int(ctx.arg(i, n)) % ndim for i, n in ((1, "dim0"), (2, "dim1")))
    dims = list(range(ndim))
    dims[a], dims[b] = dims[b], dims[a]
    return _permutation(ctx, dims)


# -- identities ----------------------------------------------------------------------------
@REGISTRY.add_module(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
@REGISTRY.add_method("contiguous", "clone", "detach")
def _identity(ctx: NodeContext) -> FlowLayer:
    return FlowIdentity()


@REGISTRY.add_function(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    p, training = ctx.arg(1, "p", 0.5), ctx.arg(2, "training", True)
    if training and p > 0:
        raise Rejection("FC114", f"{function_name(ctx.node.target)} is called with training=True, p={p}")
    return FlowIdentity()


# -- refusals, with the reason in the diagnostic catalogue -----------------------------------
REGISTRY.reject(
    "FC101", "ReLU",
    modules=[nn.ReLU], functions=[F.relu, torch.relu, F.relu_, torch.relu_], methods=["relu", "relu_"],
)
REGISTRY.reject(
    "FC102", "non-monotone activation",
    modules=[nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish], functions=[F.gelu, F.silu, F.mish, F.hardswish],
)
REGISTRY.reject(
    "FC103", "normalization",
    modules=[nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
             nn.LocalResponseNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else [])],
    functions=[F.layer_norm, F.group_norm, F.instance_norm, F.normalize, *([F.rms_norm] if hasattr(F, "rms_norm") else [])],
)
REGISTRY.reject(
    "FC104", "softmax",
    modules=[nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d],
    functions=[F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax],
    methods=["softmax", "log_softmax"],
)
REGISTRY.reject(
    "FC105", "pooling",
    modules=[nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d],
    functions=[F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
               torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d],
)
REGISTRY.reject(
    "FC106", "saturating activation",
    modules=[nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Threshold],
    functions=[F.relu6, F.hardtanh, F.hardsigmoid, F.threshold, torch.clamp, torch.clip],
    methods=["clamp", "clip", "clamp_", "clip_"],
)
REGISTRY.reject(
    "FC107", "activation",
    modules=[nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.PReLU, nn.LogSigmoid],
    functions=[torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.elu, F.selu, F.celu, F.softplus, F.prelu, F.logsigmoid],
    methods=["tanh", "sigmoid"],
)
REGISTRY.reject(
    "FC108", "BatchNorm",
    modules=[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d], functions=[F.batch_norm],
)
