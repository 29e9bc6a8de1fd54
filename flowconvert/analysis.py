r"""Legalize: make every data value consumed exactly once, explicitly, in the fx graph itself.

A flow transports the input's probability mass along a chain of layers, so every *data*
value (a tensor computed from the inputs) must be consumed exactly once on its way to an
output (docs/mathematics.md, graph semantics). Reads of metadata (``x.size(0)``),
parameters and constants are not data and may be used freely. Uses are counted one way,
by :func:`data_uses` over ``node.users``. The pass, :func:`legalize`, runs after capture
(:mod:`flowconvert.tracing`) and

* binds the pieces of a data tuple (``torch.split``): each ``getitem`` user reads one piece
  by a constant index (``record.piece``), every piece is read once (:func:`check_pieces`);
* reports unused data values (:func:`check_unused`, ``FC306``), outputs that are not data
  (:func:`check_outputs`, ``FC307``) and random numbers drawn in the forward pass
  (:func:`check_random`, ``FC114``: a drop mask would otherwise be frozen into the flow as a constant);
* inserts an explicit fan-out node ``duplicate(x, n)`` with ``n`` copies (``getitem``) for
  every value with ``n > 1`` consumers, and gives each consumer its own copy
  (:func:`insert_duplicates`); the lower pass turns it into a ``FlowDuplicate``. Its inverse
  reads the copies with the shortest path to the output (:func:`inverse_weights`):
  ``duplicate(x, 2, weights=(0.0, 1.0))`` for ``x + f(x)``.

Each check is a function ``(graph) -> list[(node, Problem)]``:

>>> import torch
>>> from flowconvert.tracing import capture
>>> class Residual(torch.nn.Module):
...     def forward(self, x):
...         return torch.tanh(x) + x
>>> graph = capture(Residual(), torch.randn(1, 3)).graph
>>> [n.name for n in data_uses(next(iter(graph.nodes)))]
['tanh', 'add']
>>> legalize(graph)
[]
>>> [n.name for n in graph.nodes]
['x', 'x_fanout', 'x_copy0', 'x_copy1', 'tanh', 'add', 'output']
>>> graph.find_nodes(op="call_function", target=duplicate)[0].kwargs
{'weights': (0.0, 1.0)}
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx

from .registry import duplicate
from .report import Problem
from .tracing import DATA, record

__all__ = [
    "data_uses",
    "data_args",
    "legalize",
    "check_pieces",
    "check_unused",
    "check_outputs",
    "insert_duplicates",
    "inverse_weights",
    "distances_to_output",
    "origin",
    "CHECKS",
]

Finding = tuple[fx.Node, Problem]


def _consumes(user: fx.Node) -> bool:
    return user.op == "output" or record(user).kind == DATA


def _occurrences(node: fx.Node, consumer: fx.Node) -> int:
    found = []
    fx.node.map_arg((consumer.args, consumer.kwargs), lambda a: found.append(a) if a is node else None)
    return len(found)


def data_uses(node: fx.Node) -> list[fx.Node]:
    """The data consumers of ``node`` in graph order, once per use (``x * x`` lists its user twice).

    This is the one count of uses: metadata reads (``x.size(0)``) are not uses.
    """
    return [user for user in node.users if _consumes(user) for _ in range(_occurrences(node, user))]


def data_args(node: fx.Node) -> list[fx.Node]:
    """The data arguments of ``node`` in argument order, with repeats (``a + a`` has two)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if record(a).kind == DATA else None)
    return found


def _is_tuple(node: fx.Node) -> bool:
    rec = record(node)
    return rec.kind == DATA and rec.shape is None and rec.arity is not None


def origin(node: fx.Node) -> fx.Node:
    """The value an inserted node stands for (a copy or a fan-out stands for what it duplicates)."""
    while record(node).inserted:
        node = node.args[0]
    return node


# -- checks ---------------------------------------------------------------------------------------
def check_pieces(graph: fx.Graph) -> list[Finding]:
    """Bind each ``getitem`` of a data tuple to its piece; every piece read exactly once."""
    found: list[Finding] = []
    for node in graph.nodes:
        if not _is_tuple(node) or node.op == "placeholder":
            continue
        arity, read = record(node).arity, {}
        for user in data_uses(node):
            where = record(user).location
            index = user.args[1] if user.target is operator.getitem and len(user.args) == 2 else None
            if user.op == "output" or not isinstance(index, int) or user.args[0] is not node:
                problem = Problem(
                    "FC132", f"`{user.name}` uses the pieces of `{node.name}` other than by a constant index", where
                )
                found.append((user, problem))
                continue
            index %= arity
            if index in read:
                found.append((user, Problem("FC304", f"piece {index} of `{node.name}` is read more than once", where)))
                continue
            read[index] = user
            record(user).piece = (node.name, index)
        missing = [i for i in range(arity) if i not in read]
        if missing:
            message = f"piece(s) {missing} of `{node.name}` are never used: their coordinates would be dropped"
            found.append((node, Problem("FC306", message, record(node).location)))
    return found


def check_unused(graph: fx.Graph) -> list[Finding]:
    """Data values (tensors) that reach no output: ``FC306``."""
    found: list[Finding] = []
    for node in graph.nodes:
        rec = record(node)
        if rec.kind != DATA or rec.shape is None or data_uses(node):
            continue
        if node.op == "placeholder":
            message = f"input `{node.name}` is never used"
        else:
            message = f"`{node.name}` is computed from the input but never reaches an output"
        found.append((node, Problem("FC306", message, rec.location)))
    return found


