"""The audit report: right code, the user's line and a hint for every refusal; all problems at once."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import flowconvert as fc
import source_lines
from flowconvert.errors import DIAGNOSTICS


def line_of(marker: str) -> int:
    return source_lines.line_of(__file__, marker)


class WithActivation(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = act

    def forward(self, x):
        x = self.fc(x)
        return self.act(x)  # activation-line


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.fc(x))  # norm-line


class DataDependentIf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        if (x > 0).all():  # if-line
            x = 2 * x
        return x


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.act = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(x)))
        return h + x  # residual-line


class ConstantPadding(nn.Module):
    """Concatenates data with a constant: coordinates without a density."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pad = nn.Parameter(torch.zeros(1, 2))

    def forward(self, x):
        h = self.fc(x)
        return torch.cat([h, self.pad.expand(h.size(0), 2)], 1)  # cat-line


class ThreeProblems(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.gelu = nn.GELU()
        self.fc3 = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        x = self.act(self.fc1(x))  # problem-1
        x = self.gelu(self.fc2(x))  # problem-2
        return self.norm(self.fc3(x))  # problem-3


CASES = [
    (WithActivation(nn.ReLU()), "act", "FC101", "activation-line", "LeakyReLU(negative_slope=0.01)"),
    (WithActivation(nn.GELU()), "act", "FC102", "activation-line", "LeakyReLU"),
    (WithActivation(nn.LeakyReLU(0.0)), "act", "FC202", "activation-line", "negative_slope=0.01"),
    (WithNorm(), "norm", "FC103", "norm-line", "Remove the normalization"),
    (DataDependentIf(), "<trace>", "FC301", "if-line", "torch.where"),
    (ConstantPadding(), "cat", "FC305", "cat-line", "concatenate only data values"),
]


@pytest.mark.parametrize("model, node, code, marker, hint", CASES, ids=[c[2] for c in CASES])
def test_refusals_name_code_line_and_hint(model, node, code, marker, hint):
    report = fc.audit(model, torch.randn(1, 4))
    assert not report.convertible
    entry = next(n for n in report.nodes if n.name == node)
    assert entry.status == "rejected" and entry.code == code
    assert entry.location.endswith(f"test_report.py:{line_of(marker)}")
    assert hint in entry.hint and entry.hint == DIAGNOSTICS[code].hint
    assert entry.reason and entry.why == DIAGNOSTICS[code].explanation
    with pytest.raises(fc.ConversionError) as info:
        fc.convert(model, torch.randn(1, 4))
    assert info.value.code == code or code in info.value.report.counts


def test_relu_explanation_in_practitioner_words():
    report = fc.audit(WithActivation(nn.ReLU()), torch.randn(1, 4))
    text = str(report)
    assert "ReLU maps all negative inputs to 0, so it has no inverse" in text
    assert "Replace nn.ReLU with nn.LeakyReLU(negative_slope=0.01) and fine-tune" in text


def test_residual_converts_with_a_duplicate_and_a_sum():
    report = fc.audit(ResidualBlock(), torch.randn(1, 4))
    assert report.convertible and report.likelihood == "bound"  # the duplication of x is an augmentation
    x = next(n for n in report.nodes if n.name == "x")
    assert x.fanout and "duplicated" in x.note and "x: used 2 times" in str(report)
    add = next(n for n in report.nodes if n.name == "add")
    assert add.status == "converted" and add.likelihood == "exact"


def test_three_problems_are_all_reported_grouped_by_kind():
    report = fc.audit(ThreeProblems(), torch.randn(1, 8))
    assert report.counts == {"FC101": 1, "FC102": 1, "FC103": 1}
    lines = {p.code: p.location for _, p in report.problems}
    for i, code in enumerate(["FC101", "FC102", "FC103"], 1):
        assert lines[code].endswith(f"test_report.py:{line_of(f'problem-{i}')}")
    converted = [n.name for n in report.nodes if n.status == "converted"]
    assert converted == ["fc1", "fc2", "fc3"]
    text = str(report)
    assert "NOT convertible, 3 problems" in text and "Problems by kind:" in text
    for code in ("FC101", "FC102", "FC103"):
        assert text.count(f"[{code}]") == 1


def test_every_node_has_an_entry_with_a_status():
    report = fc.audit(ThreeProblems(), torch.randn(1, 8))
    assert [n.name for n in report.nodes] == ["x", "fc1", "act", "fc2", "gelu", "fc3", "norm", "output"]
    statuses = {n.name: n.status for n in report.nodes}
    assert statuses["x"] == "passthrough" and statuses["output"] == "passthrough"
    assert {n.likelihood for n in report.nodes if n.status == "converted"} == {"exact"}


def test_summary_of_a_convertible_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU(0.1), nn.Linear(4, 5))
    report = fc.audit(model, torch.randn(1, 6))
    assert report.convertible and not report.exact and report.likelihood == "bound"
    assert report.latent_size == 5 and report.output_shapes == [(5,)] and report.input_shapes == [(6,)]
    # funnel 6 -> 4: q(d | y) with A (2x4), c (2), log sigma (2) and a 2 x 2 precision factor;
    # augment 4 -> 5: log tau (1); the audit counts the built (diagonal) base: loc and log sigma
    assert report.density_parameters == 2 * 4 + 2 + 2 + 2 * 2 + 1 + 2 * 5
    text = str(report)
    assert "convertible, bound likelihood" in text and "latent size" in text
    assert "point evaluation" in text


def test_markdown_dict_and_json():
    report = fc.audit(ThreeProblems(), torch.randn(1, 8))
    md = report.to_markdown()
    assert md.startswith("## flowconvert audit of ThreeProblems") and "| FC101 |" in md and "- hint:" in md
    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["convertible"] is False and data["problem_counts"] == {"FC101": 1, "FC102": 1, "FC103": 1}
    act = next(n for n in data["nodes"] if n["name"] == "act")
    assert set(act) >= {"name", "op", "target", "status", "likelihood", "code", "reason", "hint", "location"}
    assert act["code"] == "FC101" and act["target"] == "act (ReLU)"


def test_tracing_failure_report_renders():
    report = fc.audit(DataDependentIf(), torch.randn(1, 4))
    assert report.counts == {"FC301": 1} and len(report.nodes) == 1
    assert "FC301" in str(report) and "FC301" in report.to_markdown()
    json.loads(report.to_json())


def test_every_code_used_by_the_rules_is_in_the_catalogue():
    import inspect
    import re

    from flowconvert import registry
    from flowconvert.registry import REGISTRY

    declared = {code for spec, _ in REGISTRY.specs() for code in spec.codes}
    written = set(re.findall(r'"(FC\d{3})"', inspect.getsource(registry)))
    assert declared and declared <= set(DIAGNOSTICS) and written <= set(DIAGNOSTICS)
    for code, diag in DIAGNOSTICS.items():
        assert diag.title and diag.explanation and diag.hint, code
