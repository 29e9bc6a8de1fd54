r"""``audit`` and ``convert``: capture -> rules -> graph analysis -> report -> flow model.

>>> import torch, flowconvert as fc
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
>>> report = fc.audit(net, torch.randn(1, 3))
>>> report.convertible, report.counts
(False, {'FC101': 1})
>>> try:
...     fc.convert(net, torch.randn(1, 3))
... except fc.ConversionError as err:
...     print(err.code, err.report is not None)
FC101 True
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from .analysis import build_graph, check_data_flow, data_uses
from .core import FlowLayer
from .densities import ConditionalDiagonalNormal, DiagonalNormal, GaussianNoise, StandardNormal
from .errors import ConversionError, FlowConversionError, TracingError
from .flow import FlowModel, FlowPlan, Step
from .merging import FlowDuplicate
from .registry import DATA_ARG, REGISTRY, NodeContext, Registry, Rejection, Substitution, describe_target
from .report import CONVERTED, PASSTHROUGH, REJECTED, NodeReport, Problem, Report
from .tracing import DATA, ExampleInputError, as_input_tuple, capture, data_inputs, per_sample_shape

__all__ = ["audit", "convert", "audit_and_convert", "BASES"]

#: Base densities by name: ``convert(..., base="standard" | "diagonal")``.
BASES = {"standard": StandardNormal, "diagonal": DiagonalNormal}
_DENSITY_TYPES = (ConditionalDiagonalNormal, GaussianNoise, DiagonalNormal, StandardNormal)


def audit(
    model: nn.Module, example_inputs: Any, *, base: str = "standard", registry: Registry = REGISTRY,
    relu: str | None = None, negative_slope: float = 0.01,
) -> Report:
    """Trace ``model`` on ``example_inputs`` and report, node by node, what can be flowified.

    Never raises for unsupported nodes or untraceable code (they are problems in the
    report); raises :class:`~flowconvert.tracing.ExampleInputError` when the model fails on
    the example inputs. The model is not modified.
    """
    return audit_and_convert(
        model, example_inputs, base=base, registry=registry, relu=relu, negative_slope=negative_slope
    )[0]


def convert(
    model: nn.Module, example_inputs: Any, *, base: str = "standard", registry: Registry = REGISTRY,
    relu: str | None = None, negative_slope: float = 0.01,
) -> FlowModel:
    """Convert ``model`` into a :class:`~flowconvert.flow.FlowModel`.

    ``base`` is the base density of each output: ``"standard"`` (standard normal) or
    ``"diagonal"`` (learnable diagonal Gaussian). Raises :class:`~flowconvert.errors.ConversionError`
    (with the full report as ``.report``) when any node blocks the conversion.

    ``relu="leaky"`` substitutes ``LeakyReLU(negative_slope)`` for every ReLU (refused by
    default, FC101): the flow then computes a slightly different function. The report
    (``flow.report``) lists each substituted node and the largest deviation of the flow's
    outputs from the original model's on ``example_inputs``.
    """
    report, flow = audit_and_convert(
        model, example_inputs, base=base, registry=registry, relu=relu, negative_slope=negative_slope
    )
    if flow is None:
        problems = report.problems
        first_node, first = problems[0]
        lines = [f"cannot convert {report.model}: {len(problems)} problem{'s' * (len(problems) != 1)} (see .report)"]
        lines += [
            f"  [{p.code}] {n.name}: {p.message}" + (f" ({p.location})" if p.location else "") for n, p in problems
        ]
        raise ConversionError("\n".join(lines), report=report, code=first.code, location=first.location)
    return flow


def audit_and_convert(
    model: nn.Module, example_inputs: Any, *, base: str = "standard", registry: Registry = REGISTRY,
    relu: str | None = None, negative_slope: float = 0.01,
) -> tuple[Report, FlowModel | None]:
    """The report, and the flow model when the model is convertible (else ``None``)."""
    if base not in BASES:
        raise ValueError(f"base must be one of {sorted(BASES)}, got {base!r}")
    if relu not in (None, "leaky"):
        raise ValueError(f"relu must be None (refuse ReLU) or 'leaky', got {relu!r}")
    options = {"relu": relu, "negative_slope": float(negative_slope)} if relu else {}
    inputs = as_input_tuple(example_inputs)
    name = type(model).__name__
    in_shapes = [tuple(t.shape[1:]) for t in inputs]
    try:
        cap = capture(model, inputs, leaf_types=registry.leaf_types)
    except ExampleInputError:
        raise
    except TracingError as err:
        problem = Problem(err.code or "FC303", err.message, err.location)
        node = NodeReport("<trace>", "trace", name, REJECTED, problems=[problem])
        return Report(name, [node], input_shapes=in_shapes, base=base), None

    gm, batch = cap.module, cap.batch
    modules = dict(gm.named_modules())
    module_of = lambda n: modules.get(n.target) if n.op == "call_module" else None
    describe = lambda n: describe_target(n, module_of(n))

    entries: dict[str, NodeReport] = {}
    layers: dict[str, FlowLayer] = {}
    aliases: dict[str, tuple[str, int]] = {}  # getitem nodes naming one output of a multi-output layer
    for node in gm.graph.nodes:
        entry = NodeReport(
            node.name, node.op, describe(node), PASSTHROUGH,
            node_location=node.meta.get("fc_location"), shape=per_sample_shape(node),
        )
        entries[node.name] = entry
        if node.meta.get("fc_kind") == DATA and node.op != "placeholder":
            sources = data_inputs(node)
            if len(sources) == 1 and _num_outputs(layers.get(sources[0].name)) > 1:
                problem = _alias(node, sources[0], layers[sources[0].name], aliases)
                if problem is not None:
                    entry.problems.append(problem)
                continue
            layer, problem, substitution = _convert_node(node, module_of(node), registry, batch, options)
            if layer is not None:
                layers[node.name] = layer
                entry.likelihood = "exact" if layer.exact else "bound"
                if substitution is not None:
                    entry.substitution = substitution
                    entry.note = str(substitution)
            if problem is not None:
                entry.problems.append(problem)

    graph = build_graph(gm.graph, describe=describe)
    for finding in check_data_flow(graph):
        entry = entries[finding.node]
        if finding.code == "FC304":
            if _num_outputs(layers.get(finding.node)) > 1:
                continue  # the pieces of a split are checked by _alias
            # a tensor with several consumers is duplicated by an augmentation layer (a bound)
            entry.note = _join(entry.note, f"used {data_uses(graph, finding.node)} times: duplicated (FlowDuplicate, bound)")
            entry.fanout = True
            continue
        if finding.code == "FC305" and (finding.node in layers or entry.problems):
            continue  # a merge with a flow layer, or already explained by its rule
        entry.problems.append(Problem(finding.code, finding.message, finding.location))
    for layer_name, layer in layers.items():
        if _num_outputs(layer) > 1:
            used = sorted(i for src, i in aliases.values() if src == layer_name)
            missing = [i for i in range(_num_outputs(layer)) if i not in used]
            if missing:
                entries[layer_name].problems.append(Problem(
                    "FC306", f"piece(s) {missing} of `{layer_name}` are never used: their coordinates would be dropped",
                    entries[layer_name].node_location,
                ))
    for entry in entries.values():
        entry.status = REJECTED if entry.problems else (CONVERTED if entry.name in layers else PASSTHROUGH)
        graph.nodes[entry.name].update(
            status=entry.status, likelihood=entry.likelihood, codes=[p.code for p in entry.problems]
        )

    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_nodes: list[fx.Node] = []
    fx.node.map_aggregate(output.args[0], lambda a: out_nodes.append(a) if isinstance(a, fx.Node) else None)
    data_outs = [n for n in out_nodes if n.meta.get("fc_kind") == DATA and "fc_shape" in n.meta]
    out_shapes = [per_sample_shape(n) for n in data_outs]
    bases = {n.name: BASES[base](per_sample_shape(n)) for n in data_outs}
    density_params = sum(
        p.numel()
        for m in [*layers.values(), *bases.values()]
        for sub in m.modules()
        if isinstance(sub, _DENSITY_TYPES)
        for p in sub.parameters(recurse=False)
    )
    report = Report(
        name, list(entries.values()), graph, input_shapes=in_shapes, output_shapes=out_shapes,
        density_parameters=density_params, base=base,
    )
    if not report.convertible:
        return report, None
    flow = _assemble(gm, inputs, layers, BASES[base], output, aliases)
    if report.substitutions:
        with torch.no_grad():
            expected = _flat(gm(*inputs))
            got = _flat(flow(*inputs))
        report.max_output_deviation = max(
            ((a.double() - b.double()).abs().max().item() for a, b in zip(expected, got) if a.numel()), default=0.0
        )
    flow.report = report
    return report, flow


def _flat(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(out, lambda a: found.append(a) if isinstance(a, torch.Tensor) else None)
    return found


def _join(a: str | None, b: str) -> str:
    return b if not a else f"{a}; {b}"


def _num_outputs(layer: FlowLayer | None) -> int:
    return int(getattr(layer, "num_outputs", 1)) if layer is not None else 1


def _alias(node: fx.Node, source: fx.Node, layer: FlowLayer, aliases: dict[str, tuple[str, int]]) -> Problem | None:
    """``node`` reads one output of the multi-output ``layer``: record it, or say why it cannot."""
    where = node.meta.get("fc_location")
    index = node.args[1] if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 else None
    if not isinstance(index, int) or node.args[0] is not source:
        return Problem("FC132", f"`{node.name}` uses the pieces of `{source.name}` other than by a constant index", where)
    index %= _num_outputs(layer)
    if any(v == (source.name, index) for v in aliases.values()):
        return Problem("FC304", f"piece {index} of `{source.name}` is read more than once", where)
    aliases[node.name] = (source.name, index)
    return None


def _data_occurrences(node: fx.Node) -> list[fx.Node]:
    """The data arguments of a node in argument order, with repeats (``a + a`` has two)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a.meta.get("fc_kind") == DATA else None)
    return found


