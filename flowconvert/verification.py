r"""Checks run on an exported ONNX graph, and the Markdown export report.

Three concerns, each a plain function so they can be reused on any ONNX file:

* :func:`check_graph`: ``onnx.checker`` (full check) and a scan of every node's op type
  for the linear-algebra family (:data:`LINEAR_ALGEBRA_OPS`), which must never reach an
  exported flow: everything that depends only on weights is precomputed into buffers.
* :func:`compare_exact` and :func:`compare_statistical`: parity of onnxruntime against
  PyTorch, elementwise (same inputs, same noise) or, for graphs that draw their own noise,
  through means over many draws, within a multiple of their standard error.
* :func:`render_report`: what was exported, names and shapes, opset, node counts by op
  type and the parity figures.

>>> from onnx import helper, TensorProto
>>> node = helper.make_node("Det", ["a"], ["b"])
>>> g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2])],
...                       [helper.make_tensor_value_info("b", TensorProto.FLOAT, [])])
>>> linear_algebra_ops(helper.make_model(g))
['Det']
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx

from .errors import ExportError

__all__ = [
    "LINEAR_ALGEBRA_OPS",
    "ParityCheck",
    "op_counts",
    "linear_algebra_ops",
    "check_graph",
    "compare_exact",
    "compare_statistical",
    "render_report",
]

#: Op types (any domain) of the linear-algebra family: decompositions, solves, determinants,
#: inverses and matrix functions. ONNX itself only has ``Det``; the others are what other
#: exporters and contrib domains use.
LINEAR_ALGEBRA_OPS = frozenset(
    {
        "Det",
        "Inverse",
        "Svd",
        "SVD",
        "Solve",
        "LinalgSolve",
        "Slogdet",
        "LinalgSlogdet",
        "MatrixExp",
        "LinalgMatrixExp",
        "Cholesky",
        "Qr",
        "QR",
        "Eig",
        "Eigh",
        "Lstsq",
        "Pinv",
        "TriangularSolve",
    }
)


@dataclass(frozen=True)
class ParityCheck:
    """One comparison of an output of onnxruntime with PyTorch.

    ``kind`` is ``"exact"`` (same inputs and noise, elementwise) or ``"statistical"``
    (over ``draws`` draws, of the ``statistic`` ``"mean"`` or ``"mean square"`` about the
    reference mean). ``max_abs_diff`` is the largest elementwise difference (of the
    statistic, when statistical); ``allowed`` the tolerance at the worst element;
    ``max_rel_diff`` the largest ``|diff| / max(|reference|, 1e-12)``.
    """

    output: str
    batch: int
    kind: str
    max_abs_diff: float
    max_rel_diff: float
    allowed: float
    passed: bool
    draws: int = 1
    statistic: str = "values"

    def describe(self) -> str:
        what = f"{self.statistic} over {self.draws} draws" if self.kind == "statistical" else "same inputs and noise"
        return (
            f"output {self.output!r} at batch {self.batch} ({what}): max abs diff {self.max_abs_diff:.3g}, "
            f"max rel diff {self.max_rel_diff:.3g}, allowed {self.allowed:.3g}"
        )


# -- graph structure ---------------------------------------------------------------------
def _nodes(model: onnx.ModelProto) -> Iterable[onnx.NodeProto]:
    """Every node: the main graph, subgraphs (If/Loop/Scan bodies) and local functions."""

    def walk(graph: onnx.GraphProto):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)
    for fn in model.functions:
        yield from fn.node


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nodes of each op type (``domain::Op`` outside the default domain), most frequent first."""
    counts = Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}" for node in _nodes(model)
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def linear_algebra_ops(model: onnx.ModelProto) -> list[str]:
    """Sorted op types of the linear-algebra family present anywhere in ``model``."""
    return sorted({node.op_type for node in _nodes(model) if node.op_type in LINEAR_ALGEBRA_OPS})


