r"""Export a converted model to ONNX: the likelihood pass or the inverse, verified in onnxruntime.

:func:`export_onnx` traces the flow (prepared in place, then restored) with ``torch.export`` (through
``torch.onnx.export(..., dynamo=True)``) into one of two graphs:

* ``graph="likelihood"``: model inputs -> model outputs, then ``log_prob`` of shape ``(batch,)``;
* ``graph="inverse"``: model outputs -> reconstructed model inputs,

with the noise of the flow handled in one of three ways:

* ``noise="zero"`` (default): deterministic. For the likelihood this is the exact
  log-density of an exact flow (a point evaluation for a bound); the inverse uses the
  conditional means of whatever the forward pass dropped.
* ``noise="input"``: every noise tensor is an extra graph input (``noise_<layer>``) of
  standard-normal draws, so a run is reproducible and comparable with PyTorch.
* ``noise="random"``: the graph draws its noise (``RandomNormalLike``): samples from the
  inverse, single-sample lower bounds from the likelihood.

The batch dimension of every input is dynamic (``batch``). Before tracing, every layer's
:meth:`~flowconvert.core.FlowLayer.prepare_for_export` precomputes what depends only on
the weights, so the graph holds no linear algebra (checked). Verification, on by default:
``onnx.checker`` (full), a run in onnxruntime, and parity with PyTorch at the example batch
and a second batch size (elementwise for ``zero``/``input``; for ``random``, means over many
draws within their standard error). A failed check raises :class:`~flowconvert.ExportError`
naming the output and the difference.

Anything that follows the :class:`~flowconvert.core.Flow` protocol is exported; a single flow
layer is first made a one-layer flow with a standard-normal base density on its output
(:meth:`FlowModel.from_layer <flowconvert.flow.FlowModel.from_layer>`):

>>> import tempfile, os, torch
>>> from flowconvert import FlowLinear
>>> layer = FlowLinear.from_module(torch.nn.Linear(4, 2))
>>> path = os.path.join(tempfile.mkdtemp(), "layer.onnx")
>>> result = export_onnx(layer, path, torch.randn(8, 4))          # doctest: +SKIP
>>> result.input_names, result.output_names                        # doctest: +SKIP
(['x'], ['y', 'log_prob'])
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .core import Flow, FlowLayer
from .errors import ExportError, InputError
from .flow import FlowModel

if TYPE_CHECKING:
    from .verification import ParityCheck

# onnx and onnxruntime are imported by the functions that use them: only an export pays for them.

__all__ = ["export_onnx", "ExportResult", "GRAPHS", "NOISE_MODES"]

GRAPHS = ("likelihood", "inverse")
NOISE_MODES = ("zero", "input", "random")
LOG_PROB = "log_prob"
#: The oldest opset the torch.export-based exporter writes.
MIN_OPSET = 18


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well it matched PyTorch.

    ``input_shapes`` / ``output_shapes`` map each graph input/output name to its shape,
    with ``"batch"`` for the dynamic dimension. ``noise_inputs`` maps the graph inputs that
    carry noise (``noise="input"``) to the flow's layer names. ``max_abs_diff`` maps each
    output to the largest difference between onnxruntime and PyTorch over all checks (of
    means over draws for ``noise="random"``); ``parity`` holds every check.
    """

    path: Path
    graph: str
    noise: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple] = field(default_factory=dict)
    output_shapes: dict[str, tuple] = field(default_factory=dict)
    input_dtypes: dict[str, str] = field(default_factory=dict)
    output_dtypes: dict[str, str] = field(default_factory=dict)
    noise_inputs: dict[str, str] = field(default_factory=dict)
    opset: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    linear_algebra_ops: list[str] = field(default_factory=list)
    initializer_count: int = 0
    parameter_count: int = 0
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    parity: list[ParityCheck] = field(default_factory=list)
    #: ``{op type: node count}`` computed in float32 inside a float64 graph (onnxruntime has
    #: no double kernel for them; see :func:`~flowconvert.verification.fit_runtime`).
    float32_ops: dict[str, int] = field(default_factory=dict)
    report_path: Path | None = None
    model_name: str = ""
    exact: bool = True
    versions: str = ""

    @property
    def verified(self) -> bool:
        """True when parity was checked and every check passed."""
        return bool(self.parity) and all(c.passed for c in self.parity)

    def report(self) -> str:
        """The Markdown export report."""
        from .verification import render_report

        return render_report(self)


