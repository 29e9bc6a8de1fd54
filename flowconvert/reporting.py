r"""Report: the audit :class:`~flowconvert.report.Report`, a pure function of the lowered graph.

Reads the :class:`~flowconvert.tracing.NodeRecord` of every node (after capture, legalize
and lower) and builds one :class:`~flowconvert.report.NodeReport` per node of the user's
graph (nodes inserted by legalize are folded into the value they duplicate: its row says
``fanout`` and how many times it is used), plus the summary and a :class:`networkx.DiGraph`
of the graph for tools. Builds no layer and changes nothing.
"""

from __future__ import annotations

from typing import Iterable

import networkx as nx
from torch import fx, nn

from .analysis import origin
from .densities import BaseDensity, ConditionalDensity, GaussianNoise, HalfNormal
from .registry import describe_target
from .report import CONVERTED, FOLLOW_ON_CODES, PASSTHROUGH, REJECTED, NodeReport, Problem, Report
from .tracing import DATA, OUTPUT, TracingError, record

__all__ = ["report", "trace_failure_report", "density_parameters", "collapse_follow_ons", "note_approximate_inverses"]

# Densities outside declared parts (bases, nested layers' parts) are counted by their type.
_DENSITY_TYPES = (ConditionalDensity, BaseDensity, GaussianNoise, HalfNormal)


def density_parameters(modules: Iterable[nn.Module]) -> int:
    """Parameters of the densities in ``modules``: their declared density parts (and density modules)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        parts = (
            [module.get_submodule(p.name) for p in module.density_parts()] if hasattr(module, "density_parts") else []
        )
        parts += [m for m in module.modules() if isinstance(m, _DENSITY_TYPES)]
        for part in parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def _fanouts(graph: fx.Graph) -> dict[str, fx.Node]:
    """The fan-out node inserted for each duplicated value, by the value's name."""
    return {n.args[0].name: n for n in graph.nodes if record(n).inserted and record(n).piece is None}


def _node_report(node: fx.Node, modules: dict[str, nn.Module], fan: fx.Node | None) -> NodeReport:
    rec = record(node)
    module = modules.get(node.target) if node.op == "call_module" else None
    lowered = rec.layer is not None or rec.verdict is not None
    problems = list(rec.problems)
    if fan is not None:
        problems += record(fan).problems
    status = REJECTED if problems else (CONVERTED if lowered else PASSTHROUGH)
    entry = NodeReport(
        node.name,
        node.op,
        describe_target(node, module),
        status,
        node_location=rec.location,
        shape=rec.sample_shape,
        problems=problems,
        substitution=rec.substitution,
    )
    if lowered:
        exact = rec.layer.exact if rec.layer is not None else rec.verdict.exact
        entry.likelihood = "exact" if exact else "bound"
    notes = [str(rec.substitution)] if rec.substitution is not None else []
    if rec.verdict is not None and rec.verdict.note:
        notes.append(rec.verdict.note)
    if fan is not None:
        notes.append(f"used {record(fan).arity} times: duplicated (FlowDuplicate, bound)")
        entry.fanout = True
    entry.note = "; ".join(notes) or None
    return entry


def _nx_graph(graph: fx.Graph, modules: dict[str, nn.Module], entries: dict[str, NodeReport]) -> nx.DiGraph:
    """The user's graph for tools (inserted nodes contracted): statuses, likelihoods, codes, uses."""
    g = nx.DiGraph()
    order = 0
    for node in graph.nodes:
        if record(node).inserted:
            continue
        rec, entry = record(node), entries[node.name]
        module = modules.get(node.target) if node.op == "call_module" else None
        g.add_node(
            node.name,
            op=node.op,
            target=describe_target(node, module),
            kind=rec.kind or OUTPUT,
            shape=rec.sample_shape,
            location=rec.location,
            order=order,
            status=entry.status,
            likelihood=entry.likelihood,
            codes=[p.code for p in entry.problems],
        )
        order += 1
        occurrences: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), occurrences.append)
        for src in occurrences:
            edge = (origin(src).name, node.name)
            if g.has_edge(*edge):
                g.edges[edge]["uses"] += 1
            else:
                g.add_edge(*edge, uses=1)
    return g


