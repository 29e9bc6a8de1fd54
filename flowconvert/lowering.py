r"""Lower: every data node of the legalized graph through the rule registry.

For each data node that computes something (not an input, not one piece of a tuple) the pass
builds a :class:`~flowconvert.registry.NodeContext` and asks the registry: with
``build=True`` for the flow layer (``record.layer``), with ``build=False`` (an audit) for the
rule's cheap check where it declares one (``record.verdict``; no weight is factorized).
Fan-out nodes inserted by legalize lower to ``FlowDuplicate`` and every returned value gets
its base density (``record.bases`` on the output node), both through the registry's
structure rules. Problems go to ``record.problems``; a substitution to ``record.substitution``.

>>> import torch
>>> from flowconvert.analysis import legalize
>>> from flowconvert.registry import REGISTRY
>>> from flowconvert.tracing import capture, record
>>> graph = capture(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), torch.randn(1, 2)).graph
>>> _ = legalize(graph)
>>> lower(graph, dict(graph.owning_module.named_modules()), REGISTRY, batch=1)
>>> [(n.name, type(record(n).layer).__name__, [p.code for p in record(n).problems]) for n in graph.nodes]
[('input_1', 'NoneType', []), ('_0', 'FlowLinear', []), ('_1', 'NoneType', ['FC101']), ('output', 'NoneType', [])]
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .analysis import data_args
from .core import FlowLayer
from .errors import FlowConversionError
from .registry import DATA_ARG, NodeContext, Registry, Rejection, Verdict, describe_target
from .report import Problem
from .tracing import DATA, record

__all__ = ["lower", "lower_node", "lower_bases", "output_values"]


def _resolve(arg: fx.Node) -> Any:
    rec = record(arg)
    return DATA_ARG if rec.kind == DATA else rec.value


def _batch_problem(node: fx.Node, module: nn.Module | None, batch: int) -> Problem:
    rec = record(node)
    shape, check = rec.shape, rec.shape_check
    if check is None:
        why = f"it fails when the batch size changes from {batch} to {batch + 1}"
    elif not shape or shape[0] != batch:  # a 0-d result (x.sum()) has no batch dimension at all
        why = f"its result has shape {tuple(shape or ())} for a batch of {batch} samples"
    else:
        why = f"its per-sample shape changes with the batch size ({tuple(shape[1:])} vs {tuple(check[1:])})"
    return Problem("FC113", f"{describe_target(node, module)} does not keep samples apart: {why}", rec.location)


def context(node: fx.Node, module: nn.Module | None, options: dict) -> NodeContext:
    """What a rule sees of ``node``: arguments with values resolved, per-sample shapes."""
    occurrences = data_args(node)
    return NodeContext(
        node,
        module,
        tuple(fx.node.map_arg(node.args, _resolve)),
        dict(fx.node.map_arg(node.kwargs, _resolve)),
        record(occurrences[0]).sample_shape or (),
        record(node).sample_shape,
        in_shapes=tuple(record(n).sample_shape or () for n in occurrences),
        options=dict(options),
        training=record(node).training,
    )


def lower_node(
    node: fx.Node,
    module: nn.Module | None,
    registry: Registry,
    *,
    batch: int,
    options: dict | None = None,
    build: bool = True,
) -> None:
    """Lower one data node: ``record.layer`` (or ``record.verdict``) or a problem."""
    rec = record(node)
    where = rec.location
    if not rec.batch_ok and not rec.inserted:
        rec.problems.append(_batch_problem(node, module, batch))
        return
    ctx = context(node, module, options or {})
    try:
        result = registry.build(ctx) if build else registry.check(ctx)
    except Rejection as rej:
        rec.problems.append(Problem(rej.code, rej.message, where))
        return
    except FlowConversionError as err:
        rec.problems.append(Problem(err.code or "FC120", err.message, where))
        return
    except Exception as exc:  # noqa: BLE001 - an audit reports, it does not crash
        rec.problems.append(Problem("FC120", f"{describe_target(node, module)}: {type(exc).__name__}: {exc}", where))
        return
    rec.substitution = ctx.substitution
    if isinstance(result, Verdict):
        rec.verdict = result
        return
    if not isinstance(result, FlowLayer):
        rec.problems.append(
            Problem("FC120", f"the rule for {describe_target(node, module)} did not return a FlowLayer", where)
        )
        return
    dtype = record(data_args(node)[0]).dtype
    if dtype is not None and dtype.is_floating_point:
        result = result.to(dtype=dtype)  # density parameters follow the data's precision
    rec.layer = result


def output_values(graph: fx.Graph) -> list[fx.Node]:
    """The values the model returns, in flattening order."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    found: list[fx.Node] = []
    fx.node.map_aggregate(output.args[0], lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    return found


def lower_bases(graph: fx.Graph, registry: Registry, base: str) -> None:
    """One base density per returned data tensor (``record(output).bases``, keyed by value name)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    rule = registry.structure[f"base:{base}"]
    bases = record(output).bases
    for value in output_values(graph):
        rec = record(value)
        if rec.kind != DATA or rec.shape is None:
            continue
        ctx = NodeContext(value, None, (DATA_ARG,), {}, rec.sample_shape, rec.sample_shape, (rec.sample_shape,))
        density = rule.build(ctx)
        bases[value.name] = (
            density.to(dtype=rec.dtype) if rec.dtype is not None and rec.dtype.is_floating_point else density
        )


def lower(
    graph: fx.Graph,
    modules: dict[str, nn.Module],
    registry: Registry,
    *,
    batch: int,
    options: dict | None = None,
    base: str = "standard",
    build: bool = True,
) -> None:
    """Lower every data node of ``graph`` that computes something, then the base densities."""
    for node in graph.nodes:
        rec = record(node)
        if rec.kind != DATA or node.op == "placeholder" or rec.piece is not None:
            continue
        args = data_args(node)
        if not args or any(record(a).shape is None for a in args):
            continue  # a data tuple read as a whole: reported by legalize (FC132)
        module = modules.get(node.target) if node.op == "call_module" else None
        lower_node(node, module, registry, batch=batch, options=options, build=build)
    lower_bases(graph, registry, base)
