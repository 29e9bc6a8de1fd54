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
import re
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
        *(
            [
                "* computed in float32 (onnxruntime has no double kernel): "
                + ", ".join(f"{op} x{n}" for op, n in result.float32_ops.items())
            ]
            if getattr(result, "float32_ops", None)
            else []
        ),
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


# -- loadable in onnxruntime: float32 islands for ops without a double kernel -------------------
_NOT_IMPLEMENTED = re.compile(r"implementation for (\w+)\(\d+\) node")


def fit_runtime(path, max_rounds: int = 16) -> dict[str, int]:
    """Make ``path`` loadable in onnxruntime; returns ``{op type: nodes computed in float32}``.

    onnxruntime's CPU provider has no float64 kernel for several operators. Elementwise ones
    (``LeakyRelu``, ``PRelu``, ``Elu``, ``Selu``, ``Softplus``, ``Atanh``) are rewritten
    exactly with double-capable operators (``Where``, ``Exp``, ``Log``, ...); every other
    node of such a type (``Conv``, ``AveragePool``, ...) gets its double inputs cast to
    float32 and its outputs cast back, so it runs in single precision (reported; the parity
    check measures the cost). Raises
    :class:`ExportError` (``FC401``) when the file cannot be loaded for any other reason.
    """
    import onnxruntime as ort

    cast: dict[str, int] = {}
    for _ in range(max_rounds):
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return cast
        except Exception as exc:  # onnxruntime raises its own exception types
            match = _NOT_IMPLEMENTED.search(str(exc))
            if match is None or match.group(1) in cast:
                first = str(exc).strip().splitlines()
                raise ExportError(
                    f"onnxruntime cannot load the exported graph: {first[0] if first else exc}", code="FC401"
                ) from exc
            op = match.group(1)
            model = onnx.load(str(path))
            if op in _DOUBLE_REWRITES:
                if not _rewrite_in_double(model, op):
                    raise ExportError(f"onnxruntime has no kernel for {op}", code="FC401") from exc
                onnx.save(model, str(path))
                continue
            count = _cast_to_float32(model, op)
            if not count:
                raise ExportError(
                    f"onnxruntime has no kernel for {op} and the node cannot be recast", code="FC401"
                ) from exc
            cast[op] = count
            onnx.save(model, str(path))
    raise ExportError("onnxruntime still cannot load the exported graph after recasting", code="FC401")


def _cast_to_float32(model: onnx.ModelProto, op_type: str) -> int:
    """Wrap every ``op_type`` node with double tensors in Cast(float32) ... Cast(float64)."""
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    double = TensorProto.DOUBLE
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != op_type or not any(types.get(n) == double for n in (*node.input, *node.output)):
            nodes.append(node)
            continue
        count += 1
        for i, name in enumerate(node.input):
            if name and types.get(name) == double:
                new = f"{name}__f32_{count}_{i}"
                nodes.append(helper.make_node("Cast", [name], [new], to=TensorProto.FLOAT, name=f"{new}_cast"))
                node.input[i] = new
        after = []
        for i, name in enumerate(node.output):
            if name and types.get(name, double) == double:
                new = f"{name}__f32"
                node.output[i] = new
                after.append(helper.make_node("Cast", [new], [name], to=double, name=f"{name}_cast64"))
        for attr in node.attribute:  # a dtype attribute (e.g. of RandomNormalLike) follows the node
            if attr.name == "dtype" and attr.i == double:
                attr.i = TensorProto.FLOAT
        nodes.append(node)
        nodes.extend(after)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _rewrite_in_double(model: onnx.ModelProto, op_type: str) -> int:
    """Replace every ``op_type`` node by the same function built from ops that have double kernels."""
    from onnx import helper, numpy_helper

    consts: dict[float, str] = {}

    def const(value: float) -> str:
        if value not in consts:
            name = f"__fc_double_{len(consts)}_{op_type}"
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float64), name))
            consts[value] = name
        return consts[value]

    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != op_type:
            nodes.append(node)
            continue
        count += 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, out, stem = node.input[0], node.output[0], f"__fc_{op_type}_{count}"

        def make(op: str, ins: list[str], name: str, stem: str = stem) -> str:
            """Append one node ``op(ins)`` with a fresh output name; return that name."""
            nodes.append(helper.make_node(op, ins, [f"{stem}_{name}"]))
            return f"{stem}_{name}"

        if op_type in ("LeakyRelu", "PRelu"):
            slope = const(float(attrs.get("alpha", 0.01))) if op_type == "LeakyRelu" else node.input[1]
            neg = make("Less", [x, const(0.0)], "neg")
            scaled = make("Mul", [x, slope], "scaled")
            nodes.append(helper.make_node("Where", [neg, scaled, x], [out]))
        elif op_type in ("Elu", "Selu"):
            alpha = float(attrs.get("alpha", 1.0 if op_type == "Elu" else 1.67326319217681884765625))
            neg = make("Less", [x, const(0.0)], "neg")
            em1 = make("Sub", [make("Exp", [x], "exp"), const(1.0)], "em1")
            low = make("Mul", [em1, const(alpha)], "low")
            if op_type == "Elu":
                nodes.append(helper.make_node("Where", [neg, low, x], [out]))
            else:
                gamma = float(attrs.get("gamma", 1.05070102214813232421875))
                nodes.append(helper.make_node("Mul", [make("Where", [neg, low, x], "branch"), const(gamma)], [out]))
        elif op_type == "Softplus":  # max(x, 0) + log(1 + exp(-|x|)), finite for every x
            tail = make(
                "Log",
                [make("Add", [const(1.0), make("Exp", [make("Neg", [make("Abs", [x], "abs")], "nabs")], "e")], "1pe")],
                "log",
            )
            nodes.append(helper.make_node("Add", [make("Max", [x, const(0.0)], "relu"), tail], [out]))
        elif op_type == "Atanh":  # 0.5 * log((1 + x) / (1 - x))
            ratio = make("Div", [make("Add", [const(1.0), x], "p"), make("Sub", [const(1.0), x], "m")], "ratio")
            nodes.append(helper.make_node("Mul", [make("Log", [ratio], "log"), const(0.5)], [out]))
        else:  # pragma: no cover - _DOUBLE_REWRITES lists the cases above
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


_DOUBLE_REWRITES = ("LeakyRelu", "PRelu", "Elu", "Selu", "Softplus", "Atanh")
