r"""Capture: trace a user's model with torch.fx and annotate every node.

This is the first pass of a conversion (capture -> legalize -> lower -> report -> assemble;
see :mod:`flowconvert.conversion`). :func:`capture` works on a deep copy of the model in eval
mode (the user's module is never touched), traces it with :class:`FlowTracer`, and runs a
shape-propagation pass that writes one typed :class:`NodeRecord` per node in
``node.meta["flowconvert"]`` (read it with :func:`record`):

* ``kind``: what the value *is* for a flow:

  - ``"data"``: a tensor computed from the inputs (must be consumed exactly once);
  - ``"metadata"``: a read of sizes, dims, dtypes of data (``x.size(0)``, ``x.shape[1]``);
  - ``"parameter"``: a ``get_attr`` of a weight or buffer;
  - ``"constant"``: computed from parameters and constants only;
* ``shape``: the full shape of a data tensor (batch first), ``dtype`` its dtype, ``arity``
  the length of a data tuple (``torch.split``);
* ``value``: the concrete value of every non-data node (weights for ``F.linear``);
* ``batch_ok``: whether the node keeps samples apart: the model is run a second time with
  one more sample, and a data node must have the batch size as its leading dimension and the
  same per-sample shape in both runs (``shape_check`` is the second run's shape);
* ``location``: the user's ``file:line`` that created the node.

Later passes add to the same record (problems, the layer, a substitution).

Tracing failures become :class:`~flowconvert.errors.TracingError` with a code (``FC301``
data-dependent control flow, ``FC302`` loops/conversions over traced values, ``FC303``
anything else) and the user's ``file:line``:

>>> import torch
>>> class Branchy(torch.nn.Module):
...     def forward(self, x):
...         if x.sum() > 0:
...             return x
...         return -x
>>> try:
...     capture(Branchy(), torch.randn(2, 3))
... except TracingError as err:
...     print(err.code, err.location.split(":")[-1] == str(Branchy.forward.__code__.co_firstlineno + 1))
FC301 True
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import inspect
import io
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TracingError

if TYPE_CHECKING:
    from .core import FlowLayer
    from .registry import Verdict
    from .report import Problem, Substitution

__all__ = [
    "FlowTracer",
    "Capture",
    "NodeRecord",
    "record",
    "ExampleInputError",
    "capture",
    "as_input_tuple",
    "node_location",
    "user_location",
    "DATA",
    "METADATA",
    "PARAMETER",
    "CONSTANT",
]

DATA, METADATA, PARAMETER, CONSTANT, OUTPUT = "data", "metadata", "parameter", "constant", "output"

#: Tensor methods that read metadata of a value without consuming it.
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous"})
#: Tensor attributes that are metadata.
METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"})


@dataclass
class NodeRecord:
    """Everything the passes know about one fx node (``node.meta["flowconvert"]``).

    Written by capture: ``kind``, ``shape`` (full, batch first), ``dtype``, ``arity`` (length of
    a data tuple), ``value`` (non-data nodes), ``location``, ``batch_ok``, ``shape_check``,
    ``training`` (a ``call_module`` node whose module was in training mode in the user's model).
    Written by legalize: ``inserted`` (a node the pass made: a fan-out and its copies),
    ``piece`` (``(tuple node name, index)`` for a getitem reading one piece of a data tuple),
    ``problems``. Written by lower: ``layer`` (convert) or ``verdict`` (audit),
    ``substitution``, ``bases`` (on the output node: one base density per returned value).
    """

    kind: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    arity: int | None = None
    value: Any = None
    location: str | None = None
    batch_ok: bool = True
    shape_check: tuple[int, ...] | None = None
    inserted: bool = False
    piece: tuple[str, int] | None = None
    problems: list[Problem] = field(default_factory=list)
    layer: FlowLayer | None = None
    verdict: Verdict | None = None
    substitution: Substitution | None = None
    bases: dict[str, Any] = field(default_factory=dict)
    training: bool = False

    @property
    def is_data(self) -> bool:
        return self.kind == DATA

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape (batch dimension removed) of a data tensor, or None."""
        return tuple(self.shape[1:]) if self.shape is not None else None


META_KEY = "flowconvert"


def record(node: fx.Node) -> NodeRecord:
    """The node's :class:`NodeRecord` (created empty on first access)."""
    rec = node.meta.get(META_KEY)
    if rec is None:
        rec = node.meta[META_KEY] = NodeRecord()
    return rec


class ExampleInputError(TracingError, ValueError):
    """The example inputs are not tensors, or the model fails when run on them (``FC309``)."""


# -- source locations -------------------------------------------------------------------
def _install_roots() -> tuple[str, ...]:
    """Where installed packages live (site-packages, dist-packages): model code, not the user's."""
    roots = set()
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(path)
    try:
        import site

        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except (AttributeError, ImportError):  # embedded interpreters
        pass
    roots.update(p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"))
    return tuple(os.path.abspath(r) + os.sep for r in roots if r)


def _library_roots() -> tuple[str, ...]:
    """torch, flowconvert and the standard library: never a location worth reporting."""
    roots = {os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__))}
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(path)
    return tuple(os.path.abspath(r) + os.sep for r in roots)