def check_outputs(graph: fx.Graph) -> list[Finding]:
    """Every returned value must be data: ``FC307``."""
    output = next(n for n in graph.nodes if n.op == "output")
    leaves: list[tuple[str, bool]] = []
    fx.node.map_aggregate(
        output.args[0],
        lambda a: leaves.append((a.name, record(a).kind == DATA) if isinstance(a, fx.Node) else (repr(a), False)),
    )
    bad = [name for name, is_data in leaves if not is_data]
    if bad or not leaves:
        message = f"the model returns {', '.join(bad) or 'nothing'}, which does not depend on the input"
        return [(output, Problem("FC307", message, None))]
    return []


#: Functions and tensor methods that draw random numbers (a stochastic forward pass).
RANDOM_FUNCTIONS = frozenset(
    {
        torch.rand,
        torch.randn,
        torch.randint,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        torch.randperm,
        torch.bernoulli,
        torch.normal,
        torch.poisson,
        torch.multinomial,
    }
)
RANDOM_METHODS = frozenset(
    {
        "bernoulli",
        "bernoulli_",
        "normal_",
        "uniform_",
        "random_",
        "exponential_",
        "geometric_",
        "cauchy_",
        "log_normal_",
        "multinomial",
    }
)


def check_random(graph: fx.Graph) -> list[Finding]:
    """Random numbers drawn in the forward pass (``torch.empty(n).bernoulli_(p)``, ``torch.rand``): ``FC114``.

    Traced once, a random tensor would become a constant of the flow (one fixed drop mask).
    """
    found: list[Finding] = []
    for node in graph.nodes:
        if node.op == "call_method":
            random = node.target in RANDOM_METHODS
        elif node.op == "call_function":
            try:
                random = node.target in RANDOM_FUNCTIONS
            except TypeError:  # unhashable target
                random = False
        else:
            random = False
        if random:
            what = f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", node.target)
            message = f"`{node.name}` draws random numbers ({what}) in the forward pass"
            found.append((node, Problem("FC114", message, record(node).location)))
    return found


#: The checks of the legalize pass, in order.
CHECKS: tuple[Callable[[fx.Graph], list[Finding]], ...] = (check_pieces, check_unused, check_outputs, check_random)


# -- the rewrite ------------------------------------------------------------------------------------
def _give_copies(value: fx.Node, copies: list[fx.Node]) -> None:
    """Replace each use of ``value`` by the next copy, consumers in graph order."""
    queue = iter(copies)
    for user in data_uses(value):
        if record(user).inserted:
            continue
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a: next(queue) if a is value else a)


def distances_to_output(graph: fx.Graph) -> dict[fx.Node, int]:
    """For every data value, the fewest nodes on a path from it to the output (fan-outs and copies not counted)."""
    distance: dict[fx.Node, int] = {}
    for node in reversed(graph.nodes):
        if node.op == "output":
            distance[node] = 0
            continue
        reached = [distance[user] for user in data_uses(node) if user in distance]
        if reached:
            distance[node] = min(reached) + (0 if record(node).inserted else 1)
    return distance


def inverse_weights(copies: list[fx.Node], distance: dict[fx.Node, int]) -> tuple[float, ...] | None:
    """The inverse's weight on each copy of a fan-out: uniform over the copies nearest to the output.

    The inverse of a long branch amplifies what the inverse samples in it, layer after layer
    (an inverted LeakyReLU multiplies negative values by ``1 / slope``), and the mean of the
    copies would carry that growth through every block of a deep network. The copies with the
    shortest path to the output (``distance``, :func:`distances_to_output`) carry the least:
    the identity of a residual connection, the features a DenseNet block passes on unchanged.
    Returns None (the uniform mean) when every copy is as near.
    """
    reach = [distance.get(c) for c in copies]
    if any(d is None for d in reach) or len(set(reach)) == 1:
        return None
    nearest = min(reach)
    return tuple(1.0 if d == nearest else 0.0 for d in reach)


def insert_duplicates(graph: fx.Graph) -> None:
    """Insert ``duplicate(x, n)`` and its ``n`` copies after every tensor value with ``n > 1`` uses,
    then give each fan-out its inverse's weights (:func:`inverse_weights`)."""
    fans = []
    for node in list(graph.nodes):
        rec = record(node)
        if rec.kind != DATA or rec.shape is None:
            continue
        uses = data_uses(node)
        if len(uses) < 2:
            continue
        with graph.inserting_after(node):
            fan = graph.create_node("call_function", duplicate, (node, len(uses)), name=f"{node.name}_fanout")
        fan.meta["flowconvert"] = type(rec)(kind=DATA, arity=len(uses), location=rec.location, inserted=True)
        copies, last = [], fan
        for j in range(len(uses)):
            with graph.inserting_after(last):
                last = graph.create_node("call_function", operator.getitem, (fan, j), name=f"{node.name}_copy{j}")
            last.meta["flowconvert"] = type(rec)(
                kind=DATA,
                shape=rec.shape,
                dtype=rec.dtype,
                location=rec.location,
                inserted=True,
                piece=(fan.name, j),
                batch_ok=rec.batch_ok,
            )
            copies.append(last)
        _give_copies(node, copies)
        fans.append((fan, copies))
    distance = distances_to_output(graph)  # once every fan-out is in place
    for fan, copies in fans:
        weights = inverse_weights(copies, distance)
        if weights is not None:
            fan.kwargs = {"weights": weights}


def legalize(graph: fx.Graph) -> list[Finding]:
    """Run the checks, record their problems on the nodes, and make fan-out explicit.

    Returns every ``(node, problem)`` found, in the order of :data:`CHECKS`.
    """
    found = [finding for check in CHECKS for finding in check(graph)]
    for node, problem in found:
        record(node).problems.append(problem)
    insert_duplicates(graph)
    return found