class _FlowGraph(nn.Module):
    """The function that gets traced: flat tensors in, flat tensors out."""

    def __init__(self, flow: nn.Module, graph: str, noise: str, n_data: int, noise_shapes: Mapping[str, tuple]):
        super().__init__()
        self.flow = flow
        self.graph = graph
        self.noise = noise
        self.n_data = n_data
        self.noise_keys = list(noise_shapes)
        self.noise_shapes = [tuple(s) for s in noise_shapes.values()]

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        data = args[: self.n_data]
        if self.noise == "zero":
            noise = None
        elif self.noise == "input":
            noise = dict(zip(self.noise_keys, args[self.n_data :]))
        else:
            ref = data[0]
            # randn_like of an expanded zero exports to RandomNormalLike with a dynamic batch
            # (torch.randn with a symbolic size does not)
            noise = {
                key: torch.randn_like(ref.new_zeros(()).expand(ref.shape[0], *shape))
                for key, shape in zip(self.noise_keys, self.noise_shapes)
            }
        if self.graph == "likelihood":
            if noise is None:
                outputs, log_prob = self.flow.forward_with_log_prob(*data, deterministic=True)
            else:
                outputs, log_prob = self.flow.forward_with_log_prob(*data, deterministic=False, noise=noise)
            return (*_as_tuple(outputs), log_prob)
        if noise is None:
            return _as_tuple(self.flow.inverse(*data, sample=False))
        return _as_tuple(self.flow.inverse(*data, sample=True, noise=noise))