def _convert_node(
    node: fx.Node, module: nn.Module | None, registry: Registry, batch: int, options: dict | None = None
) -> tuple[FlowLayer | None, Problem | None, Substitution | None]:
    """Build the flow layer of one data node, or say why not (and the substitution it makes)."""
    where = node.meta.get("fc_location")
    sources = data_inputs(node)
    occurrences = _data_occurrences(node)
    if not sources:
        return None, None, None
    if not node.meta.get("fc_batch_ok", True):
        shape, check = node.meta.get("fc_shape"), node.meta.get("fc_shape_check")
        if check is None:
            why = f"it fails when the batch size changes from {batch} to {batch + 1}"
        elif shape[0] != batch:
            why = f"its result has shape {tuple(shape)} for a batch of {batch} samples"
        else:
            why = f"its per-sample shape changes with the batch size ({tuple(shape[1:])} vs {tuple(check[1:])})"
        return None, Problem("FC113", f"{describe_target(node, module)} does not keep samples apart: {why}", where), None
    source = sources[0]
    resolve = lambda a: DATA_ARG if a.meta.get("fc_kind") == DATA else a.meta.get("fc_value")
    args = fx.node.map_arg(node.args, resolve)
    kwargs = fx.node.map_arg(node.kwargs, resolve)
    in_shapes = tuple(per_sample_shape(n) or () for n in occurrences)
    ctx = NodeContext(
        node, module, tuple(args), dict(kwargs), per_sample_shape(source) or (), per_sample_shape(node),
        in_shapes=in_shapes, options=dict(options or {}),
    )
    if any(per_sample_shape(n) is None for n in occurrences):
        return None, Problem("FC132", f"{describe_target(node, module)} reads a tuple of values as a whole", where), None
    try:
        layer = registry.build(ctx)
    except Rejection as rej:
        return None, Problem(rej.code, rej.message, where), None
    except FlowConversionError as err:
        return None, Problem(err.code or "FC120", err.message, where), None
    except Exception as exc:  # noqa: BLE001 - an audit reports, it does not crash
        return None, Problem("FC120", f"{describe_target(node, module)}: {type(exc).__name__}: {exc}", where), None
    if not isinstance(layer, FlowLayer):
        return None, Problem("FC120", f"the rule for {describe_target(node, module)} did not return a FlowLayer", where), None
    meta = source.meta.get("tensor_meta")
    if meta is not None and getattr(meta, "dtype", None) is not None and meta.dtype.is_floating_point:
        layer = layer.to(dtype=meta.dtype)  # density parameters follow the data's precision
    return layer, None, ctx.substitution


