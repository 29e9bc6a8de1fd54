"""docs/supported.md and the README table are generated from the rule registry's declarations."""

import re
from pathlib import Path

import pytest

import flowconvert as fc
from flowconvert.errors import DIAGNOSTICS
from flowconvert.registry import LIKELIHOODS, REGISTRY, Registry

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "supported.md"


def table_rows(text: str | Path) -> list[str]:
    text = text.read_text() if isinstance(text, Path) else text
    return [line for line in text.splitlines() if line.startswith("|") and line.count(" | ") == 3]


def test_docs_table_is_the_generated_table():
    assert table_rows(DOC) == table_rows(REGISTRY.markdown_table()), (
        "docs/supported.md is stale: regenerate it from REGISTRY.markdown_table()"
    )


def test_readme_table_is_the_documented_table():
    assert table_rows(ROOT / "README.md") == table_rows(DOC)


def test_every_spelling_appears_once():
    ops = [op for line in table_rows(DOC)[1:] for op in re.findall(r"`([^`]+)`", line.split(" | ")[1])]
    assert len(ops) == len(set(ops))
    expected = [
        r.documented_name
        for table in (REGISTRY.modules, REGISTRY.functions, REGISTRY.methods, REGISTRY.named_functions)
        for r in table.values()
    ]
    assert sorted(ops) == sorted(expected)


@pytest.mark.parametrize("spec", [spec for spec, _ in REGISTRY.specs()], ids=lambda s: s.name)
def test_declared_data_is_valid(spec):
    assert spec.likelihood in LIKELIHOODS
    assert all(code in DIAGNOSTICS for code in spec.codes), spec.codes
    assert spec.conditions
    if spec.likelihood in ("refused", "substitution"):
        assert spec.codes
    if spec.likelihood != "refused":
        assert spec.layers
        for name in spec.layers:
            assert hasattr(fc, name), f"{name} is not exported by flowconvert"


def test_codes_named_in_conditions_are_declared():
    for spec, _ in REGISTRY.specs():
        named = set(re.findall(r"FC\d{3}", spec.conditions))
        assert named <= set(spec.codes), (spec.name, named - set(spec.codes))


def test_relu_row_states_the_substitution_policy():
    (row,) = [r for r in table_rows(DOC) if "`nn.ReLU`" in r]
    assert row.startswith("| refused (FC101) / substitution |") and 'relu="leaky"' in row


def test_a_new_rule_appears_in_the_table():
    registry = Registry()
    registry.reject("FC107", "activation", methods=["erf"], conditions="not yet")
    assert "| refused (FC107) | `.erf()` | - | not yet |" in registry.markdown_table()