def export_onnx(
    flow: Flow | FlowLayer,
    path,
    example_inputs,
    *,
    graph: str = "likelihood",
    noise: str = "zero",
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    second_batch: int | None = None,
    draws: int | None = None,
    seed: int = 0,
    report: bool | str | Path = False,
) -> ExportResult:
    """Export ``flow`` to the ONNX file ``path`` and check it in onnxruntime.

    Args:
        flow: a converted model (``FlowModel``, or anything following :class:`~flowconvert.core.Flow`)
            or a single :class:`~flowconvert.FlowLayer`.
        path: the ``.onnx`` file to write.
        example_inputs: a tensor or a tuple of tensors, *inputs of the model* in both graphs
            (for ``graph="inverse"`` the example outputs are computed from them).
        graph: ``"likelihood"`` or ``"inverse"``.
        noise: ``"zero"``, ``"input"`` or ``"random"`` (see the module docstring).
        opset: ONNX opset (default: the exporter's).
        verify: run the checks (checker, onnxruntime, parity); the linear-algebra scan and the
            checker always run.
        atol, rtol: parity tolerance, elementwise ``atol + rtol * |reference|``.
        second_batch: the second batch size of the parity check (default: example batch + 3).
        draws: draws per example of the statistical check (``noise="random"``; default so
            that about 2048 rows are evaluated, at least 64 draws).
        seed: seed of the noise fed to both runtimes in ``noise="input"`` checks.
        report: write the Markdown export report: ``True`` for ``<path>.md`` next to the
            model, or a path.

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: tracing or translation failed (``FC401``), the graph holds linear
            algebra (``FC402``), the checker rejected it (``FC403``), or onnxruntime
            disagrees with PyTorch (``FC404``; the message names the output and the difference),
            or ``path`` cannot be written (``FC405``). A failed export writes nothing.
        InputError: an ``opset`` below 18, or an empty example batch (``FC604``); example
            inputs that do not fit the flow (``FC601``/``FC602``).

    A float64 flow exports as a float64 graph; the few operators onnxruntime has no double
    kernel for (``Conv``, ``Softplus``, ...) are computed in float32 inside it and listed in
    :attr:`ExportResult.float32_ops`.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise InputError(
            f"opset must be an integer >= {MIN_OPSET} (the torch.export-based exporter writes opset "
            f"{MIN_OPSET} and later), got {opset!r}",
            code="FC604",
        )
    path = Path(path)
    inputs = tuple(t.detach() for t in _as_tuple(example_inputs))
    if not inputs or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in inputs):
        raise ValueError("example_inputs must be a tensor or a tuple of tensors with a batch dimension")
    if inputs[0].shape[0] == 0:
        raise InputError("example_inputs have an empty batch; export needs at least one example", code="FC604")
    model_name = type(flow).__name__
    if isinstance(flow, FlowLayer):
        flow = FlowModel.from_layer(flow, inputs[0].shape[1:])
    if not isinstance(flow, Flow):
        raise TypeError(f"export_onnx needs a flow (flowconvert.core.Flow) or a FlowLayer, got {model_name}")

    with _eval_mode(flow), torch.no_grad():
        outputs = _as_tuple(flow.forward_with_log_prob(*inputs, deterministic=True)[0])
    model_in, model_out = _model_names(flow, len(inputs), len(outputs))
    if graph == "likelihood":
        data, data_names, out_names = inputs, model_in, [*model_out, LOG_PROB]
        shapes = dict(flow.noise_shapes())
    else:
        data, data_names, out_names = outputs, model_out, model_in
        shapes = dict(flow.inverse_noise_shapes())
    noise_names = _noise_input_names(shapes, taken=set(data_names) | set(out_names))

    # Everything is written into a fresh directory next to ``path`` and moved into place
    # only when every check passed: a failed export leaves no file behind.
    with _staging(path) as work:
        # -- capture (the flow itself, prepared in place and restored: no copy of its weights) -
        trace_args = _trace_args(data, shapes if noise == "input" else {})
        graph_in = list(data_names) + (list(noise_names) if noise == "input" else [])
        with _prepared(flow):
            _capture(_FlowGraph(flow, graph, noise, len(data), shapes), trace_args, work, graph_in, out_names, opset)
        from .verification import fit_runtime

        float32_ops = fit_runtime(work)  # loadable in onnxruntime, also with verify=False

        # -- static checks ---------------------------------------------------------------
        from .verification import check_graph

        proto = check_graph(work)
        result = _describe(proto, path, graph, noise, flow, graph_in, out_names)
        result.model_name = model_name
        result.noise_inputs = dict(zip(noise_names, shapes)) if noise == "input" else {}
        result.float32_ops = float32_ops
        if opset is not None and result.opset != opset:
            raise ExportError(f"opset {opset} was requested but the exporter wrote opset {result.opset}", code="FC401")

        # -- parity ----------------------------------------------------------------------
        if verify:
            reference = _FlowGraph(flow, graph, "input" if noise != "zero" else "zero", len(data), shapes)
            with _eval_mode(flow):
                result.parity = _parity(
                    work,
                    reference,
                    data,
                    graph_in,
                    out_names,
                    shapes,
                    noise,
                    atol=atol,
                    rtol=rtol,
                    second_batch=second_batch,
                    draws=draws,
                    seed=seed,
                )
            for c in result.parity:
                if c.statistic in ("values", "mean"):
                    result.max_abs_diff[c.output] = max(result.max_abs_diff.get(c.output, 0.0), c.max_abs_diff)
        failed = [c for c in result.parity if not c.passed]
        if failed:
            error = ExportError(
                f"onnxruntime disagrees with PyTorch on {path.name} ({graph}, noise={noise}): "
                + "; ".join(c.describe() for c in failed)
                + (f" (computed in float32 for lack of double kernels: {float32_ops})" if float32_ops else "")
                + "; nothing was written",
                code="FC404",
            )
            error.result = result
            raise error
    if report:
        result.report_path = path.with_suffix(".md") if report is True else Path(report)
        try:
            result.report_path.parent.mkdir(parents=True, exist_ok=True)
            result.report_path.write_text(result.report())
        except OSError as exc:
            raise ExportError(
                f"cannot write the report {result.report_path}: {exc.strerror or exc}", code="FC405"
            ) from exc
    return result


# -- helpers ---------------------------------------------------------------------------------
def _as_tuple(x) -> tuple:
    if isinstance(x, Tensor):
        return (x,)
    return tuple(x)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _model_names(flow, n_in: int, n_out: int) -> tuple[list[str], list[str]]:
    """Names of the model's inputs and outputs: the flow's own when it has them, else x/y."""

    def pick(attr, n, stem):
        names = getattr(flow, attr, None)
        if isinstance(names, (list, tuple)) and len(names) == n and all(isinstance(s, str) for s in names):
            return [_sanitize(s) for s in names]
        return [stem] if n == 1 else [f"{stem}{i}" for i in range(n)]

    ins, outs = pick("input_names", n_in, "x"), pick("output_names", n_out, "y")
    if set(ins) & set(outs) or LOG_PROB in ins + outs or len(set(ins)) < n_in or len(set(outs)) < n_out:
        ins = ["x"] if n_in == 1 else [f"x{i}" for i in range(n_in)]
        outs = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    return ins, outs


def _sanitize(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _noise_input_names(shapes: Mapping[str, tuple], taken: set[str]) -> list[str]:
    names = []
    for key in shapes:
        base = "noise_" + (_sanitize(key).strip("_") or "layer")
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        names.append(name)
    return names


@contextlib.contextmanager
def _prepared(flow: nn.Module):
    """``flow`` in eval mode with its parameters frozen and every weight-only cache computed
    (:meth:`~flowconvert.core.FlowLayer.prepare_for_export`); all of it restored on exit.

    The flow is traced as it is, so an export holds no second copy of its weights. What a
    preparation may change is put back: each module's buffers (the tensors, their values, which
    ones exist), then its :meth:`~flowconvert.core.FlowLayer.release_export`. The parity check
    that follows thus compares the graph with the flow as the user has it.
    """
    grads = [(p, p.requires_grad) for p in flow.parameters()]
    saved = [
        (
            m,
            dict(m._buffers),
            set(m._non_persistent_buffers_set),
            [(b, b.clone()) for b in m._buffers.values() if b is not None],
        )
        for m in flow.modules()
    ]
    with _eval_mode(flow):
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            with torch.no_grad():
                for m in flow.modules():
                    prepare = getattr(m, "prepare_for_export", None)
                    if callable(prepare):
                        prepare()
            yield flow
        finally:
            with torch.no_grad():
                for m, buffers, non_persistent, values in saved:
                    m._buffers.clear()
                    m._buffers.update(buffers)
                    m._non_persistent_buffers_set.clear()
                    m._non_persistent_buffers_set.update(non_persistent)
                    for tensor, value in values:
                        tensor.copy_(value)
                for m, *_ in saved:
                    release = getattr(m, "release_export", None)
                    if callable(release):
                        release()
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)


def _trace_args(data: tuple[Tensor, ...], noise_shapes: Mapping[str, tuple]) -> tuple[Tensor, ...]:
    """Example arguments for tracing; a batch of 1 is doubled so the batch dimension stays symbolic."""
    if data[0].shape[0] == 1:
        data = tuple(torch.cat([t, t]) for t in data)
    batch = data[0].shape[0]
    ref = data[0]
    noise = tuple(torch.zeros(batch, *shape, dtype=ref.dtype, device=ref.device) for shape in noise_shapes.values())
    return (*data, *noise)


@contextlib.contextmanager
def _staging(path: Path):
    """A scratch directory next to ``path``; on success its files replace ``path`` (and its data files)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}", code="FC405") from exc
    try:
        yield scratch / path.name
        for f in scratch.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _capture(module: nn.Module, args, path: Path, input_names, output_names, opset) -> None:
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = (tuple({0: batch} for _ in args),)
    nbytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                module,
                tuple(args),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
            program.save(str(path), external_data=nbytes > 1_500_000_000)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise ExportError(
            f"could not export {type(module.flow).__name__} ({module.graph}, noise={module.noise}): "
            f"{type(exc).__name__}: {first[0] if first else ''}",
            code="FC401",
        ) from exc


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines and warnings (errors still propagate)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dim(d) -> int | str:
    return d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")


