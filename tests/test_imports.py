"""The import structure: no cycles inside flowconvert/, and commands import only what they use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "flowconvert"


def module_imports() -> nx.DiGraph:
    """flowconvert module -> flowconvert modules it imports when it is imported (module level)."""
    g = nx.DiGraph()
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        g.add_node(name)
        tree = ast.parse(path.read_text())
        for stmt in tree.body:  # module level only; `if TYPE_CHECKING:` blocks are not executed
            if isinstance(stmt, ast.ImportFrom) and stmt.level == 1:
                targets = [stmt.module] if stmt.module else [a.name for a in stmt.names]
                for target in targets:
                    g.add_edge(name, target.split(".")[0])
    return g


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(module_imports()))
    assert cycles == [], f"import cycles in flowconvert/: {cycles}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_import_and_help_do_not_import_torch_or_onnx():
    loaded = _modules_after("import flowconvert")
    assert "torch" not in loaded and "onnx" not in loaded
    loaded = _modules_after("from flowconvert.cli import build_parser; build_parser()")
    assert "torch" not in loaded


def test_conversion_does_not_import_onnx():
    loaded = _modules_after("import torch, flowconvert as fc; fc.convert(torch.nn.Linear(2, 2), torch.randn(1, 2))")
    assert "onnx" not in loaded and "onnxruntime" not in loaded
