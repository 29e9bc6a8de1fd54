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

import math
from typing import Any

import torch
from torch import fx, nn

from .analysis import build_graph, check_data_flow
from .core import FlowLayer
from .densities import ConditionalDiagonalNormal, DiagonalNormal, GaussianNoise, StandardNormal
from .errors import ConversionError, FlowConversionError, TracingError
from .flow import FlowModel, FlowPlan, Step
from .registry import DATA_ARG, REGISTRY, NodeContext, Registry, Rejection, describe_target
from .report import CONVERTED, PASSTHROUGH, REJECTED, NodeReport, Problem, Report
from .tracing import DATA, ExampleInputError, as_input_tuple, capture, data_inputs, per_sample_shape

__all__ = ["audit", "convert", "audit_and_convert", "BASES"]

#: Base densities by name: ``convert(..., base="standard" | "diagonal")``.
BASES = {"standard": StandardNormal, "diagonal": DiagonalNormal}
_DENSITY_TYPES = (ConditionalDiagonalNormal, GaussianNoise, DiagonalNormal, StandardNormal)


def audit(model: nn.Module, example_inputs: Any, *, base: str = "standard", registry: Registry = REGISTRY) -> Report:
    """Trace ``model`` on ``example_inputs`` and report, node by node, what can be flowified.

    Never raises for unsupported nodes or untraceable code (they are problems in the
    report); raises :class:`~flowconvert.tracing.ExampleInputError` when the model fails on
    the example inputs. The model is not modified.
    """
    return audit_and_convert(model, example_inputs, base=base, registry=registry)[0]


def convert(model: nn.Module, example_inputs: Any, *, base: str = "standard", registry: Registry = REGISTRY) -> FlowModel:
    """Convert ``model`` into a :class:`~flowconvert.flow.FlowModel`.

    ``base`` is the base density of each output: ``"standard"`` (standard normal) or
    ``"diagonal"`` (learnable diagonal Gaussian). Raises :class:`~flowconvert.errors.ConversionError`
    (with the full report as ``.report``) when any node blocks the conversion.
    """
    report, flow = audit_and_convert(model, example_inputs, base=base, registry=registry)
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
    model: nn.Module, example_inputs: Any, *, base: str = "standard", registry: Registry = REGISTRY
) -> tuple[Report, FlowModel | None]:
    """The report, and the flow model when the model is convertible (else ``None``)."""
    if base not in BASES:
        raise ValueError(f"base must be one of {sorted(BASES)}, got {base!r}")
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
    for node in gm.graph.nodes:
        entry = NodeReport(
            node.name, node.op, describe(node), PASSTHROUGH,
            node_location=node.meta.get("fc_location"), shape=per_sample_shape(node),
        )
        entries[node.name] = entry
        if node.meta.get("fc_kind") == DATA and node.op != "placeholder":
            layer, problem = _convert_node(node, module_of(node), registry, batch)
            if layer is not None:
                layers[node.name] = layer
                entry.likelihood = "exact" if layer.exact else "bound"
            if problem is not None:
                entry.problems.append(problem)

    graph = build_graph(gm.graph, describe=describe)
    for finding in check_data_flow(graph):
        entries[finding.node].problems.append(Problem(finding.code, finding.message, finding.location))
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
    return report, _assemble(gm, inputs, layers, bases, output)


def _convert_node(
    node: fx.Node, module: nn.Module | None, registry: Registry, batch: int
) -> tuple[FlowLayer | None, Problem | None]:
    """Build the flow layer of one data node, or say why not."""
    where = node.meta.get("fc_location")
    sources = data_inputs(node)
    if len(sources) != 1:
        return None, None  # a merge: reported by the graph analysis
    if not node.meta.get("fc_batch_ok", True):
        shape, check = node.meta.get("fc_shape"), node.meta.get("fc_shape_check")
        if check is None:
            why = f"it fails when the batch size changes from {batch} to {batch + 1}"
        elif shape[0] != batch:
            why = f"its result has shape {tuple(shape)} for a batch of {batch} samples"
        else:
            why = f"its per-sample shape changes with the batch size ({tuple(shape[1:])} vs {tuple(check[1:])})"
        return None, Problem("FC113", f"{describe_target(node, module)} does not keep samples apart: {why}", where)
    source = sources[0]
    resolve = lambda a: DATA_ARG if a is source else a.meta.get("fc_value")
    args = fx.node.map_arg(node.args, resolve)
    kwargs = fx.node.map_arg(node.kwargs, resolve)
    ctx = NodeContext(node, module, tuple(args), dict(kwargs), per_sample_shape(source) or (), per_sample_shape(node))
    try:
        layer = registry.build(ctx)
    except Rejection as rej:
        return None, Problem(rej.code, rej.message, where)
    except FlowConversionError as err:
        return None, Problem(err.code or "FC120", err.message, where)
    except Exception as exc:  # noqa: BLE001 - an audit reports, it does not crash
        return None, Problem("FC120", f"{describe_target(node, module)}: {type(exc).__name__}: {exc}", where)
    if not isinstance(layer, FlowLayer):
        return None, Problem("FC120", f"the rule for {describe_target(node, module)} did not return a FlowLayer", where)
    return layer, None


def _key(name: str, taken: set[str]) -> str:
    """A ModuleDict key for a node name (avoiding attribute names of ModuleDict)."""
    key = name
    while hasattr(nn.ModuleDict, key) or key in taken:
        key += "_"
    taken.add(key)
    return key


def _assemble(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], layers: dict[str, FlowLayer],
    bases: dict[str, nn.Module], output: fx.Node,
) -> FlowModel:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("fc_kind") == DATA]
    roots = {n.name: i for i, n in enumerate(placeholders)}
    taken: set[str] = set()
    steps, keyed = [], {}
    for node in gm.graph.nodes:
        if node.name not in layers:
            continue
        source = data_inputs(node)[0]
        roots[node.name] = roots[source.name]
        key = _key(node.name, taken)
        keyed[key] = layers[node.name]
        steps.append(Step(node.name, key, source.name, per_sample_shape(source), per_sample_shape(node), roots[node.name]))
    structure = fx.node.map_aggregate(output.args[0], lambda a: a.name if isinstance(a, fx.Node) else a)
    out_names = list(bases)
    base_taken: set[str] = set()
    base_keys = [_key(n, base_taken) for n in out_names]
    device = inputs[0].device
    base_modules = {}
    for key, name in zip(base_keys, out_names):
        node = next(n for n in gm.graph.nodes if n.name == name)
        dtype = node.meta["tensor_meta"].dtype
        base_modules[key] = bases[name].to(dtype=dtype, device=device)
    plan = FlowPlan(
        inputs=[(n.name, per_sample_shape(n)) for n in placeholders],
        steps=steps,
        outputs=structure,
        output_names=out_names,
        output_shapes=[per_sample_shape(next(n for n in gm.graph.nodes if n.name == name)) for name in out_names],
        base_keys=base_keys,
    )
    return FlowModel(plan, keyed, base_modules).eval()
