"""Capture: tracing a copy, source locations, node kinds, shapes, batch checks, tracing failures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowconvert as fc
import source_lines
from flowconvert.registry import REGISTRY
from flowconvert.tracing import (
    DATA,
    METADATA,
    PARAMETER,
    ExampleInputError,
    FlowTracer,
    NodeRecord,
    capture,
    node_location,
    record,
    user_location,
)
from zoo import ZOO, make


def line_of(marker: str) -> int:
    return source_lines.line_of(__file__, marker)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return F.leaky_relu(self.lin(x), 0.1)  # inner-line


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        x = x.view(x.size(0), -1)  # view-line
        x = F.linear(x, self.w)
        return self.inner(x)  # outer-line


def nodes_by_name(cap):
    return {n.name: n for n in cap.graph.nodes}


def test_locations_point_at_the_users_lines():
    cap = capture(Outer(), torch.randn(2, 2, 4))
    nodes = nodes_by_name(cap)
    assert node_location(nodes["view"]).endswith(f"test_tracing.py:{line_of('view-line')}")
    # nodes created inside a traced submodule point into that submodule's forward
    assert node_location(nodes["inner_lin"]).endswith(f"test_tracing.py:{line_of('inner-line')}")
    assert node_location(nodes["leaky_relu"]).endswith(f"test_tracing.py:{line_of('inner-line')}")


def test_user_location_skips_library_frames():
    torch_file = torch.nn.modules.module.__file__
    assert user_location([("model.py", 3), (torch_file, 10)]) == "model.py:3"
    assert user_location([(torch_file, 10)]) is None


def test_kinds_shapes_and_values():
    cap = capture(Outer(), torch.randn(2, 2, 4))
    nodes = nodes_by_name(cap)
    assert all(isinstance(n.meta["flowconvert"], NodeRecord) for n in cap.graph.nodes)  # one typed record each
    assert record(nodes["x"]).kind == DATA
    assert record(nodes["size"]).kind == METADATA
    assert record(nodes["w"]).kind == PARAMETER
    assert record(nodes["view"]).shape == (2, 8) and record(nodes["view"]).sample_shape == (8,)
    assert record(nodes["view"]).dtype == torch.float32
    assert record(nodes["size"]).value == 2
    assert torch.equal(record(nodes["w"]).value, cap.module.w)
    assert all(record(n).batch_ok for n in cap.graph.nodes)


def test_registered_modules_are_leaves_and_user_modules_are_traced_through():
    tracer = FlowTracer(REGISTRY.leaf_types)
    assert tracer.is_leaf_module(nn.Linear(2, 2), "lin")
    assert tracer.is_leaf_module(nn.ReLU(), "act")
    assert not tracer.is_leaf_module(Inner(), "inner")
    assert not tracer.is_leaf_module(nn.Sequential(nn.Linear(2, 2)), "seq")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.mean() > 0:  # branch-line
            return self.fc(x)
        return x


class Loopy(nn.Module):
    def forward(self, x):
        for _ in range(x.size(1)):  # loop-line
            x = x * 0.5
        return x


def test_data_dependent_if_is_a_tracing_error_with_the_users_line():
    with pytest.raises(fc.TracingError) as info:
        capture(Branchy(), torch.randn(2, 3))
    err = info.value
    assert err.code == "FC301"
    assert err.location.endswith(f"test_tracing.py:{line_of('branch-line')}")
    assert "torch.where" in str(err)  # the hint


def test_loop_over_a_traced_size_is_fc302():
    with pytest.raises(fc.TracingError) as info:
        capture(Loopy(), torch.randn(2, 3))
    assert info.value.code == "FC302"
    assert info.value.location.endswith(f"test_tracing.py:{line_of('loop-line')}")


def test_bad_example_inputs():
    with pytest.raises(ExampleInputError) as info:
        capture(nn.Linear(4, 2), torch.randn(1, 5))
    assert info.value.code == "FC309" and isinstance(info.value, ValueError)
    with pytest.raises(ExampleInputError):
        capture(nn.Linear(4, 2), [1.0, 2.0])
    with pytest.raises(ExampleInputError):
        capture(nn.Linear(4, 2), torch.tensor(1.0))


class MixesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.reshape(-1, 4))  # (B, 2, 4) -> (2B, 4)


class HardCodedBatch(nn.Module):
    def forward(self, x):
        return x.view(1, -1)


def test_batch_mixing_is_detected_by_a_second_run():
    cap = capture(MixesBatch(), torch.randn(1, 2, 4))
    assert not record(nodes_by_name(cap)["reshape"]).batch_ok
    cap = capture(HardCodedBatch(), torch.randn(1, 2, 4))  # looks fine at batch 1
    assert not record(nodes_by_name(cap)["view"]).batch_ok


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return self.fc(x)


def test_optional_arguments_keep_their_defaults():
    model = OptionalArg()
    flow = fc.convert(model, torch.randn(1, 3))
    x = torch.randn(2, 3)
    assert torch.equal(flow(x), model(x))
    assert flow.input_shapes == [(3,)]


def _snapshot(model: nn.Module):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        params={k: (p.data_ptr(), p.requires_grad) for k, p in model.named_parameters()},
        structure=repr(model),
        training={k: m.training for k, m in model.named_modules()},
        attributes={k: sorted(vars(m)) for k, m in model.named_modules()},
        hooks={k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in model.named_modules()},
    )


@pytest.mark.parametrize("entry", ZOO[:6], ids=[e.name for e in ZOO[:6]])
def test_user_model_is_unchanged_by_audit_and_convert(entry):
    model = make(entry)
    model.train()  # a training flag that conversion must not flip
    before = _snapshot(model)
    x = torch.randn(entry.shape)
    fc.audit(model, x[:1])
    flow = fc.convert(model, x[:1])
    after = _snapshot(model)
    assert before["structure"] == after["structure"]
    assert before["training"] == after["training"] and all(after["training"].values())
    assert before["attributes"] == after["attributes"]
    assert before["params"] == after["params"]
    assert before["hooks"] == after["hooks"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    # the flow owns copies: changing it leaves the model alone
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(1.0)
        for b in flow.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    assert all(torch.equal(before["state"][k], v) for k, v in model.state_dict().items())


def test_failed_audit_leaves_the_model_unchanged_too():
    model = Branchy().train()
    before = copy.deepcopy(model.state_dict())
    report = fc.audit(model, torch.randn(2, 3))
    assert not report.convertible and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
