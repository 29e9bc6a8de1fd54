r"""The registry of conversion rules: the single place that says how a node becomes a flow layer.

A rule is keyed by a module type (``call_module`` nodes), a function (``call_function``)
or a tensor method name (``call_method``). Its ``build(ctx)`` receives a
:class:`NodeContext` (the node, its module, its arguments with weights resolved, and the
per-sample input/output shapes from shape propagation) and returns a
:class:`~flowconvert.core.FlowLayer`, or raises :class:`Rejection` with a diagnostic code.
Nodes with several data inputs (merges such as ``a + b`` or ``torch.cat``) are built by
the same rules: ``ctx.num_data`` and ``ctx.in_shapes`` describe the data arguments, each
of which is :data:`DATA_ARG` in ``ctx.args``. A rule's layer may have several inputs or
outputs (:mod:`flowconvert.merging`).

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

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .activations import FlowLeakyReLU
from .core import FlowLayer
from .elementwise import FlowBatchNorm, FlowELU, FlowPReLU, FlowScalarAffine, FlowSigmoid, FlowSoftplus, FlowTanh
from .linear import FlowLinear
from .merging import FlowCat, FlowSplit, FlowSum
from .pooling import FlowAvgPool, FlowMaxPool
from .shapes import FlowIdentity, Permute, Reshape

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
    #: per-sample shapes of every data argument, in argument order (several for merges)
    in_shapes: tuple[tuple[int, ...], ...] = ()
    #: conversion options, e.g. ``{"relu": "leaky", "negative_slope": 0.01}``
    options: dict = field(default_factory=dict)

    @property
    def num_data(self) -> int:
        """How many data arguments the node has (2 for ``a + b``; a list counts each entry)."""
        return len(self.in_shapes) if self.in_shapes else 1

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

    def __repr__(self) -> str:
        return (
            f"Registry({len(self.modules)} module rules, {len(self.functions)} function rules, "
            f"{len(self.methods)} method rules)"
        )

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
    if ctx.module.groups > 1:
        from .grouped import FlowGroupedConv

        return FlowGroupedConv.from_module(ctx.module, ctx.in_shape)
    return _flow_conv().from_module(ctx.module, ctx.in_shape)


@REGISTRY.add_function(F.conv1d, F.conv2d)
def _conv_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    groups = ctx.arg(6, "groups", 1)
    if groups > 1:
        from .grouped import FlowGroupedConv as cls
    else:
        cls = _flow_conv()
    return cls(
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


# -- ReLU: refused, or substituted by LeakyReLU under convert(..., relu="leaky") ---------------
@REGISTRY.add_module(nn.ReLU)
@REGISTRY.add_function(F.relu, torch.relu)
@REGISTRY.add_method("relu")
def _relu(ctx: NodeContext) -> FlowLayer:
    if ctx.options.get("relu") != "leaky":
        raise Rejection("FC101", f"ReLU `{ctx.node.name}` cannot be part of a flow")
    if ctx.node.op != "call_module":
        ctx.require_data_first()
    slope = float(ctx.options.get("negative_slope", 0.01))
    layer = FlowLeakyReLU(slope)
    layer.substitution = f"ReLU replaced by LeakyReLU(negative_slope={slope:g})"
    return layer


# -- elementwise bijections (flowconvert.elementwise) --------------------------------------------
@REGISTRY.add_module(nn.Tanh)
@REGISTRY.add_function(torch.tanh, F.tanh)
@REGISTRY.add_method("tanh")
def _tanh(ctx: NodeContext) -> FlowLayer:
    if ctx.node.op != "call_module":
        ctx.require_data_first()
    return FlowTanh()


@REGISTRY.add_module(nn.Sigmoid)
@REGISTRY.add_function(torch.sigmoid, F.sigmoid)
@REGISTRY.add_method("sigmoid")
def _sigmoid(ctx: NodeContext) -> FlowLayer:
    if ctx.node.op != "call_module":
        ctx.require_data_first()
    return FlowSigmoid()


@REGISTRY.add_module(nn.ELU, nn.SELU)
def _elu_module(ctx: NodeContext) -> FlowLayer:
    return FlowELU.from_module(ctx.module)


@REGISTRY.add_function(F.elu)
def _elu_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowELU(ctx.arg(1, "alpha", 1.0))


@REGISTRY.add_function(F.selu, torch.selu)
def _selu_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowELU.selu()


@REGISTRY.add_module(nn.Softplus)
def _softplus_module(ctx: NodeContext) -> FlowLayer:
    return FlowSoftplus.from_module(ctx.module)


@REGISTRY.add_function(F.softplus)
def _softplus_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowSoftplus(ctx.arg(1, "beta", 1.0), ctx.arg(2, "threshold", 20.0))


@REGISTRY.add_module(nn.PReLU)
def _prelu_module(ctx: NodeContext) -> FlowLayer:
    return FlowPReLU.from_module(ctx.module)


@REGISTRY.add_function(F.prelu, torch.prelu)
def _prelu_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowPReLU(ctx.tensor(1, "weight"))


@REGISTRY.add_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm_module(ctx: NodeContext) -> FlowLayer:
    return FlowBatchNorm.from_module(ctx.module)


@REGISTRY.add_function(F.batch_norm)
def _batch_norm_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    mean, var = ctx.tensor(1, "running_mean"), ctx.tensor(2, "running_var")
    if ctx.arg(5, "training", False) or mean is None or var is None:
        raise Rejection("FC211", "F.batch_norm is called with training=True or without running statistics")
    return FlowBatchNorm(mean, var, ctx.tensor(3, "weight"), ctx.tensor(4, "bias"), ctx.arg(7, "eps", 1e-5))


# -- arithmetic: with a constant (affine bijection), or of two data values (a + b funnel) -------
_ARITHMETIC = {
    operator.add: "add", torch.add: "add", "add": "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub", torch.subtract: "sub", "subtract": "sub",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", torch.multiply: "mul", "multiply": "mul",
    operator.truediv: "div", torch.div: "div", "div": "div", torch.true_divide: "div", "true_divide": "div",
    torch.divide: "div", "divide": "div",
}


@REGISTRY.add_function(*(k for k in _ARITHMETIC if not isinstance(k, str)))
@REGISTRY.add_method(*(k for k in _ARITHMETIC if isinstance(k, str)))
def _arithmetic(ctx: NodeContext) -> FlowLayer:
    op = _ARITHMETIC[ctx.node.target]
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    if ctx.kwargs.get("alpha", 1) != 1 or ctx.kwargs.get("rounding_mode") is not None:
        raise Rejection(_unsupported_code(ctx.node), f"{describe_target(ctx.node)} with alpha/rounding_mode is not supported")
    if a is DATA_ARG and b is DATA_ARG:
        if op in ("mul", "div"):
            raise Rejection("FC131", f"`{ctx.node.name}` multiplies or divides two data values")
        if len(set(ctx.in_shapes)) != 1 or ctx.out_shape != ctx.in_shapes[0]:
            raise Rejection("FC305", f"`{ctx.node.name}` adds values of different shapes {list(ctx.in_shapes)} (broadcasting)")
        return FlowSum(ctx.in_shapes[0], subtract=op == "sub")
    if a is DATA_ARG:
        const = b
    elif b is DATA_ARG:
        const = a
        if op == "sub":
            op = "rsub"
        elif op == "div":
            raise Rejection(_unsupported_code(ctx.node), f"`{ctx.node.name}` divides a constant by a data value (a reciprocal)")
    else:
        raise Rejection(_unsupported_code(ctx.node), "no data argument")
    if not isinstance(const, (int, float, Tensor)) or isinstance(const, bool):
        raise Rejection(_unsupported_code(ctx.node), f"`{ctx.node.name}`: constant of type {type(const).__name__}")
    if ctx.out_shape != ctx.in_shape:
        raise Rejection(_unsupported_code(ctx.node), f"`{ctx.node.name}`: the constant broadcasts {ctx.in_shape} to {ctx.out_shape}")
    return FlowScalarAffine(op, const)


@REGISTRY.add_function(operator.neg, torch.neg, torch.negative)
@REGISTRY.add_method("neg", "negative")
def _neg(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowScalarAffine("neg")


# -- concatenation and splitting along a feature dimension ----------------------------------------
def _feature_dim(ctx: NodeContext, dim: int, ndim: int) -> int:
    d = int(dim) % ndim
    if d == 0:
        raise Rejection("FC215", f"`{ctx.node.name}` concatenates or splits along the batch dimension")
    return d


@REGISTRY.add_function(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: NodeContext) -> FlowLayer:
    parts = ctx.arg(0, "tensors")
    if not isinstance(parts, (tuple, list)) or any(p is not DATA_ARG for p in parts):
        raise Rejection("FC305", f"`{ctx.node.name}` concatenates data with constants (that adds coordinates without a density)")
    ndim = len(ctx.in_shapes[0]) + 1
    dim = _feature_dim(ctx, ctx.arg(1, "dim", ctx.kwargs.get("axis", 0)), ndim)
    return FlowCat(dim, [shape[dim - 1] for shape in ctx.in_shapes])


@REGISTRY.add_function(torch.split, torch.chunk)
@REGISTRY.add_method("split", "chunk")
def _split(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    ndim = len(ctx.in_shape) + 1
    chunk = ctx.node.target in (torch.chunk, "chunk")
    how = ctx.arg(1, "chunks" if chunk else "split_size_or_sections")
    if how is None and not chunk:
        how = ctx.kwargs.get("split_size")
    dim = _feature_dim(ctx, ctx.arg(2, "dim", 0), ndim)
    length = ctx.in_shape[dim - 1]
    return FlowSplit.from_chunk(dim, how, length) if chunk else FlowSplit.from_split(dim, how, length)


@REGISTRY.add_function(operator.getitem)
def _getitem(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    index = ctx.arg(1, "index")
    items = index if isinstance(index, tuple) else (index,)
    keeps_all = all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)
    if not keeps_all:
        raise Rejection("FC132", f"`{ctx.node.name}` indexes a data value with {index!r}")
    if ctx.out_shape is None:
        raise Rejection("FC132", f"`{ctx.node.name}` does not return a tensor")
    return Reshape(ctx.in_shape, ctx.out_shape)


# -- pooling over tiling windows (flowconvert.pooling) ---------------------------------------------
@REGISTRY.add_module(nn.MaxPool1d, nn.MaxPool2d)
def _max_pool_module(ctx: NodeContext) -> FlowLayer:
    return FlowMaxPool.from_module(ctx.module, ctx.in_shape)


@REGISTRY.add_module(nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _avg_pool_module(ctx: NodeContext) -> FlowLayer:
    return FlowAvgPool.from_module(ctx.module, ctx.in_shape)


@REGISTRY.add_function(F.max_pool1d, F.max_pool2d)
def _max_pool_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    module = (nn.MaxPool1d if len(ctx.in_shape) == 2 else nn.MaxPool2d)(
        ctx.arg(1, "kernel_size"), ctx.arg(2, "stride", None), ctx.arg(3, "padding", 0), ctx.arg(4, "dilation", 1),
        ctx.arg(6, "return_indices", False), ctx.arg(5, "ceil_mode", False),
    )
    return FlowMaxPool.from_module(module, ctx.in_shape)


@REGISTRY.add_function(F.avg_pool1d, F.avg_pool2d)
def _avg_pool_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    args = (ctx.arg(1, "kernel_size"), ctx.arg(2, "stride", None), ctx.arg(3, "padding", 0), ctx.arg(4, "ceil_mode", False))
    if len(ctx.in_shape) == 2:
        module = nn.AvgPool1d(*args)
    else:
        module = nn.AvgPool2d(*args, divisor_override=ctx.arg(6, "divisor_override", None))
    return FlowAvgPool.from_module(module, ctx.in_shape)


@REGISTRY.add_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def _adaptive_avg_pool_function(ctx: NodeContext) -> FlowLayer:
    ctx.require_data_first()
    return FlowAvgPool.adaptive_from_size(ctx.in_shape, ctx.arg(1, "output_size"))


# -- refusals, with the reason in the diagnostic catalogue -----------------------------------
REGISTRY.reject(
    "FC130", "in-place operation",
    functions=[F.relu_, torch.relu_, F.elu_, F.leaky_relu_, torch.sigmoid_, torch.tanh_],
    methods=["relu_", "add_", "sub_", "mul_", "div_", "neg_", "sigmoid_", "tanh_", "copy_", "fill_", "zero_",
             "masked_fill_", "index_add_", "scatter_", "exp_", "pow_", "addcmul_", "addcdiv_", "clamp_", "clip_"],
)
REGISTRY.reject(
    "FC131", "attention or product of data values",
    modules=[nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Bilinear],
    functions=[F.scaled_dot_product_attention, F.multi_head_attention_forward, torch.matmul, operator.matmul,
               torch.bmm, torch.einsum, F.bilinear],
    methods=["matmul", "bmm"],
)
REGISTRY.reject(
    "FC132", "indexing that drops data",
    functions=[torch.narrow, torch.select, torch.index_select, torch.gather, torch.masked_select],
    methods=["narrow", "select", "index_select", "gather", "masked_select"],
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
    modules=[nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d],
    functions=[F.max_pool3d, F.avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
               torch.max_pool1d, torch.max_pool2d],
)
REGISTRY.reject(
    "FC106", "saturating activation",
    modules=[nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Threshold],
    functions=[F.relu6, F.hardtanh, F.hardsigmoid, F.threshold, torch.clamp, torch.clip],
    methods=["clamp", "clip"],
)
REGISTRY.reject(
    "FC107", "activation",
    modules=[nn.CELU, nn.LogSigmoid],
    functions=[F.celu, F.logsigmoid],
)