def check_graph(path) -> onnx.ModelProto:
    """Load ``path``, run ``onnx.checker`` (full check) and reject linear algebra; returns the model.

    Raises :class:`ExportError` (``FC403`` / ``FC402``).
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several checker/shape-inference exception types
        raise ExportError(f"onnx.checker rejected {path}: {exc}", code="FC403") from exc
    model = onnx.load(str(path), load_external_data=False)
    found = linear_algebra_ops(model)
    if found:
        raise ExportError(
            f"the exported graph {path} contains linear-algebra ops {found}; weight-only "
            "quantities must be precomputed",
            code="FC402",
        )
    return model


# -- parity ------------------------------------------------------------------------------
Arrays = Sequence[np.ndarray]


def _float64_pairs(names: Sequence[str], got: Arrays, want: Arrays) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for name, a, b in zip(names, got, want):
        yield name, np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)


def compare_exact(
    names: Sequence[str], got: Arrays, want: Arrays, *, batch: int, atol: float, rtol: float
) -> list[ParityCheck]:
    """Elementwise comparison: passes where ``|got - want| <= atol + rtol * |want|``; a list of
    :class:`ParityCheck`, one per name."""
    return [
        _check(name, batch, "exact", a, b, atol + rtol * np.abs(b), draws=1)
        for name, a, b in _float64_pairs(names, got, want)
    ]


def compare_statistical(
    names: Sequence[str], got: Arrays, want: Arrays, *, draws: int, atol: float, rtol: float, z: float = 6.0
) -> list[ParityCheck]:
    """Compare the means, and the means of squares, over draws: arrays are ``(draws * batch, ...)``, draw-major.

    At every element the difference of the two means must be within ``z`` standard errors
    of that difference (``sqrt(var_got / n + var_want / n)``, from the sample variances)
    plus ``atol + rtol * |mean|`` for what is deterministic. ``z = 6`` keeps false alarms
    negligible even over many thousands of elements. The second moments catch noise of
    the wrong scale, which the means alone would not.
    """
    checks = []
    for name, a, b in _float64_pairs(names, got, want):
        a = a.reshape(draws, -1, *a.shape[1:])
        b = b.reshape(draws, -1, *b.shape[1:])
        # centre on the reference mean so the second moment is about the spread
        centre = b.mean(0)
        for statistic, fa, fb in (("mean", a, b), ("mean square", (a - centre) ** 2, (b - centre) ** 2)):
            ma, mb = fa.mean(0), fb.mean(0)
            se = np.sqrt((fa.var(0, ddof=1) + fb.var(0, ddof=1)) / draws)
            allowed = z * se + atol + rtol * np.abs(mb)
            checks.append(_check(name, a.shape[1], "statistical", ma, mb, allowed, draws=draws, statistic=statistic))
    return checks


def _check(name, batch, kind, a, b, allowed, draws, statistic="values") -> ParityCheck:
    if a.shape != b.shape:
        return ParityCheck(name, batch, kind, math.inf, math.inf, 0.0, False, draws, statistic)
    if a.size == 0:
        return ParityCheck(name, batch, kind, 0.0, 0.0, 0.0, True, draws, statistic)
    diff = np.abs(a - b)
    allowed = np.broadcast_to(allowed, diff.shape)
    ok = diff <= allowed  # NaN compares False: a failure
    nan = bool(np.isnan(diff).any())
    worst = (
        int(np.argmax(diff))
        if ok.all()
        else int(np.argmax(np.where(ok, -np.inf, np.nan_to_num(diff - allowed, nan=np.inf))))
    )
    max_abs = math.nan if nan else float(diff.max())
    max_rel = math.nan if nan else float((diff / np.maximum(np.abs(b), 1e-12)).max())
    return ParityCheck(
        name, batch, kind, max_abs, max_rel, float(allowed.flat[worst]), bool(ok.all()), draws, statistic
    )


# -- report ------------------------------------------------------------------------------
def render_report(result) -> str:
    """Markdown summary of an :class:`flowconvert.export.ExportResult`."""
    lines = [
        f"# ONNX export: `{result.path.name}`",
        "",
        f"* graph: **{result.graph}** ({_GRAPH_TEXT[result.graph]})",
        f"* noise: **{result.noise}** ({_NOISE_TEXT[result.noise]})",
        f"* model: `{result.model_name}`, {'exact' if result.exact else 'bound (log_prob is a one-sample lower bound when noise is drawn)'}",
        f"* opset {result.opset}, {sum(result.op_counts.values())} nodes, {result.initializer_count} initializers, "
        f"{result.parameter_count} stored numbers",
        f"* linear-algebra ops in the graph: {', '.join(result.linear_algebra_ops) or 'none'}",
        f"* exported with {result.versions}",
        "",
        "## Inputs",
        "",
        "| name | shape | dtype |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{n}` | {_shape_text(result.input_shapes[n])} | {result.input_dtypes[n]} |" for n in result.input_names
    ]
    lines += ["", "## Outputs", "", "| name | shape | dtype |", "|---|---|---|"]
    lines += [
        f"| `{n}` | {_shape_text(result.output_shapes[n])} | {result.output_dtypes[n]} |" for n in result.output_names
    ]
    lines += ["", "## Nodes by op type", "", "| op | count |", "|---|---|"]
    lines += [f"| {op} | {count} |" for op, count in result.op_counts.items()]
    lines += ["", "## Parity with PyTorch (onnxruntime)", ""]
    if not result.parity:
        lines.append("Not verified (`verify=False`).")
    else:
        lines += [
            "| output | batch | comparison | max abs diff | max rel diff | allowed | |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in result.parity:
            how = "same inputs and noise" if c.kind == "exact" else f"{c.statistic} over {c.draws} draws"
            mark = "ok" if c.passed else "FAILED"
            lines.append(
                f"| `{c.output}` | {c.batch} | {how} | {c.max_abs_diff:.3g} | {c.max_rel_diff:.3g} | {c.allowed:.3g} | {mark} |"
            )
    return "\n".join(lines) + "\n"


_GRAPH_TEXT = {
    "likelihood": "model inputs -> model outputs and log_prob",
    "inverse": "model outputs -> reconstructed model inputs",
}
_NOISE_TEXT = {
    "zero": "deterministic: all noise is zero, dropped coordinates take their conditional means",
    "input": "every noise tensor is a graph input of standard-normal draws",
    "random": "noise is drawn inside the graph by RandomNormalLike",
}


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