def _describe(proto, path, graph, noise, flow, input_names, output_names) -> ExportResult:
    import onnx
    import onnxruntime

    from .verification import linear_algebra_ops, op_counts

    def info(values):
        shapes, dtypes = {}, {}
        for v in values:
            t = v.type.tensor_type
            shapes[v.name] = tuple(_dim(d) for d in t.shape.dim)
            dtypes[v.name] = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
        return shapes, dtypes

    in_shapes, in_dtypes = info(proto.graph.input)
    out_shapes, out_dtypes = info(proto.graph.output)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    return ExportResult(
        path=path,
        graph=graph,
        noise=noise,
        input_names=[v.name for v in proto.graph.input],
        output_names=[v.name for v in proto.graph.output],
        input_shapes=in_shapes,
        output_shapes=out_shapes,
        input_dtypes=in_dtypes,
        output_dtypes=out_dtypes,
        opset=opset,
        op_counts=op_counts(proto),
        linear_algebra_ops=linear_algebra_ops(proto),
        initializer_count=len(proto.graph.initializer),
        parameter_count=int(sum(np.prod(t.dims, dtype=np.int64) for t in proto.graph.initializer)),
        exact=bool(getattr(flow, "exact", True)),
        versions=f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}",
    )


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # verification batches are small; no thread spin-up
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _parity(path, reference, data, input_names, output_names, shapes, noise, *, atol, rtol, second_batch, draws, seed):
    from .verification import compare_exact, compare_statistical

    session = _session(path)
    gen = torch.Generator().manual_seed(seed)
    batch = data[0].shape[0]
    ref = data[0]

    def draw(n):
        return tuple(torch.randn((n, *s), generator=gen, dtype=torch.float64).to(ref.dtype) for s in shapes.values())

    def rows(n):
        idx = torch.arange(n) % batch
        idx = idx[torch.randperm(n, generator=gen)]
        return tuple(t[idx] for t in data)

    checks: list[ParityCheck] = []
    if noise == "random":
        r = draws or max(64, -(-2048 // batch))
        tiled = tuple(t.repeat(r, *([1] * (t.dim() - 1))) for t in data)
        feeds = dict(zip(input_names, map(_numpy, tiled)))
        got = session.run(output_names, feeds)
        with torch.no_grad():
            expected = [_numpy(t) for t in reference(*tiled, *draw(r * batch))]
        return compare_statistical(output_names, got, expected, draws=r, atol=atol, rtol=rtol)

    b2 = second_batch or batch + 3
    for args in (data, rows(b2)):
        n = args[0].shape[0]
        eps = draw(n) if noise == "input" else ()
        feeds = dict(zip(input_names, map(_numpy, (*args, *eps))))
        got = session.run(output_names, feeds)
        with torch.no_grad():
            expected = [_numpy(t) for t in reference(*args, *eps)]
        checks += compare_exact(output_names, got, expected, batch=n, atol=atol, rtol=rtol)
    return checks