_LIBRARY_ROOTS = _library_roots()
_INSTALL_ROOTS = _install_roots()
_TORCH_ROOT = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OWN_ROOT = os.path.dirname(os.path.abspath(__file__)) + os.sep
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def _installed_root(filename: str) -> str | None:
    path = os.path.abspath(filename)
    return next((r for r in _INSTALL_ROOTS if path.startswith(r)), None)


def _is_user_file(filename: str) -> bool:
    """The user's own code: not torch, flowconvert, the standard library or an installed package."""
    if filename.startswith("<") and not filename.startswith("<doctest"):
        return False
    path = os.path.abspath(filename)
    return _installed_root(path) is None and not path.startswith(_LIBRARY_ROOTS)


def _is_model_file(filename: str) -> bool:
    """Code of an installed package other than torch and flowconvert (``torchvision/models/resnet.py``)."""
    if filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    return _installed_root(path) is not None and not path.startswith((_TORCH_ROOT, _OWN_ROOT))


def _format_location(filename: str, line: int) -> str:
    path = filename
    root = None if filename.startswith("<") else _installed_root(filename)
    if root is not None:
        path = os.path.relpath(os.path.abspath(filename), root)  # torchvision/models/resnet.py
    elif not filename.startswith("<"):
        rel = os.path.relpath(os.path.abspath(filename))
        path = filename if rel.startswith("..") else rel
    return f"{path}:{line}"


def user_location(frames: Iterable[tuple[str, int]]) -> str | None:
    """``file:line`` of the innermost frame of the user's code; else of an installed model's code
    (``torchvision/models/resnet.py:NN``); never torch's or flowconvert's internals.

    >>> user_location([("/site-packages/torch/nn/modules/module.py", 3), ("model.py", 12)])
    'model.py:12'
    """
    user = model = None
    for filename, line in frames:
        if _is_user_file(filename):
            user = (filename, int(line))
        elif _is_model_file(filename):
            model = (filename, int(line))
    found = user or model
    return _format_location(*found) if found else None


def node_location(node: fx.Node) -> str | None:
    """The user's ``file:line`` for an fx node, from ``node.meta["stack_trace"]``."""
    rec = node.meta.get(META_KEY)
    if rec is not None:
        return rec.location
    trace = node.meta.get("stack_trace") or ""
    return user_location((m["file"], int(m["line"])) for m in _FRAME.finditer(trace))


def location_of(exc: BaseException) -> str | None:
    """The user's ``file:line`` where ``exc`` was raised, if in user code."""
    return user_location((f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__))


