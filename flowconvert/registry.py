r"""The registry of conversion rules: the single place that says how a node becomes a flow layer.

A rule is one function ``build(ctx) -> FlowLayer`` declared with its data: the spellings it
handles (module types for ``call_module`` nodes, functions for ``call_function``, tensor
method names for ``call_method``), its likelihood class, the flow layers it builds, its
conditions and the diagnostic codes it can raise. ``docs/supported.md`` and the README's
table are generated from these declarations (:meth:`Registry.markdown_table`).

``build(ctx)`` receives a :class:`NodeContext` (the node, its module, its arguments with
weights resolved and every data argument replaced by :data:`DATA_ARG`, the per-sample
shapes) and returns a :class:`~flowconvert.core.FlowLayer` or raises :class:`Rejection`.
One rule serves module and functional spellings: :meth:`NodeContext.param` reads a
setting from the module (``module.negative_slope``) or from the call's arguments
(``F.leaky_relu(x, 0.2)``). A rule may declare a cheap ``check(ctx)`` that decides
convertibility without building the layer (no weight factorization); :func:`~flowconvert.audit`
then calls the check, and only :func:`~flowconvert.convert` builds.

Adding support for a node kind is one declared function:

>>> import torch
>>> from flowconvert.shapes import FlowIdentity
>>> registry = Registry()
>>> @registry.rule(methods=["clone"], likelihood="exact", layers=[FlowIdentity], conditions="L = 0")
... def _clone(ctx):
...     return FlowIdentity()
>>> registry.lookup_method("clone").description, registry.lookup_method("clone").spec.likelihood
('clone', 'exact')
>>> registry.lookup_method("cumsum") is None
True

The default rules live in :data:`REGISTRY`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .activations import FlowLeakyClamp, FlowLeakyReLU
from .core import FlowLayer
from .densities import FULL_COVARIANCE_MAX, DiagonalNormal, StandardNormal
from .elementwise import FlowBatchNorm, FlowELU, FlowPReLU, FlowScalarAffine, FlowSigmoid, FlowSoftplus, FlowTanh
from .linear import DEFAULT_RTOL, FlowLinear
from .merging import FlowCat, FlowDuplicate, FlowSplit, FlowSum
from .pooling import FlowAvgPool, FlowMaxPool, FlowReduce, FlowWindowPool, pooling_layer
from .report import Substitution
from .shapes import FlowIdentity, Permute, Reshape

__all__ = [
    "Rule",
    "RuleSpec",
    "Rejection",
    "NodeContext",
    "Registry",
    "REGISTRY",
    "Substitution",
    "SubstitutionPolicy",
    "SUBSTITUTIONS",
    "resolve_substitutions",
    "Verdict",
    "describe_target",
    "function_name",
    "duplicate",
    "DATA_ARG",
    "LIKELIHOODS",
]

#: The likelihood classes a rule declares: ``exact``, ``bound``, ``exact / bound`` (depends on
#: the configuration), ``substitution`` (refused by default, approximated under an option) and
#: ``refused``.
LIKELIHOODS = ("exact", "exact / bound", "bound", "substitution", "refused")


class _DataArg:
    """Stands for a data argument inside :attr:`NodeContext.args`."""

    def __repr__(self) -> str:
        return "<data>"


DATA_ARG = _DataArg()


class Rejection(Exception):
    """Raised by a rule: the node cannot become a flow layer. ``code`` is a diagnostic code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Verdict:
    """What a rule's cheap ``check(ctx)`` decides without building the layer.

    ``exact``: the layer's contribution is exact (else a bound); ``density_parameters``:
    how many parameters its densities will have.
    """

    exact: bool = True
    density_parameters: int = 0
    #: what the check left to ``convert`` (reported in the node's note), e.g. a large weight's rank
    note: str | None = None


