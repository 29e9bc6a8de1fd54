"""The legalize pass: every data value consumed exactly once on its way to an output."""

from __future__ import annotations

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

import flowconvert as fc
from flowconvert.analysis import check_outputs, check_pieces, check_unused, data_uses, legalize
from flowconvert.registry import duplicate
from flowconvert.tracing import capture, record


def analyse(model, x):
    """The captured graph before legalize, and the legalize findings as {(node, code)}."""
    graph = capture(model, x).graph
    nodes = {n.name: n for n in graph.nodes}
    findings = legalize(graph)
    return nodes, {(n.name, p.code) for n, p in findings}


def uses(nodes, name):
    return len(data_uses(nodes[name]))


def fanouts(nodes_or_graph):
    nodes = nodes_or_graph.nodes if hasattr(nodes_or_graph, "nodes") else nodes_or_graph.values()
    return {n.args[0].name: n.args[1] for n in nodes if n.op == "call_function" and n.target is duplicate}


class ViewBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        n, m = x.size(0), x.shape[1] * x.shape[2]  # metadata reads do not consume x
        return self.fc(x.view(n, m))


def test_metadata_reads_are_not_uses():
    graph = capture(ViewBySize(), torch.randn(2, 2, 3)).graph
    nodes = {n.name: n for n in graph.nodes}
    assert uses(nodes, "x") == 1 and len(nodes["x"].users) > 1  # size/shape reads are users, not uses
    assert legalize(graph) == [] and fanouts(graph) == {}
    assert {record(nodes[k]).kind for k in ("size", "getattr_1", "getitem", "mul")} == {"metadata"}


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + x


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, y):
        side = self.b(x)  # noqa: F841 - never returned
        return self.a(x)


class ConstantOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x), x.shape[0]


class BiasFromParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.eye(3) * 2)

    def forward(self, x):
        w = self.w.t() * 0.5  # parameter arithmetic is not data
        return F.linear(x, w)


def test_fan_out_becomes_an_explicit_duplicate_node():
    graph = capture(Residual(), torch.randn(1, 4)).graph
    nodes = {n.name: n for n in graph.nodes}
    assert uses(nodes, "x") == 2
    assert legalize(graph) == []  # fan-out and merges are legal: a FlowDuplicate and a FlowSum
    assert fanouts(graph) == {"x": 2}
    copies = [n for n in graph.nodes if record(n).piece is not None]
    assert [c.name for c in copies] == ["x_copy0", "x_copy1"] and all(record(c).inserted for c in copies)
    assert nodes["fc"].args == (copies[0],) and nodes["add"].args[1] is copies[1]
    assert all(len(data_uses(n)) == 1 for n in graph.nodes if record(n).shape is not None)  # now exactly once
    graph.lint()


def test_using_a_value_twice_in_one_operation_is_fan_out():
    graph = capture(Square(), torch.randn(1, 4)).graph
    legalize(graph)
    assert fanouts(graph) == {"x": 2}
    (mul,) = [n for n in graph.nodes if n.name == "mul"]
    assert [a.name for a in mul.args] == ["x_copy0", "x_copy1"]


def test_unused_branches_and_inputs():
    _, findings = analyse(Unused(), (torch.randn(1, 4), torch.randn(1, 4)))
    assert findings == {("b", "FC306"), ("y", "FC306")}
    graph = capture(Unused(), (torch.randn(1, 4), torch.randn(1, 4))).graph
    assert {(n.name, p.code) for n, p in check_unused(graph)} == {("b", "FC306"), ("y", "FC306")}


def test_outputs_must_be_data():
    graph = capture(ConstantOut(), torch.randn(1, 3)).graph
    assert [(n.name, p.code) for n, p in check_outputs(graph)] == [("output", "FC307")]


class Pieces(nn.Module):
    def __init__(self, read_twice=False, drop=False):
        super().__init__()
        self.read_twice, self.drop = read_twice, drop

    def forward(self, x):
        parts = torch.split(x, 2, dim=1)
        if self.drop:
            return parts[0]
        if self.read_twice:
            return parts[0] + parts[0], parts[1]
        return torch.cat([parts[1], parts[0]], 1)