# -- the tracer ---------------------------------------------------------------------------
class FlowTracer(fx.Tracer):
    """An fx tracer that records stack traces and keeps modules with a conversion rule as leaves.

    ``leaf_types`` are module types that must appear as single ``call_module`` nodes (the
    registry's module rules); torch's own modules are leaves as usual.
    """

    record_stack_traces = True

    def __init__(self, leaf_types: Iterable[type] = ()):
        super().__init__()
        self.leaf_types = frozenset(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        # fx records stacks with torch's C++ symbolizer, whose first use in a process takes
        # seconds; the standard library's frame walk (without reading source lines) is enough
        # for file:line and keeps ``meta["stack_trace"]`` in fx's format.
        record, self.record_stack_traces = self.record_stack_traces, False
        try:
            node = super().create_node(*args, **kwargs)
        finally:
            self.record_stack_traces = record
        if record and not node.stack_trace:
            node.stack_trace = _stack_inside_trace()
        return node


_TRACE_CODE = fx.Tracer.trace.__code__


def _stack_inside_trace() -> str:
    """The current stack, outermost first, limited to frames called from ``Tracer.trace``.

    Nodes created by ``trace`` itself (inputs, output) thus carry no user frame.
    """
    frames = []
    for frame, lineno in traceback.walk_stack(None):
        if frame.f_code is _TRACE_CODE:
            break
        frames.append(f'File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}')
    return "\n".join(reversed(frames))


#: Where fx raises when a traced value is used for control flow, or iterated/measured.
_CONTROL_FLOW_FRAMES = frozenset({"to_bool", "__bool__"})
_CONVERSION_FRAMES = frozenset({"iter", "__iter__", "__len__", "keys"})


def _tracing_error(exc: Exception) -> TracingError:
    """Classify a tracing failure by the exception's type and the fx method that raised it."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    raised_in = frames[-1].name if frames else ""
    if isinstance(exc, fx.proxy.TraceError) and raised_in in _CONTROL_FLOW_FRAMES:
        code, what = "FC301", "the forward pass branches on a tensor value"
    elif isinstance(exc, (fx.proxy.TraceError, TypeError)) or raised_in in _CONVERSION_FRAMES:
        # iterating a Proxy (TraceError), len() of it, or int()/range() of a traced size (TypeError)
        code, what = "FC302", "the forward pass loops over or converts a traced value"
    else:
        code, what = "FC303", "torch.fx could not trace the forward pass"
    return TracingError(f"{what} ({type(exc).__name__}: {message})", code=code, location=location_of(exc))


# -- capture ---------------------------------------------------------------------------------
@dataclass
class Capture:
    """The traced copy of a model: ``module`` (an fx GraphModule, annotated), ``inputs``, ``batch``."""

    module: fx.GraphModule
    inputs: tuple[Tensor, ...]
    batch: int
    model_name: str
    #: qualified names of the user's modules that were in training mode (the copy is traced in eval mode)
    training: frozenset = frozenset()

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph


def as_input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of tensors) to a tuple.

    >>> len(as_input_tuple(torch.zeros(1, 2)))
    1
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ExampleInputError(
            f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}",
            code="FC309",
        )
    for i, t in enumerate(inputs):
        if t.dim() == 0:
            raise ExampleInputError("example inputs need a leading batch dimension, got a scalar", code="FC309")
        if not t.is_floating_point():
            which = "the example input" if len(inputs) == 1 else f"example input {i}"
            raise ExampleInputError(
                f"{which} has dtype {t.dtype}: a flow is a density over real-valued inputs, so the model "
                "must take floating-point inputs (integer ids or labels have no change of variables; convert "
                "the part of the model after an embedding, or pass float data and Dequantize discrete levels)",
                code="FC309",
            )
    return inputs


def _concrete_args(model: nn.Module, n_inputs: int) -> dict[str, Any] | None:
    """Fix the forward's optional arguments beyond the example inputs to their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    concrete = {p.name: p.default for p in positional[n_inputs:] if p.default is not inspect.Parameter.empty}
    return concrete or None


def capture(model: nn.Module, example_inputs: Any, *, leaf_types: Iterable[type] = ()) -> Capture:
    """Trace a deep copy of ``model`` (in eval mode) and annotate its nodes (see module docs).

    The flow follows the model's eval-mode function. Modules that were in training mode are
    listed in :attr:`Capture.training`, and their ``call_module`` nodes carry
    ``NodeRecord.training = True`` (BatchNorm in training mode is then refused, FC211).

    Raises :class:`~flowconvert.errors.TracingError` when the model cannot be traced and
    :class:`ExampleInputError` when it fails on ``example_inputs``.
    """
    inputs = as_input_tuple(example_inputs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    try:
        work = copy.deepcopy(model)
    except Exception as exc:
        raise TracingError(f"could not copy the model to trace it ({type(exc).__name__}: {exc})", code="FC303") from exc
    training = frozenset(name for name, m in model.named_modules() if m.training)
    work.eval()
    tracer = FlowTracer(leaf_types)
    try:
        graph = tracer.trace(work, concrete_args=_concrete_args(work, len(inputs)))
    except Exception as exc:
        raise _tracing_error(exc) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    for node in gm.graph.nodes:
        # inputs and the output are made by the tracer itself, not by a line of forward
        where = None if node.op in ("placeholder", "output") else node_location(node)
        node.meta[META_KEY] = NodeRecord(location=where)
        if node.op == "call_module" and node.target in training:
            node.meta[META_KEY].training = True
    batch = int(inputs[0].shape[0])
    with torch.no_grad():
        _propagate(gm, work, inputs)
        _check_batch(gm, inputs)
    return Capture(gm, inputs, batch, type(model).__name__, training)


def _is_tensorlike(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_is_tensorlike(v) for v in value)
    if isinstance(value, dict):
        return any(_is_tensorlike(v) for v in value.values())
    return False


def _is_metadata_read(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    if node.op == "call_function" and node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in METADATA_ATTRIBUTES
    return node.op == "call_function" and node.target in (torch.numel, builtins.len)


def classify(node: fx.Node, value: Any) -> str:
    """The kind of a node's value (see module docs), given its inputs' kinds and its value."""
    if node.op == "placeholder":
        return DATA if isinstance(value, Tensor) else CONSTANT
    if node.op == "get_attr":
        return PARAMETER
    if node.op == "output":
        return OUTPUT
    kinds = {record(n).kind for n in node.all_input_nodes}
    if DATA in kinds:
        return METADATA if _is_metadata_read(node) else DATA
    if METADATA in kinds and not _is_tensorlike(value):
        return METADATA
    return CONSTANT


def _run_tagged(run_node: Any, n: fx.Node) -> Any:
    """``run_node(n)``, with the failing node attached to any exception (``exc.fc_node``)."""
    try:
        return run_node(n)
    except Exception as exc:
        exc.fc_node = n  # type: ignore[attr-defined]
        raise


class _Propagate(ShapeProp):
    """ShapeProp that also records each node's kind, full data shapes and non-data values."""

    def run_node(self, n: fx.Node) -> Any:
        result = _run_tagged(super().run_node, n)
        rec = record(n)
        rec.kind = classify(n, result)
        if rec.kind == DATA:
            if isinstance(result, Tensor):
                rec.shape, rec.dtype = tuple(result.shape), result.dtype
            elif isinstance(result, (tuple, list)):
                rec.arity = len(result)
        elif rec.kind != OUTPUT:
            rec.value = result
        return result


def _propagate(gm: fx.GraphModule, work: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    # ShapeProp prints a traceback before re-raising; we explain failures ourselves, so keep
    # its stderr and pass it on only when the pass succeeds (the model's own warnings).
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            _Propagate(gm).propagate(*inputs)
        sys.stderr.write(captured.getvalue())
    except Exception as exc:
        node = getattr(exc, "fc_node", None)
        where = node_location(node) if node is not None else None
        try:  # does the model itself fail on these inputs, or only its traced graph?
            work(*inputs)
        except Exception as eager:
            raise ExampleInputError(
                f"the model fails on the example inputs of shape "
                f"{', '.join(str(tuple(t.shape)) for t in inputs)} ({type(eager).__name__}: {eager})",
                code="FC309",
                location=location_of(eager) or where,
            ) from eager
        raise TracingError(
            f"the traced graph fails at node {node.name if node is not None else '?'} although the model runs "
            f"({type(exc).__name__}: {exc})",
            code="FC303",
            location=where,
        ) from exc


class _SecondRun(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = _run_tagged(super().run_node, n)
        if record(n).kind == DATA and isinstance(result, Tensor):
            record(n).shape_check = tuple(result.shape)
        return result


def _check_batch(gm: fx.GraphModule, inputs: tuple[Tensor, ...]) -> None:
    """Run again with one more sample; mark data nodes whose shapes do not follow the batch."""
    grown = tuple(torch.cat([t, t[:1]]) for t in inputs)
    failed = None
    try:
        _SecondRun(gm).run(*grown)
    except Exception as exc:  # noqa: BLE001 - a node that breaks with another batch size mixes samples
        failed = getattr(exc, "fc_node", None)
    b1, b2 = int(inputs[0].shape[0]), int(grown[0].shape[0])
    for node in gm.graph.nodes:
        rec = record(node)
        if rec.kind != DATA or rec.shape is None:
            continue
        s1, s2 = rec.shape, rec.shape_check
        if node is failed:
            ok = False
        elif s2 is None:
            ok = True  # not reached because an earlier node failed: judged there
        else:
            ok = len(s1) >= 1 and s1[0] == b1 and s2[0] == b2 and s1[1:] == s2[1:]
        rec.batch_ok = ok


def per_sample_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Per-sample shape (batch dimension removed) of a data node, or None."""
    return record(node).sample_shape