@dataclass
class NodeContext:
    """What a rule sees of one node.

    ``args``/``kwargs`` have fx nodes replaced by their recorded values (weights, sizes) and
    the data inputs replaced by :data:`DATA_ARG`; ``in_shape``/``out_shape`` are per-sample
    (``in_shape`` of the first data argument, ``in_shapes`` of every one, in argument order).
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
    #: set by a rule whose layer approximates the original operation (see :meth:`substitute`)
    substitution: Substitution | None = None
    #: the user's module of a ``call_module`` node was in training mode (the traced copy is in eval mode)
    training: bool = False

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument by position (counting the data input) or by keyword."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    def param(self, name: str, index: int, default: Any = None) -> Any:
        """A setting read from the module (``module.<name>``) or, for a call, from its arguments.

        One rule thus serves ``nn.LeakyReLU(0.2)`` and ``F.leaky_relu(x, 0.2)`` alike.
        """
        if self.module is not None:
            return getattr(self.module, name, default)
        value = self.arg(index, name, default)
        if value is DATA_ARG:
            raise Rejection(unsupported_code(self.node), f"argument {name!r} is the data value itself")
        return value

    def require_data_first(self) -> None:
        if not self.args or self.args[0] is not DATA_ARG:
            raise Rejection(unsupported_code(self.node), "the data value is not the first argument")

    def tensor(self, index: int, name: str, default: Any = None) -> Any:
        """Like :meth:`arg`, refusing a data value (a weight argument must not be data)."""
        value = self.arg(index, name, default)
        if value is DATA_ARG:
            raise Rejection(unsupported_code(self.node), f"argument {name!r} is the data value itself")
        return value

    def substitute(self, original: str, replacement: str) -> None:
        """Record that the layer approximates ``original`` by ``replacement`` (reported per node)."""
        self.substitution = Substitution(original, replacement)


Builder = Callable[[NodeContext], FlowLayer]
Checker = Callable[[NodeContext], Verdict]


@dataclass(frozen=True)
class RuleSpec:
    """One rule and its declared data (shared by all its spellings).

    Attributes:
        name: the rule's name (its build function's).
        build: ``build(ctx) -> FlowLayer`` or raise :class:`Rejection`.
        likelihood: one of :data:`LIKELIHOODS`.
        layers: the flow layer classes it builds (names, for the documentation).
        conditions: when it converts, in words (the documentation's last column).
        codes: the diagnostic codes it can raise.
        check: optional ``check(ctx) -> Verdict``: decides without building (used by ``audit``).
        data_first: for function/method spellings, the data value must be the first argument.
    """

    name: str
    build: Builder
    likelihood: str
    layers: tuple[str, ...] = ()
    conditions: str = ""
    codes: tuple[str, ...] = ()
    check: Checker | None = None
    data_first: bool = True

    @property
    def refused(self) -> bool:
        return self.likelihood == "refused"

    @property
    def likelihood_column(self) -> str:
        """The likelihood as the documentation states it (``refused (FC104)``, ...)."""
        if self.likelihood == "refused":
            return f"refused ({self.codes[0]})"
        if self.likelihood == "substitution":
            return f"refused ({self.codes[0]}) / substitution"
        return self.likelihood


@dataclass(frozen=True)
class Rule:
    """One spelling of a rule: ``kind`` (module/function/method/structure), ``key``, ``description``."""

    kind: str
    key: Any
    spec: RuleSpec
    description: str

    @property
    def build(self) -> Builder:
        return self.spec.build

    @property
    def documented_name(self) -> str:
        """The spelling as the documentation writes it: ``nn.Linear``, ``F.linear``, ``.view()``."""
        if self.kind == "method":
            return f".{self.description}()"
        return self.description


def unsupported_code(node: fx.Node) -> str:
    """The code of an unsupported node: FC110 module, FC111 function, FC112 method."""
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


def module_name(t: type) -> str:
    """``nn.Linear`` for torch's modules, the qualified name otherwise."""
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__qualname__


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


def duplicate(x: Tensor, copies: int, weights: tuple[float, ...] | None = None) -> tuple[Tensor, ...]:
    """The explicit fan-out node the legalize pass inserts: ``copies`` references to ``x``.

    ``weights`` are the inverse's weights on the copies (:class:`~flowconvert.merging.FlowDuplicate`).
    """
    return (x,) * copies


def _names(layers: Iterable[Any]) -> tuple[str, ...]:
    return tuple(t if isinstance(t, str) else t.__name__ for t in layers)


@dataclass
class Registry:
    """Conversion rules keyed by module type, function and method name, plus the graph's structure.

    ``structure`` holds the rules of what the graph itself needs: ``"duplicate"`` (a value with
    several consumers) and ``"base:<name>"`` (the base density of each output).
    """

    modules: dict[type, Rule] = field(default_factory=dict)
    functions: dict[Any, Rule] = field(default_factory=dict)
    methods: dict[str, Rule] = field(default_factory=dict)
    structure: dict[str, Rule] = field(default_factory=lambda: dict(_STRUCTURE))
    #: functions of optional packages by ``"module.qualname"``, matched without importing the package
    named_functions: dict[str, Rule] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Registry({len(self.modules)} module rules, {len(self.functions)} function rules, "
            f"{len(self.methods)} method rules)"
        )

    def copy(self) -> Registry:
        """A registry with the same rules, to extend without changing this one."""
        return Registry(
            dict(self.modules),
            dict(self.functions),
            dict(self.methods),
            dict(self.structure),
            dict(self.named_functions),
        )

    # -- registration -------------------------------------------------------------------
    def rule(
        self,
        spellings: Sequence[Any] = (),
        likelihood: str = "exact / bound",
        layers: Sequence[Any] = (),
        conditions: str = "",
        *,
        modules: Sequence[type] = (),
        functions: Sequence[Any] = (),
        methods: Sequence[str] = (),
        named_functions: Sequence[str] = (),
        codes: Sequence[str] = (),
        check: Checker | None = None,
        data_first: bool = True,
        name: str | None = None,
    ) -> Callable[[Builder], Builder]:
        """Decorator: declare ``build(ctx)`` for every spelling listed, with its data (see :class:`RuleSpec`).

        ``spellings`` mixes module types (``nn.Tanh``), functions (``torch.tanh``) and tensor method
        names (``"tanh"``); ``modules``/``functions``/``methods`` name them by kind instead.
        ``named_functions`` are functions of optional packages by ``"module.qualname"``
        (``"torchvision.ops.stochastic_depth.stochastic_depth"``), matched without importing them.
        """
        modules = [*modules, *(t for t in spellings if isinstance(t, type))]
        methods = [*methods, *(t for t in spellings if isinstance(t, str))]
        functions = [*functions, *(t for t in spellings if not isinstance(t, (type, str)))]
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")

        def register(build: Builder) -> Builder:
            spec = RuleSpec(
                name or build.__name__.strip("_"),
                build,
                likelihood,
                _names(layers),
                conditions,
                tuple(codes),
                check,
                data_first,
            )
            for t in modules:
                self.modules[t] = Rule("module", t, spec, module_name(t))
            for fn in functions:
                self.functions[fn] = Rule("function", fn, spec, function_name(fn))
            for method in methods:
                self.methods[method] = Rule("method", method, spec, method)
            for qualified in named_functions:
                self.named_functions[qualified] = Rule("function", qualified, spec, qualified)
            return build

        return register

    def add_module(self, *types: type, **declared: Any) -> Callable[[Builder], Builder]:
        """Decorator: a rule for ``call_module`` nodes of exactly these types (see :meth:`rule`)."""
        return self.rule(modules=types, **declared)

    def add_function(self, *functions: Any, **declared: Any) -> Callable[[Builder], Builder]:
        """Decorator: a rule for ``call_function`` nodes calling one of ``functions``."""
        return self.rule(functions=functions, **declared)

    def add_method(self, *names: str, **declared: Any) -> Callable[[Builder], Builder]:
        """Decorator: a rule for ``call_method`` nodes with one of these method names."""
        return self.rule(methods=names, **declared)

    def reject(
        self,
        code: str,
        what: str,
        *,
        modules: Sequence[type] = (),
        functions: Sequence[Any] = (),
        methods: Sequence[str] = (),
        conditions: str | None = None,
    ) -> None:
        """Register a rule that always refuses with ``code``; ``what`` names the operation in messages."""
        self.rule(
            modules=modules,
            functions=functions,
            methods=methods,
            likelihood="refused",
            codes=(code,),
            conditions=conditions or what,
            data_first=False,
            name=f"refuse {code}",
        )(_Refusal(code, what))

    def add_structure(self, key: str, description: str, **declared: Any) -> Callable[[Builder], Builder]:
        """Decorator: a rule for the graph's structure (``"duplicate"``, ``"base:<name>"``)."""

        def register(build: Builder) -> Builder:
            declared.setdefault("likelihood", "exact")
            declared["layers"] = _names(declared.get("layers", ()))
            spec = RuleSpec(build.__name__.strip("_"), build, **declared)
            self.structure[key] = Rule("structure", key, spec, description)
            return build

        return register

    # -- lookup -----------------------------------------------------------------------------
    def lookup_module(self, module: nn.Module) -> Rule | None:
        return self.modules.get(type(module))

    def lookup_function(self, fn: Any) -> Rule | None:
        try:
            rule = self.functions.get(fn)
        except TypeError:  # unhashable target
            rule = None
        if rule is None and self.named_functions:
            rule = self.named_functions.get(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}")
        return rule

    def lookup_method(self, name: str) -> Rule | None:
        return self.methods.get(name)

    def lookup(self, node: fx.Node, module: nn.Module | None = None) -> Rule | None:
        if node.op == "call_module":
            return self.lookup_module(module) if module is not None else None
        if node.op == "call_function":
            if node.target is duplicate:
                return self.structure.get("duplicate")
            return self.lookup_function(node.target)
        if node.op == "call_method":
            return self.lookup_method(node.target)
        return None

    @property
    def leaf_types(self) -> frozenset[type]:
        """Module types the tracer must keep as leaves."""
        return frozenset(self.modules)

    @property
    def bases(self) -> list[str]:
        """Names of the base densities (``convert(..., base=name)``)."""
        return [key.split(":", 1)[1] for key in self.structure if key.startswith("base:")]

    def _resolve(self, ctx: NodeContext) -> RuleSpec:
        rule = self.lookup(ctx.node, ctx.module)
        if rule is None:
            what = {"call_module": "module", "call_function": "function", "call_method": "tensor method"}.get(
                ctx.node.op, "operation"
            )
            raise Rejection(
                unsupported_code(ctx.node), f"no conversion rule for {what} {describe_target(ctx.node, ctx.module)}"
            )
        if rule.spec.data_first and ctx.node.op != "call_module":
            ctx.require_data_first()
        return rule.spec

    def build(self, ctx: NodeContext) -> FlowLayer:
        """Build the flow layer of ``ctx.node`` or raise :class:`Rejection`."""
        return self._resolve(ctx).build(ctx)

    def check(self, ctx: NodeContext) -> Verdict | FlowLayer:
        """Decide ``ctx.node`` without building where the rule declares a check (else build)."""
        spec = self._resolve(ctx)
        return spec.check(ctx) if spec.check is not None else spec.build(ctx)

    # -- documentation --------------------------------------------------------------------------
    def specs(self) -> list[tuple[RuleSpec, list[Rule]]]:
        """Every rule with its spellings (modules, functions, methods), in registration order."""
        found: dict[int, tuple[RuleSpec, list[Rule]]] = {}
        for table in (self.structure, self.modules, self.functions, self.methods, self.named_functions):
            for rule in table.values():
                found.setdefault(id(rule.spec), (rule.spec, []))[1].append(rule)
        return list(found.values())

    def markdown_table(self) -> str:
        """The table of ``docs/supported.md``: likelihood, operations, flow layers, conditions."""
        rank = {lik: i for i, lik in enumerate(LIKELIHOODS)}
        rows = ["| likelihood | operations | flow layer | conditions and notes |", "|---|---|---|---|"]
        # by likelihood class, then in registration order (refusals by code)
        specs = sorted(self.specs(), key=lambda item: (rank[item[0].likelihood], item[0].refused and item[0].codes[0]))
        for spec, rules in specs:
            ops = ", ".join(f"*{r.description}*" if r.kind == "structure" else f"`{r.documented_name}`" for r in rules)
            rows.append(f"| {spec.likelihood_column} | {ops} | {', '.join(spec.layers) or '-'} | {spec.conditions} |")
        return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class _Refusal:
    """The build function of a refusing rule (a picklable value, not a closure)."""

    code: str
    what: str

    @property
    def __name__(self) -> str:
        return f"refuse_{self.code}"

    def __call__(self, ctx: NodeContext) -> FlowLayer:
        raise Rejection(self.code, f"{self.what} `{ctx.node.name}` cannot be part of a flow")


_STRUCTURE: dict[str, Rule] = {}

REGISTRY = Registry()
"""The default rules (linear, convolution, activations, shape operations, pooling, merges, refusals)."""


# -- graph structure: fan-out and the base density of each output ------------------------------
@REGISTRY.add_structure(
    "duplicate",
    "a value with several consumers",
    likelihood="bound",
    layers=[FlowDuplicate],
    conditions="residual connections, a returned value that also feeds other nodes: copies made distinct by "
    "noise orthogonal to the inverse's weights (on the copies nearest to the output)",
)
def _duplicate(ctx: NodeContext) -> FlowLayer:
    return FlowDuplicate(ctx.arg(1, "copies"), ctx.in_shape, weights=ctx.arg(2, "weights"))


@REGISTRY.add_structure("base:standard", "each output", layers=[StandardNormal], conditions='base="standard" (default)')
def _standard_base(ctx: NodeContext) -> nn.Module:
    return StandardNormal(ctx.in_shape)


@REGISTRY.add_structure(
    "base:diagonal", "each output", layers=[DiagonalNormal], conditions='base="diagonal" (learnable)'
)
def _diagonal_base(ctx: NodeContext) -> nn.Module:
    return DiagonalNormal(ctx.in_shape)


_STRUCTURE.update(REGISTRY.structure)


# -- linear ---------------------------------------------------------------------------------
def _linear_weights(ctx: NodeContext) -> tuple[Tensor, Tensor | None]:
    weight, bias = ctx.param("weight", 1), ctx.param("bias", 2)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise Rejection(unsupported_code(ctx.node), "the linear weight is not a 2-D tensor")
    return weight.detach(), bias


#: ``audit`` tests a weight's rank only when its singular values cost at most this many multiply-adds
#: (G m n min(m, n)); a larger weight is factorized by ``convert`` alone (FC201 there), noted in the report.
AUDIT_RANK_BUDGET = 4e6


def _rank_verdict(blocks: Tensor, what: str) -> str | None:
    """FC201 for a singular block of ``blocks`` ``(G, m, n)`` when cheap; else the note that convert decides."""
    G, m, n = blocks.shape
    if G * m * n * min(m, n) > AUDIT_RANK_BUDGET:
        return f"rank not tested by audit ({what} {m}x{n}{f' x {G} groups' if G > 1 else ''}): convert factorizes it"
    s = torch.linalg.svdvals(blocks.detach().to(torch.float64))  # (G, min(m, n)), no bases
    smin, smax = s.min(-1).values, s.max(-1).values
    bad = smin <= DEFAULT_RTOL * smax
    if bool(bad.any()):
        g = int(torch.nonzero(bad)[0])
        where = f" (group {g} of {G})" if G > 1 else ""
        raise Rejection(
            "FC201",
            f"{what} of shape {m}x{n}{where} has smallest singular value {smin[g].item():.3g} <= {DEFAULT_RTOL:g} x "
            f"largest ({smax[g].item():.3g}); the map is not injective on its row space, log|det| would be -inf",
        )
    return None


def _check_linear(ctx: NodeContext) -> Verdict:
    """Shapes and the densities' size; the rank from the singular values where cheap (:data:`AUDIT_RANK_BUDGET`)."""
    weight, _ = _linear_weights(ctx)
    m, n = weight.shape
    if m == 0 or n == 0:
        raise Rejection("FC201", f"weight of shape {m}x{n} is empty")
    note = _rank_verdict(weight[None], "weight")
    k = abs(n - m)
    # the funnel's q(d | y) = N(A y + c, (P^T P)^-1): A (k x m), c, log sigma, and P's k x k lower part
    # up to FULL_COVARIANCE_MAX dropped coordinates (diagonal beyond); the augmentation's log tau
    full = k * k if k <= FULL_COVARIANCE_MAX else 0
    return Verdict(exact=m <= n, density_parameters=k * m + 2 * k + full if m < n else k, note=note)


@REGISTRY.rule(
    [nn.Linear, F.linear],
    "exact / bound",
    [FlowLinear],
    "bijection (square), funnel (fewer outputs, exact), augmentation (more outputs, bound); "
    "no singular value at or below 1e-6 x the largest (FC201)",
    codes=["FC201"],
    check=_check_linear,
)
def _linear(ctx: NodeContext) -> FlowLayer:
    weight = ctx.param("weight", 1)  # the user's: F.linear's matmul path depends on its requires_grad
    return FlowLinear(*_linear_weights(ctx), covariance="auto", fold_strided=weight.requires_grad)


# -- convolution (layers in flowconvert.conv and flowconvert.grouped) ------------------------
def _conv_args(ctx: NodeContext) -> dict[str, Any]:
    """The convolution's weight, bias and geometry, from the module or the ``F.conv*d`` call."""
    if ctx.module is not None:
        m = ctx.module
        names = ("weight", "bias", "stride", "padding", "dilation", "groups", "padding_mode")
        return {name: getattr(m, name) for name in names}
    return dict(
        weight=ctx.tensor(1, "weight"),
        bias=ctx.tensor(2, "bias"),
        stride=ctx.arg(3, "stride", 1),
        padding=ctx.arg(4, "padding", 0),
        dilation=ctx.arg(5, "dilation", 1),
        groups=ctx.arg(6, "groups", 1),
        padding_mode="zeros",
    )


def _check_conv(ctx: NodeContext) -> Verdict:
    """The layer's configuration and shapes (as its constructor checks them), exactness and density size
    from the geometry alone; the kernel's rank only where cheap (:data:`AUDIT_RANK_BUDGET`)."""
    from .conv import conv_geometry

    args = _conv_args(ctx)
    weight = args.pop("weight")
    args.pop("bias")
    geo = conv_geometry(weight.shape, ctx.in_shape, **args)
    blocks = weight.detach().reshape(geo.groups, geo.m, geo.n)
    note = _rank_verdict(blocks, "convolution kernel")
    return Verdict(exact=geo.exact, density_parameters=geo.density_parameters(), note=note)


@REGISTRY.rule(
    [nn.Conv1d, nn.Conv2d, F.conv1d, F.conv2d],
    "exact / bound",
    ["FlowConv", "FlowGroupedConv"],
    "Pad -> Tile -> Kernel; padding or overlapping windows make it a bound; groups > 1 (depthwise) "
    "as one layer with a block-diagonal kernel; zero padding only (FC203)",
    codes=["FC201", "FC203"],
    check=_check_conv,
)
def _conv(ctx: NodeContext) -> FlowLayer:
    from .conv import FlowConv
    from .grouped import FlowGroupedConv

    args = _conv_args(ctx)
    cls = FlowGroupedConv if args["groups"] > 1 else FlowConv
    return cls(args.pop("weight"), args.pop("bias"), input_shape=ctx.in_shape, **args)


# -- activations ----------------------------------------------------------------------------
@REGISTRY.rule([nn.LeakyReLU, F.leaky_relu], "exact", [FlowLeakyReLU], "slope > 0 (FC202 otherwise)", codes=["FC202"])
def _leaky_relu(ctx: NodeContext) -> FlowLayer:
    return FlowLeakyReLU(ctx.param("negative_slope", 1, 0.01))


# -- substitutions: activations without an inverse, replaced by an invertible approximation --------
@dataclass(frozen=True)
class SubstitutionPolicy:
    """An activation family that conversion may replace by an invertible approximation.

    ``convert(model, x, relu="leaky")`` substitutes every family with ``with_relu_leaky``;
    ``convert(..., substitute={"gelu": "leaky"})`` names further families explicitly (and
    ``substitute={"relu6": None}`` keeps one refused). Without a substitution the family is
    refused with ``code``.
    """

    family: str
    code: str
    substitutes: tuple[str, ...]
    with_relu_leaky: bool
    description: str


SUBSTITUTIONS: dict[str, SubstitutionPolicy] = {
    s.family: s
    for s in (
        SubstitutionPolicy("relu", "FC101", ("leaky",), True, "ReLU -> LeakyReLU(negative_slope)"),
        SubstitutionPolicy("relu6", "FC106", ("leaky",), True, "ReLU6 -> leaky clamp to [0, 6]"),
        SubstitutionPolicy("hardtanh", "FC106", ("leaky",), True, "Hardtanh -> leaky clamp to [min_val, max_val]"),
        SubstitutionPolicy(
            "hardsigmoid", "FC106", ("leaky",), True, "Hardsigmoid -> leaky clamp of x/6 + 1/2 to [0, 1]"
        ),
        SubstitutionPolicy(
            "clamp", "FC106", ("leaky",), True, "torch.clamp / clip with constant bounds -> leaky clamp"
        ),
        SubstitutionPolicy("gelu", "FC102", ("leaky",), False, "GELU -> LeakyReLU(negative_slope)"),
        SubstitutionPolicy("silu", "FC102", ("leaky",), False, "SiLU (swish) -> LeakyReLU(negative_slope)"),
        SubstitutionPolicy("hardswish", "FC102", ("leaky",), False, "Hardswish -> LeakyReLU(negative_slope)"),
        SubstitutionPolicy("mish", "FC102", ("leaky",), False, "Mish -> LeakyReLU(negative_slope)"),
    )
}
"""The substitution policies, as data: family -> :class:`SubstitutionPolicy` (documented in docs/supported.md)."""


def resolve_substitutions(relu: str | None = None, substitute: dict[str, str | None] | None = None) -> dict[str, str]:
    """The family -> substitute mapping for ``convert(..., relu=..., substitute=...)``.

    >>> resolve_substitutions("leaky", {"gelu": "leaky", "relu6": None})["gelu"]
    'leaky'
    >>> "relu6" in resolve_substitutions("leaky", {"relu6": None}), "gelu" in resolve_substitutions("leaky")
    (False, False)
    """
    if relu not in (None, "leaky"):
        raise ValueError(f"relu must be None (refuse ReLU) or 'leaky', got {relu!r}")
    chosen = {f: "leaky" for f, s in SUBSTITUTIONS.items() if s.with_relu_leaky} if relu == "leaky" else {}
    if substitute is not None and not isinstance(substitute, dict):
        raise ValueError(f"substitute must be a dict {{family: substitute or None}}, got {type(substitute).__name__}")
    for family, name in (substitute or {}).items():
        if family not in SUBSTITUTIONS:
            raise ValueError(f"substitute: unknown activation family {family!r}; known: {sorted(SUBSTITUTIONS)}")
        if name is None:
            chosen.pop(family, None)
        elif name not in SUBSTITUTIONS[family].substitutes:
            raise ValueError(f"substitute[{family!r}] must be one of {SUBSTITUTIONS[family].substitutes}, got {name!r}")
        else:
            chosen[family] = name
    return chosen


def _substitute(
    ctx: NodeContext, family: str, what: str, build: Callable[[float], FlowLayer], detail: str
) -> FlowLayer:
    """Build the substitute of ``family`` when the conversion options ask for it, else refuse."""
    policy = SUBSTITUTIONS[family]
    chosen = ctx.options.get("substitute")
    if chosen is None:  # options given directly (a rule called outside convert): the relu policy alone
        chosen = resolve_substitutions(ctx.options.get("relu"))
    if chosen.get(family) is None:
        how = (
            'convert(..., relu="leaky")'
            if policy.with_relu_leaky
            else f'convert(..., substitute={{"{family}": "leaky"}})'
        )
        raise Rejection(policy.code, f"{what} `{ctx.node.name}` cannot be part of a flow ({how} substitutes {detail})")
    slope = float(ctx.options.get("negative_slope", 0.01))
    layer = build(slope)
    ctx.substitute(what, f"{detail} (negative_slope={slope:g})")
    return layer


@REGISTRY.rule(
    [nn.ReLU, F.relu, torch.relu, "relu"],
    "substitution",
    [FlowLeakyReLU],
    'refused by default; convert(..., relu="leaky", negative_slope=0.01) substitutes LeakyReLU and reports, per '
    "node, its own output deviation and the accumulated one",
    codes=["FC101"],
)
def _relu(ctx: NodeContext) -> FlowLayer:
    return _substitute(ctx, "relu", "ReLU", FlowLeakyReLU, "LeakyReLU")


def _bound(ctx: NodeContext, value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejection("FC106", f"`{ctx.node.name}` clamps to a {type(value).__name__} {name}, not a constant number")
    return float(value)


def _interval(low: float | None, high: float | None) -> str:
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


@REGISTRY.rule(
    [
        nn.ReLU6,
        nn.Hardtanh,
        nn.Hardsigmoid,
        F.relu6,
        F.hardtanh,
        F.hardsigmoid,
        torch.clamp,
        torch.clip,
        torch.clamp_min,
        torch.clamp_max,
        "clamp",
        "clip",
        "clamp_min",
        "clamp_max",
    ],
    "substitution",
    [FlowLeakyClamp],
    'refused by default; relu="leaky" substitutes a leaky clamp (identity between the bounds, slope '
    "negative_slope outside; Hardsigmoid as a clamp of x/6 + 1/2) with the deviation reported per node; clamps "
    "need constant bounds",
    codes=["FC106"],
)
def _clamp_family(ctx: NodeContext) -> FlowLayer:
    """ReLU6, Hardtanh, Hardsigmoid and clamps with constant bounds: a leaky clamp under ``relu="leaky"``."""
    target, module = ctx.node.target, ctx.module
    scale, shift = 1.0, 0.0
    if isinstance(module, nn.ReLU6) or target is F.relu6:
        family, what, low, high = "relu6", "ReLU6", 0.0, 6.0
    elif isinstance(module, nn.Hardtanh) or target is F.hardtanh:
        family, what = "hardtanh", "Hardtanh"
        low = _bound(ctx, ctx.param("min_val", 1, -1.0), "min_val")
        high = _bound(ctx, ctx.param("max_val", 2, 1.0), "max_val")
    elif isinstance(module, nn.Hardsigmoid) or target is F.hardsigmoid:
        family, what, low, high, scale, shift = "hardsigmoid", "Hardsigmoid", 0.0, 1.0, 1.0 / 6.0, 0.5
    else:
        family, what = "clamp", describe_target(ctx.node)
        if target in (torch.clamp_min, "clamp_min"):
            low, high = _bound(ctx, ctx.arg(1, "min"), "min"), None
        elif target in (torch.clamp_max, "clamp_max"):
            low, high = None, _bound(ctx, ctx.arg(1, "max"), "max")
        else:
            low, high = _bound(ctx, ctx.arg(1, "min"), "min"), _bound(ctx, ctx.arg(2, "max"), "max")
        if low is None and high is None:
            raise Rejection("FC106", f"`{ctx.node.name}` clamps without bounds")
    pre = " of x/6 + 1/2" if (scale, shift) != (1.0, 0.0) else ""
    return _substitute(
        ctx,
        family,
        what,
        lambda a: FlowLeakyClamp(low, high, a, scale, shift),
        f"a leaky clamp{pre} to {_interval(low, high)}",
    )


_SMOOTH = {
    nn.GELU: ("gelu", "GELU"),
    F.gelu: ("gelu", "GELU"),
    nn.SiLU: ("silu", "SiLU"),
    F.silu: ("silu", "SiLU"),
    nn.Hardswish: ("hardswish", "Hardswish"),
    F.hardswish: ("hardswish", "Hardswish"),
    nn.Mish: ("mish", "Mish"),
    F.mish: ("mish", "Mish"),
}


@REGISTRY.rule(
    list(_SMOOTH),
    "substitution",
    [FlowLeakyReLU],
    'not monotone: refused, also under relu="leaky", unless named: convert(..., substitute={"gelu": "leaky"}) '
    '(families "gelu", "silu", "hardswish", "mish"; the table is flowconvert.registry.SUBSTITUTIONS)',
    codes=["FC102"],
)
def _smooth_relu(ctx: NodeContext) -> FlowLayer:
    """GELU, SiLU, Hardswish, Mish: refused (FC102) unless ``substitute={family: "leaky"}`` names them."""
    family, what = _SMOOTH[type(ctx.module) if ctx.module is not None else ctx.node.target]
    return _substitute(ctx, family, what, FlowLeakyReLU, "LeakyReLU")


# -- elementwise bijections (flowconvert.elementwise) --------------------------------------------
@REGISTRY.rule([nn.Tanh, torch.tanh, F.tanh, "tanh"], "exact", [FlowTanh], "stable log-derivative")
def _tanh(ctx: NodeContext) -> FlowLayer:
    return FlowTanh()


@REGISTRY.rule([nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"], "exact", [FlowSigmoid], "stable log-derivative")
def _sigmoid(ctx: NodeContext) -> FlowLayer:
    return FlowSigmoid()


@REGISTRY.rule([nn.ELU, F.elu], "exact", [FlowELU], "alpha > 0 (FC212 otherwise)", codes=["FC212"])
def _elu(ctx: NodeContext) -> FlowLayer:
    return FlowELU(ctx.param("alpha", 1, 1.0))


@REGISTRY.rule([nn.SELU, F.selu, torch.selu], "exact", [FlowELU], "SELU's fixed alpha and scale")
def _selu(ctx: NodeContext) -> FlowLayer:
    return FlowELU.selu()


@REGISTRY.rule([nn.Softplus, F.softplus], "exact", [FlowSoftplus], "beta and threshold as in torch")
def _softplus(ctx: NodeContext) -> FlowLayer:
    return FlowSoftplus(ctx.param("beta", 1, 1.0), ctx.param("threshold", 2, 20.0))


@REGISTRY.rule(
    [nn.PReLU, F.prelu, torch.prelu], "exact", [FlowPReLU], "all slopes > 0 (FC212 otherwise)", codes=["FC212"]
)
def _prelu(ctx: NodeContext) -> FlowLayer:
    return FlowPReLU(ctx.param("weight", 1))


@REGISTRY.rule(
    [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm],
    "exact",
    [FlowBatchNorm],
    "eval mode with running statistics (FC211), no zero scale (FC210)",
    codes=["FC210", "FC211"],
)
def _batch_norm(ctx: NodeContext) -> FlowLayer:
    if ctx.module is not None:
        if ctx.training:
            raise Rejection(
                "FC211",
                f"{describe_target(ctx.node, ctx.module)} is in training mode: it normalizes with each batch's "
                "statistics, while a flow can only use the running statistics (call model.eval() first)",
            )
        return FlowBatchNorm.from_module(ctx.module)
    mean, var = ctx.tensor(1, "running_mean"), ctx.tensor(2, "running_var")
    if ctx.arg(5, "training", False) or mean is None or var is None:
        raise Rejection("FC211", "F.batch_norm is called with training=True or without running statistics")
    return FlowBatchNorm(mean, var, ctx.tensor(3, "weight"), ctx.tensor(4, "bias"), ctx.arg(7, "eps", 1e-5))


# -- shape operations: per-sample shapes come from shape propagation --------------------------
@REGISTRY.rule(
    [
        nn.Flatten,
        nn.Unflatten,
        torch.flatten,
        torch.reshape,
        torch.squeeze,
        torch.unsqueeze,
        "view",
        "reshape",
        "flatten",
        "squeeze",
        "unsqueeze",
        "unflatten",
    ],
    "exact",
    [Reshape],
    "L = 0",
)
def _reshape(ctx: NodeContext) -> FlowLayer:
    if ctx.out_shape is None:
        raise Rejection(unsupported_code(ctx.node), "the result is not a tensor")
    return Reshape(ctx.in_shape, ctx.out_shape)


def _permutation(ctx: NodeContext, dims: Sequence[int]) -> Permute:
    ndim = len(ctx.in_shape) + 1
    dims = tuple(int(d) % ndim for d in dims)
    if sorted(dims) != list(range(ndim)):
        raise Rejection(unsupported_code(ctx.node), f"{dims} is not a permutation of {ndim} dims")
    if dims[0] != 0:
        raise Rejection("FC113", f"the permutation {dims} moves the batch dimension")
    return Permute(dims)


_PERMUTE_CONDITIONS = "the batch dimension stays first (FC113)"


@REGISTRY.rule([torch.permute, "permute"], "exact", [Permute], _PERMUTE_CONDITIONS, codes=["FC113"])
def _permute(ctx: NodeContext) -> FlowLayer:
    rest = ctx.args[1:] or (ctx.kwargs.get("dims"),)
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    return _permutation(ctx, dims)


@REGISTRY.rule(
    [torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims"],
    "exact",
    [Permute],
    _PERMUTE_CONDITIONS,
    codes=["FC113"],
)
def _transpose(ctx: NodeContext) -> FlowLayer:
    ndim = len(ctx.in_shape) + 1
    a, b = (int(ctx.arg(i, n)) % ndim for i, n in ((1, "dim0"), (2, "dim1")))
    dims = list(range(ndim))
    dims[a], dims[b] = dims[b], dims[a]
    return _permutation(ctx, dims)


# -- identities ----------------------------------------------------------------------------
@REGISTRY.rule(
    [
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        "contiguous",
        "clone",
        "detach",
    ],
    "exact",
    [FlowIdentity],
    "L = 0",
)
def _identity(ctx: NodeContext) -> FlowLayer:
    return FlowIdentity()


@REGISTRY.rule(
    [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout],
    "exact",
    [FlowIdentity],
    "training=False or p=0 (FC114 otherwise)",
    codes=["FC114"],
)
def _dropout(ctx: NodeContext) -> FlowLayer:
    return _identity_in_eval(ctx.arg(1, "p", 0.5), ctx.arg(2, "training", True), function_name(ctx.node.target))


def _identity_in_eval(p: float, training: bool, what: str) -> FlowLayer:
    """A random drop that drops nothing (``training=False`` or ``p=0``) is the identity; else FC114."""
    if training and p > 0:
        raise Rejection("FC114", f"{what} is called with training=True, p={p}")
    return FlowIdentity()


@REGISTRY.rule(
    named_functions=["torchvision.ops.stochastic_depth.stochastic_depth"],
    likelihood="exact",
    layers=[FlowIdentity],
    conditions="torchvision's stochastic depth: the identity in eval mode (training=False or p=0; FC114 otherwise)",
    codes=["FC114"],
)
def _stochastic_depth(ctx: NodeContext) -> FlowLayer:
    """``torchvision.ops.stochastic_depth(x, p, mode, training)``: the identity when it drops nothing."""
    return _identity_in_eval(ctx.arg(1, "p", 0.0), ctx.arg(3, "training", True), f"stochastic_depth `{ctx.node.name}`")


# -- arithmetic: with a constant (affine bijection), or of two data values (a + b funnel) -------
_ARITHMETIC = {
    operator.add: "add", torch.add: "add", "add": "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub", torch.subtract: "sub", "subtract": "sub",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", torch.multiply: "mul", "multiply": "mul",
    operator.truediv: "div", torch.div: "div", "div": "div", torch.true_divide: "div", "true_divide": "div",
    torch.divide: "div", "divide": "div",
}  # fmt: skip


@REGISTRY.rule(
    list(_ARITHMETIC),
    "exact",
    [FlowScalarAffine, FlowSum],
    "with a constant: affine bijection (non-zero factor, FC213); of two data values of one shape: "
    "a + b / a - b funnel; products of data values are refused (FC131)",
    codes=["FC131", "FC213", "FC305"],
    data_first=False,
)
def _arithmetic(ctx: NodeContext) -> FlowLayer:
    op = _ARITHMETIC[ctx.node.target]
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    unsupported = unsupported_code(ctx.node)
    if ctx.kwargs.get("alpha", 1) != 1 or ctx.kwargs.get("rounding_mode") is not None:
        raise Rejection(unsupported, f"{describe_target(ctx.node)} with alpha/rounding_mode is not supported")
    if a is DATA_ARG and b is DATA_ARG:
        if op in ("mul", "div"):
            raise Rejection("FC131", f"`{ctx.node.name}` multiplies or divides two data values")
        if len(set(ctx.in_shapes)) != 1 or ctx.out_shape != ctx.in_shapes[0]:
            raise Rejection(
                "FC305", f"`{ctx.node.name}` adds values of different shapes {list(ctx.in_shapes)} (broadcasting)"
            )
        return FlowSum(ctx.in_shapes[0], subtract=op == "sub")
    if a is DATA_ARG:
        const = b
    elif b is DATA_ARG:
        const = a
        if op == "sub":
            op = "rsub"
        elif op == "div":
            raise Rejection(unsupported, f"`{ctx.node.name}` divides a constant by a data value (a reciprocal)")
    else:
        raise Rejection(unsupported, "no data argument")
    if not isinstance(const, (int, float, Tensor)) or isinstance(const, bool):
        raise Rejection(unsupported, f"`{ctx.node.name}`: constant of type {type(const).__name__}")
    if ctx.out_shape != ctx.in_shape:
        raise Rejection(unsupported, f"`{ctx.node.name}`: the constant broadcasts {ctx.in_shape} to {ctx.out_shape}")
    return FlowScalarAffine(op, const)


@REGISTRY.rule([operator.neg, torch.neg, torch.negative, "neg", "negative"], "exact", [FlowScalarAffine], "L = 0")
def _neg(ctx: NodeContext) -> FlowLayer:
    return FlowScalarAffine("neg")


# -- concatenation and splitting along a feature dimension ----------------------------------------
def _feature_dim(ctx: NodeContext, dim: int, ndim: int) -> int:
    d = int(dim) % ndim
    if d == 0:
        raise Rejection("FC215", f"`{ctx.node.name}` concatenates or splits along the batch dimension")
    return d


@REGISTRY.rule(
    [torch.cat, torch.concat, torch.concatenate],
    "exact",
    [FlowCat],
    "data values only, along a feature dimension (FC305, FC215)",
    codes=["FC305", "FC215"],
    data_first=False,
)
def _cat(ctx: NodeContext) -> FlowLayer:
    parts = ctx.arg(0, "tensors")
    if not isinstance(parts, (tuple, list)) or any(p is not DATA_ARG for p in parts):
        raise Rejection(
            "FC305", f"`{ctx.node.name}` concatenates data with constants (that adds coordinates without a density)"
        )
    ndim = len(ctx.in_shapes[0]) + 1
    dim = _feature_dim(ctx, ctx.arg(1, "dim", ctx.kwargs.get("axis", 0)), ndim)
    if len(parts) == 1:  # torch.cat([x], 1), e.g. DenseNet's first dense layer: the identity
        return FlowIdentity()
    return FlowCat(dim, [shape[dim - 1] for shape in ctx.in_shapes])


@REGISTRY.rule(
    [torch.split, torch.chunk, "split", "chunk"],
    "exact",
    [FlowSplit],
    "every piece must be used (FC306)",
    codes=["FC306", "FC215"],
)
def _split(ctx: NodeContext) -> FlowLayer:
    ndim = len(ctx.in_shape) + 1
    chunk = ctx.node.target in (torch.chunk, "chunk")
    how = ctx.arg(1, "chunks" if chunk else "split_size_or_sections")
    if how is None and not chunk:
        how = ctx.kwargs.get("split_size")
    dim = _feature_dim(ctx, ctx.arg(2, "dim", 0), ndim)
    length = ctx.in_shape[dim - 1]
    return FlowSplit.from_chunk(dim, how, length) if chunk else FlowSplit.from_split(dim, how, length)


@REGISTRY.rule(
    [operator.getitem],
    "exact",
    [Reshape],
    "only indexing that keeps every element (x[:, None], x[...]); anything else drops data (FC132)",
    codes=["FC132"],
)
def _getitem(ctx: NodeContext) -> FlowLayer:
    index = ctx.arg(1, "index")
    items = index if isinstance(index, tuple) else (index,)
    keeps_all = all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)
    if not keeps_all:
        raise Rejection("FC132", f"`{ctx.node.name}` indexes a data value with {index!r}")
    if ctx.out_shape is None:
        raise Rejection("FC132", f"`{ctx.node.name}` does not return a tensor")
    return Reshape(ctx.in_shape, ctx.out_shape)


# -- pooling (flowconvert.pooling): tiling windows exact; overlapping windows Tile first (a bound) --
_POOL_CONDITIONS = (
    "any kernel, stride, padding, dilation (max), ceil_mode, count_include_pad, divisor_override, adaptive output "
    "size. Windows that tile the input: exact (max surjection / mean funnel). Padded cells are absent from their "
    "window (they never win a max and add nothing to a mean), so padded or ragged windows without overlap stay "
    "exact. Overlapping windows (MaxPool2d(3, 2, 1), AvgPool2d(3, 1, 1), adaptive to a non-dividing size) Tile "
    "first: a cell in N windows is copied N times with zero-sum noise (bound). A window covering the whole input "
    "is global pooling (exact), whatever its stride; F.adaptive_avg_pool2d(x, 1) too. return_indices=True is "
    "refused (FC214)"
)


@REGISTRY.rule(
    [
        nn.MaxPool1d,
        nn.MaxPool2d,
        F.max_pool1d,
        F.max_pool2d,
        torch.max_pool1d,
        torch.max_pool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        F.avg_pool1d,
        F.avg_pool2d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
    ],
    "exact / bound",
    [FlowMaxPool, FlowAvgPool, FlowWindowPool],
    _POOL_CONDITIONS,
    codes=["FC214"],
)
def _pool(ctx: NodeContext) -> FlowLayer:
    module = ctx.module
    if module is None:
        target, two_d = ctx.node.target, len(ctx.in_shape) == 3
        if target in (F.max_pool1d, F.max_pool2d, torch.max_pool1d, torch.max_pool2d):
            module = (nn.MaxPool2d if two_d else nn.MaxPool1d)(
                ctx.arg(1, "kernel_size"),
                ctx.arg(2, "stride", None),
                ctx.arg(3, "padding", 0),
                ctx.arg(4, "dilation", 1),
                ctx.arg(6, "return_indices", False),
                ctx.arg(5, "ceil_mode", False),
            )
        elif target in (F.avg_pool1d, F.avg_pool2d):
            args = (
                ctx.arg(1, "kernel_size"),
                ctx.arg(2, "stride", None),
                ctx.arg(3, "padding", 0),
                ctx.arg(4, "ceil_mode", False),
                ctx.arg(5, "count_include_pad", True),
            )
            module = (
                nn.AvgPool2d(*args, divisor_override=ctx.arg(6, "divisor_override", None))
                if two_d
                else nn.AvgPool1d(*args)
            )
        elif target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
            module = (nn.AdaptiveAvgPool2d if two_d else nn.AdaptiveAvgPool1d)(ctx.arg(1, "output_size"))
        else:
            module = (nn.AdaptiveMaxPool2d if two_d else nn.AdaptiveMaxPool1d)(
                ctx.arg(1, "output_size"), ctx.arg(2, "return_indices", False)
            )
    return pooling_layer(module, ctx.in_shape)


_REDUCTIONS = {torch.mean: "mean", "mean": "mean", torch.sum: "sum", "sum": "sum", torch.amax: "amax", "amax": "amax"}


@REGISTRY.rule(
    [torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"],
    "exact",
    [FlowReduce],
    "global pooling over any non-batch dimensions (x.mean((2, 3)), x.mean([-2, -1], keepdim=True), a token mean): "
    "the mean/sum is kept and the Helmert complement dropped (exact funnel), amax is the max surjection (exact); "
    "over the batch dimension FC113",
    codes=["FC113"],
)
def _reduce(ctx: NodeContext) -> FlowLayer:
    """``x.mean(dims)`` and friends: global pooling over the reduced dimensions (an exact funnel)."""
    how = _REDUCTIONS[ctx.node.target]
    dims = ctx.arg(1, "dim", ctx.kwargs.get("axis"))
    keepdim = bool(ctx.arg(2, "keepdim", False))
    if ctx.kwargs.get("dtype") is not None:
        raise Rejection(unsupported_code(ctx.node), f"`{ctx.node.name}` changes the dtype while reducing")
    ndim = len(ctx.in_shape) + 1
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
        raise Rejection("FC113", f"`{ctx.node.name}` reduces over every dimension, the batch included")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    if not all(isinstance(d, int) for d in dims):
        raise Rejection(unsupported_code(ctx.node), f"`{ctx.node.name}` reduces over dimensions {dims!r}")
    dims = tuple(int(d) % ndim for d in dims)
    if 0 in dims:
        raise Rejection("FC113", f"`{ctx.node.name}` reduces over the batch dimension")
    return FlowReduce(ctx.in_shape, tuple(d - 1 for d in dims), keepdim, how)


# -- refusals, with the reason in the diagnostic catalogue -----------------------------------
REGISTRY.reject(
    "FC130", "in-place operation", conditions="in-place operations",
    functions=[F.relu_, torch.relu_, F.elu_, F.leaky_relu_, torch.sigmoid_, torch.tanh_],
    methods=["relu_", "add_", "sub_", "mul_", "div_", "neg_", "sigmoid_", "tanh_", "copy_", "fill_", "zero_",
             "masked_fill_", "index_add_", "scatter_", "exp_", "pow_", "addcmul_", "addcdiv_", "clamp_", "clip_"],
)  # fmt: skip
REGISTRY.reject(
    "FC131", "attention or product of data values", conditions="attention and products of data values",
    modules=[nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Bilinear],
    functions=[F.scaled_dot_product_attention, F.multi_head_attention_forward, torch.matmul, operator.matmul,
               torch.bmm, torch.einsum, F.bilinear],
    methods=["matmul", "bmm"],
)  # fmt: skip
REGISTRY.reject(
    "FC132",
    "indexing that drops data",
    functions=[torch.narrow, torch.select, torch.index_select, torch.gather, torch.masked_select],
    methods=["narrow", "select", "index_select", "gather", "masked_select"],
)
REGISTRY.reject(
    "FC103", "normalization", conditions="per-sample normalization (LayerNorm etc.)",
    modules=[nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
             nn.LocalResponseNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else [])],
    functions=[F.layer_norm, F.group_norm, F.instance_norm, F.normalize, *([F.rms_norm] if hasattr(F, "rms_norm") else [])],
)  # fmt: skip
REGISTRY.reject(
    "FC104",
    "softmax",
    modules=[nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d],
    functions=[F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax],
    methods=["softmax", "log_softmax"],
)
REGISTRY.reject(
    "FC105", "pooling", conditions="3-D and LP pooling",
    modules=[nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d],
    functions=[F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d],
)  # fmt: skip
REGISTRY.reject(
    "FC106",
    "saturating activation",
    conditions="saturating (no substitute: the threshold value is arbitrary)",
    modules=[nn.Threshold],
    functions=[F.threshold],
)
REGISTRY.reject(
    "FC109", "reduction", conditions="reductions without a flow layer; mean/sum/amax over non-batch dims are global pooling (FlowReduce)",
    functions=[torch.std, torch.var, torch.norm, torch.prod, torch.logsumexp, torch.median, torch.max, torch.min,
               torch.amin, torch.argmax, torch.argmin, torch.std_mean, torch.var_mean],
    methods=["std", "var", "norm", "prod", "logsumexp", "median", "max", "min", "amin", "argmax", "argmin"],
)  # fmt: skip
REGISTRY.reject(
    "FC107",
    "activation",
    conditions="monotone but no flow layer yet",
    modules=[nn.CELU, nn.LogSigmoid],
    functions=[F.celu, F.logsigmoid],
)
