r"""Assemble: the lowered graph becomes a :class:`~flowconvert.flow.FlowPlan` and a :class:`~flowconvert.flow.FlowModel`.

After legalize every data value has exactly one consumer (fan-out is an explicit node with
its copies), so the plan is a walk over the graph in order: one :class:`~flowconvert.flow.Step`
per node with a layer, whose inputs are its data arguments and whose outputs, for a layer
with several (``torch.split``, a fan-out), are the ``getitem`` nodes bound to its pieces.
"""

from __future__ import annotations

from torch import fx, nn

from .analysis import data_args
from .flow import FlowModel, FlowPlan, Step
from .lowering import output_values
from .tracing import DATA, record

__all__ = ["assemble", "plan"]


def _key(name: str, taken: set[str]) -> str:
    """A ModuleDict key for a node name (avoiding attribute names of ModuleDict)."""
    key = name
    while hasattr(nn.ModuleDict, key) or key in taken:
        key += "_"
    taken.add(key)
    return key


def _pieces(graph: fx.Graph) -> dict[str, dict[int, str]]:
    """``{tuple node: {index: getitem node}}`` as bound by legalize."""
    pieces: dict[str, dict[int, str]] = {}
    for node in graph.nodes:
        piece = record(node).piece
        if piece is not None:
            pieces.setdefault(piece[0], {})[piece[1]] = node.name
    return pieces


def plan(graph: fx.Graph) -> tuple[FlowPlan, dict[str, nn.Module], dict[str, nn.Module]]:
    """The plan, its layers (by key) and base densities (by key) of a lowered, convertible graph."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and record(n).kind == DATA]
    roots = {n.name: i for i, n in enumerate(placeholders)}
    pieces = _pieces(graph)
    taken: set[str] = set()
    steps: list[Step] = []
    layers: dict[str, nn.Module] = {}
    for node in graph.nodes:
        rec = record(node)
        if rec.piece is not None:
            roots[node.name] = roots[rec.piece[0]]
        if rec.layer is None:
            continue
        args = data_args(node)
        roots[node.name] = roots[args[0].name]
        key = _key(node.name, taken)
        layers[key] = rec.layer
        multi = rec.layer.num_outputs > 1
        names = tuple(pieces[node.name][i] for i in range(rec.layer.num_outputs)) if multi else ()
        in_shape = record(args[0]).sample_shape
        out_shape = in_shape if rec.inserted else rec.sample_shape or ()  # a fan-out keeps the shape
        steps.append(
            Step(
                node.name,
                key,
                args[0].name,
                in_shape,
                out_shape,
                roots[node.name],
                sources=tuple(a.name for a in args) if len(args) > 1 else (),
                names=names,
            )
        )
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = output_values(graph)
    base_taken: set[str] = set()
    base_keys = [_key(n.name, base_taken) for n in values]
    bases = record(output).bases
    flow_plan = FlowPlan(
        inputs=[(n.name, record(n).sample_shape) for n in placeholders],
        steps=steps,
        outputs=fx.node.map_aggregate(output.args[0], lambda a: a.name if isinstance(a, fx.Node) else a),
        output_names=[n.name for n in values],
        output_shapes=[record(n).sample_shape for n in values],
        base_keys=base_keys,
    )
    return flow_plan, layers, {key: bases[n.name] for key, n in zip(base_keys, values)}


def assemble(graph: fx.Graph, device=None) -> FlowModel:
    """The :class:`FlowModel` of a lowered, convertible graph (on ``device``, in eval mode)."""
    flow_plan, layers, bases = plan(graph)
    flow = FlowModel(flow_plan, layers, bases).eval()
    return flow.to(device) if device is not None else flow
