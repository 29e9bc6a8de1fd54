r"""Graph analysis: does every data value flow to an output, consumed exactly once?

A flow transports the input's probability mass along a chain of layers, so (SPEC section 7)
every *data* value — a tensor computed from the inputs — must be consumed exactly once on
its way to an output. Reads of metadata (``x.size(0)``), parameters and constants are not
data and may be used freely. :func:`build_graph` turns an annotated fx graph (see
:mod:`flowconvert.tracing`) into a :class:`networkx.DiGraph`; :func:`check_data_flow`
reports, as :class:`Finding` objects:

* ``FC304`` fan-out: a data value used more than once (residual/skip connections, ``x * x``);
* ``FC305`` merge: an operation with several data inputs (``x + y``, ``torch.cat``);
* ``FC306`` a data value that reaches no output (an unused branch or input);
* ``FC307`` an output that is not data (a constant or a size).

>>> import networkx as nx
>>> g = nx.DiGraph()
>>> g.add_node("x", kind="data", op="placeholder", location=None, order=0)
>>> g.add_node("a", kind="data", op="call_module", location="m.py:3", order=1)
>>> g.add_node("b", kind="data", op="call_module", location="m.py:4", order=2)
>>> g.add_node("output", kind="output", op="output", location=None, order=3, leaves=[("a", "data")])
>>> g.add_edge("x", "a", uses=1); g.add_edge("x", "b", uses=1); g.add_edge("a", "output", uses=1)
>>> [(f.node, f.code) for f in check_data_flow(g)]
[('x', 'FC304'), ('b', 'FC306')]
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from torch import fx

from .tracing import DATA, OUTPUT, per_sample_shape, uses

__all__ = ["Finding", "build_graph", "check_data_flow", "data_uses"]


@dataclass(frozen=True)
class Finding:
    """A graph-level problem attached to node ``node`` (an fx node name)."""

    node: str
    code: str
    message: str
    location: str | None


def build_graph(graph: fx.Graph, describe=None) -> nx.DiGraph:
    """A DiGraph of the traced graph: one vertex per fx node, one edge per producer->consumer.

    Vertex attributes: ``op``, ``target`` (readable), ``kind`` (data/metadata/parameter/
    constant/output), ``shape`` (per-sample, data only), ``location``, ``order``; the output
    vertex also has ``leaves``: ``(name or repr, kind)`` of every returned value. Edge
    attribute ``uses``: how many times the producer appears in the consumer's arguments.
    ``describe(node)`` gives the readable target (defaults to ``str(node.target)``).
    """
    g = nx.DiGraph()
    for order, node in enumerate(graph.nodes):
        attrs = dict(
            op=node.op,
            target=describe(node) if describe else str(node.target),
            kind=node.meta.get("fc_kind", OUTPUT if node.op == "output" else None),
            shape=per_sample_shape(node),
            location=node.meta.get("fc_location"),
            order=order,
        )
        if node.op == "output":
            leaves: list[tuple[str, str | None]] = []
            fx.node.map_aggregate(
                node.args[0],
                lambda a: leaves.append(
                    (a.name, a.meta.get("fc_kind")) if isinstance(a, fx.Node) else (repr(a), "constant")
                ),
            )
            attrs["leaves"] = leaves
        g.add_node(node.name, **attrs)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name, uses=uses(src, node))
    return g


def _consumers(g: nx.DiGraph, v: str) -> list[tuple[str, int]]:
    """Data consumers of ``v`` (data nodes and the output) with multiplicities, in graph order."""
    found = [(w, g.edges[v, w]["uses"]) for w in g.successors(v) if g.nodes[w]["kind"] in (DATA, OUTPUT)]
    return sorted(found, key=lambda item: g.nodes[item[0]]["order"])


def data_uses(g: nx.DiGraph, v: str) -> int:
    """How many times data value ``v`` is consumed as data."""
    return sum(k for _, k in _consumers(g, v))


def _where(g: nx.DiGraph, v: str) -> str:
    loc = g.nodes[v].get("location")
    return f"{v} ({loc})" if loc else v


def check_data_flow(g: nx.DiGraph) -> list[Finding]:
    """All fan-outs, merges, unused data values and non-data outputs, in graph order."""
    findings: list[Finding] = []
    for v in sorted(g.nodes, key=lambda n: g.nodes[n]["order"]):
        attrs = g.nodes[v]
        if attrs["kind"] == OUTPUT:
            bad = [name for name, kind in attrs.get("leaves", []) if kind != DATA]
            if bad or not attrs.get("leaves"):
                findings.append(Finding(v, "FC307", f"the model returns {', '.join(bad) or 'nothing'}, which does not depend on the input", None))
            continue
        if attrs["kind"] != DATA:
            continue
        sources = [u for u in g.predecessors(v) if g.nodes[u]["kind"] == DATA]
        if len(sources) > 1:
            findings.append(Finding(v, "FC305", f"`{v}` combines {len(sources)} data values: {', '.join(sources)}", attrs["location"]))
        consumers = _consumers(g, v)
        total = sum(k for _, k in consumers)
        if total > 1:
            names = ", ".join(_where(g, w) + (f" x{k}" if k > 1 else "") for w, k in consumers)
            last = consumers[-1][0]  # the extra use is where the duplication happens
            findings.append(Finding(v, "FC304", f"`{v}` is used {total} times: by {names}", g.nodes[last]["location"]))
        elif total == 0:
            if attrs["op"] == "placeholder":
                message = f"input `{v}` is never used"
            else:
                message = f"`{v}` is computed from the input but never reaches an output"
            findings.append(Finding(v, "FC306", message, attrs["location"]))
    return findings
