"""docs/supported.md lists exactly what the rule registry does."""

import re
from collections import defaultdict
from pathlib import Path

import flowconvert as fc
from flowconvert.errors import DIAGNOSTICS
from flowconvert.registry import REGISTRY

DOC = Path(__file__).resolve().parents[1] / "docs" / "supported.md"
LIKELIHOODS = {"exact", "exact / bound", "exact / refused (FC132)", "refused (FC101) / substitution"}


def registry_groups() -> dict[frozenset, str]:
    """Operations grouped by the rule that builds them -> the rule's name or 'refused (FCxxx)'."""
    groups = defaultdict(set)
    for table, fmt in ((REGISTRY.modules, lambda r: r.description), (REGISTRY.functions, lambda r: r.description),
                       (REGISTRY.methods, lambda r: f".{r.description}()")):
        for rule in table.values():
            build = rule.build
            if build.__name__ == "refuse":
                code = next(c.cell_contents for c in build.__closure__
                            if isinstance(c.cell_contents, str) and c.cell_contents.startswith("FC"))
                groups[f"refused ({code})"].add(fmt(rule))
            else:
                groups[build.__name__].add(fmt(rule))
    return {frozenset(ops): name for name, ops in groups.items()}


def doc_rows() -> list[tuple[str, frozenset, str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| likelihood") or line.startswith("|---"):
            continue
        likelihood, ops, layer, notes = (c.strip() for c in line.strip("|").split(" | "))
        rows.append((likelihood, frozenset(re.findall(r"`([^`]+)`", ops)), layer, notes))
    return rows


def test_every_registry_rule_is_documented_once_and_nothing_else():
    groups, rows = registry_groups(), doc_rows()
    documented = [ops for _, ops, _, _ in rows]
    assert len(documented) == len(set(documented))
    missing = set(groups) - set(documented)
    extra = set(documented) - set(groups)
    assert not missing, f"registry rules missing from docs/supported.md: {[sorted(m) for m in missing]}"
    assert not extra, f"docs/supported.md lists operations the registry does not group so: {[sorted(e) for e in extra]}"


def test_likelihood_column_matches_the_rules():
    groups = registry_groups()
    for likelihood, ops, layer, _ in doc_rows():
        rule = groups[ops]
        if rule.startswith("refused"):
            assert likelihood == rule, (sorted(ops), likelihood, rule)
            assert rule[9:14] in DIAGNOSTICS
        else:
            assert likelihood in LIKELIHOODS, likelihood
            for name in layer.split(", "):
                assert hasattr(fc, name), f"{name} is not exported by flowconvert"


def test_relu_row_states_the_substitution_policy():
    (row,) = [r for r in doc_rows() if "nn.ReLU" in r[1]]
    assert row[0] == "refused (FC101) / substitution" and 'relu="leaky"' in row[3]


def test_readme_table_is_the_documented_table():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    table = lambda path: [line for line in path.read_text().splitlines() if line.startswith("| ") and " | " in line]
    doc_table = table(DOC)
    assert doc_table and all(row in table(readme) for row in doc_table)
    readme_rows = [row for row in table(readme) if row.count(" | ") == 3]
    assert readme_rows == doc_table
