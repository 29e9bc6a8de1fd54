"""Graph analysis: every data value consumed exactly once on its way to an output."""

from __future__ import annotations

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

import flowconvert as fc
from flowconvert.analysis import build_graph, check_data_flow, data_uses
from flowconvert.tracing import capture


def analyse(model, x):
    cap = capture(model, x)
    graph = build_graph(cap.graph)
    return graph, {(f.node, f.code) for f in check_data_flow(graph)}


class ViewBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        n, m = x.size(0), x.shape[1] * x.shape[2]  # metadata reads do not consume x
        return self.fc(x.view(n, m))


def test_metadata_reads_are_not_uses():
    graph, findings = analyse(ViewBySize(), torch.randn(2, 2, 3))
    assert findings == set()
    assert data_uses(graph, "x") == 1
    kinds = nx.get_node_attributes(graph, "kind")
    assert {kinds[k] for k in ("size", "getattr_1", "getitem", "mul")} == {"metadata"}


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
        side = self.b(x)  # never returned
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


def test_fan_out_and_merge():
    graph, findings = analyse(Residual(), torch.randn(1, 4))
    assert findings == {("x", "FC304"), ("add", "FC305")}
    assert data_uses(graph, "x") == 2


def test_using_a_value_twice_in_one_operation_is_fan_out():
    _, findings = analyse(Square(), torch.randn(1, 4))
    assert ("x", "FC304") in findings


def test_unused_branches_and_inputs():
    _, findings = analyse(Unused(), (torch.randn(1, 4), torch.randn(1, 4)))
    assert findings == {("x", "FC304"), ("b", "FC306"), ("y", "FC306")}


def test_outputs_must_be_data():
    _, findings = analyse(ConstantOut(), torch.randn(1, 3))
    assert ("output", "FC307") in findings


def test_parameters_and_constants_are_not_data():
    graph, findings = analyse(BiasFromParameters(), torch.randn(1, 3))
    assert findings == set()
    kinds = nx.get_node_attributes(graph, "kind")
    assert kinds["w"] == "parameter" and kinds["t"] == "constant" and kinds["mul"] == "constant"
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