def test_split_pieces_are_bound_and_checked():
    graph = capture(Pieces(), torch.randn(1, 4)).graph
    assert check_pieces(graph) == []
    assert {n.name: record(n).piece for n in graph.nodes if record(n).piece} == {
        "getitem": ("split", 1),
        "getitem_1": ("split", 0),
    }
    _, dropped = analyse(Pieces(drop=True), torch.randn(1, 4))
    assert dropped == {("split", "FC306")}
    _, twice = analyse(Pieces(read_twice=True), torch.randn(1, 4))
    assert ("getitem_1", "FC304") in twice


def test_parameters_and_constants_are_not_data():
    nodes, findings = analyse(BiasFromParameters(), torch.randn(1, 3))
    assert findings == set()
    kinds = {k: record(nodes[k]).kind for k in ("w", "t", "mul")}
    assert kinds == {"w": "parameter", "t": "constant", "mul": "constant"}
    flow = fc.convert(BiasFromParameters(), torch.randn(1, 3))
    assert torch.equal(flow.layers["linear"].weight, torch.eye(3))


def test_report_graph_carries_statuses():
    report = fc.audit(Residual(), torch.randn(1, 4))
    g = report.graph
    assert isinstance(g, nx.DiGraph)
    # the residual converts: x is duplicated (FlowDuplicate) and the sum is a funnel (FlowSum)
    assert g.nodes["fc"]["status"] == "converted" and g.nodes["add"]["status"] == "converted"
    assert g.nodes["add"]["codes"] == [] and report.nodes[0].fanout and not report.exact
    assert g.edges["x", "add"]["uses"] == 1
    assert nx.is_directed_acyclic_graph(g)


# -- the inverse's weights on the copies of a fan-out --------------------------------------------
def fanout_weights(model, x):
    graph = capture(model, x).graph
    legalize(graph)
    return {n.args[0].name: n.kwargs.get("weights") for n in graph.nodes if n.target is duplicate}


class Dense(nn.Module):
    """DenseNet-style: x feeds a branch and, unchanged, the concatenation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return torch.cat([self.b(torch.tanh(self.a(x))), x], 1)


class Parallel(nn.Module):
    """Two branches of one layer each: equally near the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


class DeepResidual(nn.Module):
    def __init__(self, depth=12, width=16):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.01), nn.Linear(width, width)) for _ in range(depth)
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_the_inverse_reads_the_copies_nearest_to_the_output():
    assert fanout_weights(Residual(), torch.randn(1, 4)) == {"x": (0.0, 1.0)}  # fc(x) + x: the identity
    assert fanout_weights(Dense(), torch.randn(1, 4)) == {"x": (0.0, 1.0)}  # the copy the cat passes on
    assert fanout_weights(Parallel(), torch.randn(1, 4)) == {"x": None}  # equally near: the mean


def test_reading_the_identity_keeps_a_deep_residual_inverse_in_range(monkeypatch):
    # each block's branch inverse divides negative values by 0.01; the mean of the copies would carry
    # that into the trunk block after block (measured: max |inverse| ~1e29 against ~1 for 12 blocks)
    import flowconvert.analysis as analysis

    torch.manual_seed(0)
    model, x = DeepResidual().eval(), torch.randn(64, 16)
    growth = {}
    for mean in (False, True):
        if mean:
            monkeypatch.setattr(analysis, "inverse_weights", lambda copies, distance: None)
        flow = fc.convert(model, x)
        fc.calibrate(flow, x)
        with torch.no_grad():
            y = flow(x)
            growth[mean] = max(flow.inverse(y, sample=s).abs().max().item() for s in (False, True))
            torch.testing.assert_close(flow(x), model(x), atol=1e-5, rtol=0)
    assert growth[False] < 1e2 < 1e10 < growth[True], growth