def _key(name: str, taken: set[str]) -> str:
    """A ModuleDict key for a node name (avoiding attribute names of ModuleDict)."""
    key = name
    while hasattr(nn.ModuleDict, key) or key in taken:
        key += "_"
    taken.add(key)
    return key


def _assemble(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], layers: dict[str, FlowLayer],
    base_cls: type, output: fx.Node, aliases: dict[str, tuple[str, int]] | None = None,
) -> FlowModel:
    """Order the layers into steps; insert a FlowDuplicate after every value with several consumers."""
    aliases = aliases or {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("fc_kind") == DATA]
    roots = {n.name: i for i, n in enumerate(placeholders)}
    nodes = {n.name: n for n in gm.graph.nodes}
    uses: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.name in layers:
            uses.update(n.name for n in _data_occurrences(node))
    out_values: list[fx.Node] = []
    fx.node.map_aggregate(output.args[0], lambda a: out_values.append(a) if isinstance(a, fx.Node) else None)
    uses.update(n.name for n in out_values)
    pieces: dict[str, dict[int, str]] = {}
    for name, (src, index) in aliases.items():
        pieces.setdefault(src, {})[index] = name

    taken: set[str] = set()
    steps: list[Step] = []
    keyed: dict[str, FlowLayer] = {}
    copies: dict[str, list[str]] = {}
    device = inputs[0].device

    def fan_out(name: str) -> None:
        n = uses[name]
        if n < 2:
            return
        node = nodes[name]
        shape = per_sample_shape(node)
        key = _key(f"{name}_fanout", taken)
        keyed[key] = FlowDuplicate(n, shape).to(dtype=node.meta["tensor_meta"].dtype, device=device)
        names = tuple(f"{name}_copy{j}" for j in range(n))
        steps.append(Step(f"{name}_fanout", key, name, shape, shape, roots[name], names=names))
        copies[name] = list(names)

    origin: dict[str, str] = {}

    def take(name: str) -> str:
        if name not in copies:
            return name
        copy = copies[name].pop(0)
        origin[copy] = name
        return copy

    for p in placeholders:
        fan_out(p.name)
    for node in gm.graph.nodes:
        if node.name in aliases:
            roots[node.name] = roots[aliases[node.name][0]]
            fan_out(node.name)
            continue
        if node.name not in layers:
            continue
        occurrences = _data_occurrences(node)
        sources = [take(n.name) for n in occurrences]
        roots[node.name] = roots[occurrences[0].name]
        key = _key(node.name, taken)
        layer = keyed[key] = layers[node.name]
        multi = _num_outputs(layer) > 1
        names = tuple(pieces[node.name][i] for i in range(_num_outputs(layer))) if multi else ()
        steps.append(Step(
            node.name, key, sources[0], per_sample_shape(occurrences[0]), per_sample_shape(node) or (),
            roots[node.name], sources=tuple(sources) if len(sources) > 1 else (), names=names,
        ))
        if not multi:
            fan_out(node.name)
    structure = fx.node.map_aggregate(output.args[0], lambda a: take(a.name) if isinstance(a, fx.Node) else a)
    out_names: list[str] = []
    fx.node.map_aggregate(structure, lambda a: out_names.append(a) if isinstance(a, str) else None)
    out_nodes = [nodes[origin.get(n, n)] for n in out_names]
    base_taken: set[str] = set()
    base_keys = [_key(n, base_taken) for n in out_names]
    base_modules = {
        key: base_cls(per_sample_shape(node)).to(dtype=node.meta["tensor_meta"].dtype, device=device)
        for key, node in zip(base_keys, out_nodes)
    }
    plan = FlowPlan(
        inputs=[(n.name, per_sample_shape(n)) for n in placeholders],
        steps=steps,
        outputs=structure,
        output_names=out_names,
        output_shapes=[per_sample_shape(node) for node in out_nodes],
        base_keys=base_keys,
    )
    return FlowModel(plan, keyed, base_modules).eval()