def collapse_follow_ons(nodes: list[NodeReport], graph: nx.DiGraph) -> None:
    """Move problems that only follow from another problem into ``follow_ons`` (in place).

    A problem with a code of :data:`~flowconvert.report.FOLLOW_ON_CODES` follows from a root
    cause when its node also has a problem of another code (``x, w = attention(...)`` with ``w``
    unused: FC131, then FC306), or when a data input of the node is a rejected tuple-valued node
    (indexing the tuple a refused module returns: FC132, FC306). The root is followed through
    chains of such nodes. Follow-ons are listed under their root (``caused_by``), not counted.
    """
    by_name = {n.name: n for n in nodes}
    root_of: dict[str, str] = {}
    for node in nodes:
        if not node.problems:
            continue
        cause = node.name if any(p.code not in FOLLOW_ON_CODES for p in node.problems) else None
        if cause is None and node.name in graph:
            for pred in graph.predecessors(node.name):
                attrs, src = graph.nodes[pred], by_name.get(pred)
                if src is None or attrs.get("kind") != DATA or attrs.get("shape") is not None:
                    continue  # only a tuple-valued data producer hides what its pieces would be
                if src.problems or src.follow_ons:
                    cause = root_of.get(pred, pred)
                    break
        if cause is None:
            continue
        root_of[node.name] = cause
        moved = [p for p in node.problems if p.code in FOLLOW_ON_CODES]
        if moved:
            node.problems = [p for p in node.problems if p.code not in FOLLOW_ON_CODES]
            node.follow_ons.extend(moved)
            node.caused_by = cause
            if node.name in graph:
                graph.nodes[node.name]["codes"] = [p.code for p in node.problems]


def report(
    graph: fx.Graph,
    modules: dict[str, nn.Module],
    name: str,
    *,
    input_shapes: list[tuple[int, ...]],
    base: str,
) -> Report:
    """The report of a lowered graph (see the module docs)."""
    fanouts = _fanouts(graph)
    entries = {
        node.name: _node_report(node, modules, fanouts.get(node.name))
        for node in graph.nodes
        if not record(node).inserted
    }
    nx_graph = _nx_graph(graph, modules, entries)
    collapse_follow_ons(list(entries.values()), nx_graph)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    layers = [record(n).layer for n in graph.nodes if record(n).layer is not None]
    checked = sum(record(n).verdict.density_parameters for n in graph.nodes if record(n).verdict is not None)
    return Report(
        name,
        list(entries.values()),
        nx_graph,
        input_shapes=input_shapes,
        output_shapes=[record(n).sample_shape for n in _returned(output)],
        density_parameters=density_parameters([*layers, *record(output).bases.values()]) + checked,
        base=base,
    )


def note_approximate_inverses(report: Report, flow) -> None:
    """Note on each range-limited activation whose inverse can receive values outside its range.

    ``flow.approximate_inverse_layers()`` names them (a later layer drops coordinates); the
    note says so on the activation's row, so the report states the condition of
    ``flow.exact_inverse``.
    """
    marked = set(flow.approximate_inverse_layers())
    entries = {e.name: e for e in report.nodes}
    for step in flow.plan.steps:
        entry = entries.get(step.name)
        if step.layer in marked and entry is not None:
            low, high = flow.layers[step.layer].output_range
            note = (
                f"outputs lie in ({low:g}, {high:g}) but a later layer drops coordinates: the inverse can "
                "reconstruct values outside that range and clamps them (flow.exact_inverse is False)"
            )
            entry.note = f"{entry.note}; {note}" if entry.note else note


def _returned(output: fx.Node) -> list[fx.Node]:
    """The returned data tensors (copies traced back to their value), in flattening order."""
    found: list[fx.Node] = []
    fx.node.map_aggregate(output.args[0], lambda a: found.append(origin(a)) if isinstance(a, fx.Node) else None)
    return [n for n in found if record(n).shape is not None]


def trace_failure_report(name: str, err: TracingError, input_shapes: list[tuple[int, ...]], base: str) -> Report:
    """The report of a model that could not be traced: one ``<trace>`` row with the problem."""
    problem = Problem(err.code or "FC303", err.message, err.location)
    node = NodeReport("<trace>", "trace", name, REJECTED, problems=[problem])
    return Report(name, [node], input_shapes=input_shapes, base=base)
