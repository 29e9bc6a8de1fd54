r"""Per-node output deviation of substituted activations (``relu="leaky"``, ``substitute={...}``).

A substitution makes the flow compute a slightly different function. For each substituted
node, :func:`measure_deviations` runs the traced graph twice on the example inputs, node by
node (:class:`torch.fx.Interpreter`): as traced, and with every substituted node computed by
its flow layer. It reports two numbers per node:

* ``own``: :math:`\max |s(v) - f(v)|` where :math:`v` is the node's input in the *original*
  network, :math:`f` the original operation and :math:`s` its substitute: what this node
  alone changes;
* ``accumulated``: :math:`\max |\tilde v_n - v_n|` between the node's output with every
  substitution up to it and its original output: how far the flow has drifted there.

>>> import torch
>>> from flowconvert.activations import FlowLeakyReLU
>>> from flowconvert.tracing import capture
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
>>> gm = capture(net, torch.randn(1, 2)).module
>>> x = torch.tensor([[-1.0, 0.0]])
>>> out = measure_deviations(gm, (x,), {"_1": FlowLeakyReLU(0.5)})
>>> sorted(out), out["_1"][0] == out["_1"][1]
(['_1'], True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from .analysis import data_args

__all__ = ["measure_deviations"]


def _max_abs(a: Any, b: Any) -> float:
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.numel():
        return (a.double() - b.double()).abs().max().item()
    return 0.0


class _Run(fx.Interpreter):
    """Runs the graph, with some nodes computed by replacement layers, recording watched values."""

    def __init__(self, gm: fx.GraphModule, replace: dict[str, nn.Module], watch: set[str]):
        super().__init__(gm)
        self.replace, self.watch = replace, watch
        self.values: dict[str, Any] = {}
        self.inputs: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            self.inputs[n.name] = self.env[data_args(n)[0]]
        if n.name in self.replace:
            result = self.replace[n.name](self.inputs[n.name])
        else:
            result = super().run_node(n)
        if n.name in self.watch:
            self.values[n.name] = result
        return result


def measure_deviations(
    gm: fx.GraphModule, inputs: tuple[Tensor, ...], substituted: dict[str, nn.Module]
) -> dict[str, tuple[float, float]]:
    """``{node name: (own deviation, accumulated deviation)}`` on ``inputs`` (see the module docs).

    ``gm`` is the captured graph module (its nodes carry flowconvert's records), ``substituted``
    maps node names to the flow layers that replace them; a layer is called on the node's first
    data argument.
    """
    watch = set(substituted)
    with torch.no_grad():
        original = _Run(gm, {}, watch)
        original.run(*inputs)
        changed = _Run(gm, dict(substituted), watch)
        changed.run(*inputs)
        out = {}
        for name, layer in substituted.items():
            own = _max_abs(layer(original.inputs[name]), original.values[name])
            out[name] = (own, _max_abs(changed.values[name], original.values[name]))
    return out
