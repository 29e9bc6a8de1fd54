r"""``audit`` and ``convert``: a thin orchestration of the conversion passes over the fx graph.

1. **capture** (:func:`flowconvert.tracing.capture`): trace a copy of the model, one
   :class:`~flowconvert.tracing.NodeRecord` per node in ``node.meta["flowconvert"]``;
2. **legalize** (:func:`flowconvert.analysis.legalize`): explicit fan-out nodes, split pieces
   bound, unused values and non-data outputs reported;
3. **lower** (:func:`flowconvert.lowering.lower`): every data node through the rule registry
   (``audit`` calls the rules' cheap checks and builds no heavy layer);
4. **report** (:func:`flowconvert.reporting.report`): the :class:`~flowconvert.report.Report`,
   a pure function of the lowered graph (``audit`` stops here);
5. **assemble** (:func:`flowconvert.assembly.assemble`): the :class:`~flowconvert.flow.FlowPlan`
   and the :class:`~flowconvert.flow.FlowModel`.

>>> import torch, flowconvert as fc
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
>>> report = fc.audit(net, torch.randn(1, 3))
>>> report.convertible, report.counts
(False, {'FC101': 1})
>>> try:
...     fc.convert(net, torch.randn(1, 3))
... except fc.ConversionError as err:
...     print(err.code, err.report is not None)
FC101 True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .analysis import legalize
from .assembly import assemble
from .deviation import measure_deviations
from .errors import ConversionError, FlowConversionWarning, TracingError
from .flow import FlowModel
from .lowering import lower
from .registry import REGISTRY, Registry, resolve_substitutions
from .report import Report
from .reporting import density_parameters, note_approximate_inverses, trace_failure_report
from .reporting import report as build_report
from .tracing import ExampleInputError, as_input_tuple, capture, record

__all__ = ["audit", "convert", "audit_and_convert", "Options"]


@dataclass(frozen=True)
class Options:
    """The options of :func:`audit` and :func:`convert` (keywords of both), validated.

    Attributes:
        base: base density of each output as built: ``"diagonal"`` (learnable diagonal Gaussian,
            the default, as in :func:`convert`) or ``"standard"`` (standard normal); any
            ``"base:<name>"`` structure rule of the registry.
        registry: the rules to convert with (default :data:`~flowconvert.registry.REGISTRY`).
        relu: ``None`` refuses ReLU (FC101) and the saturating ReLU family (FC106);
            ``"leaky"`` substitutes ``LeakyReLU(negative_slope)`` for ReLU and a leaky clamp
            (:class:`~flowconvert.activations.FlowLeakyClamp`) for ReLU6, Hardtanh,
            Hardsigmoid and constant-bound ``torch.clamp`` (the flow then computes a slightly
            different function; the report gives each substituted node's own output deviation,
            the accumulated one there, and the largest output deviation, on the example inputs).
        negative_slope: the slope of the substitutes.
        substitute: further substitutions by family (:data:`~flowconvert.registry.SUBSTITUTIONS`):
            ``{"gelu": "leaky"}`` (also ``"silu"``, ``"hardswish"``, ``"mish"``: never implied by
            ``relu``), or ``{"relu6": None}`` to keep a family refused.
    """

    base: str = "diagonal"
    registry: Registry = field(default_factory=lambda: REGISTRY)
    relu: str | None = None
    negative_slope: float = 0.01
    substitute: dict[str, str | None] | None = None

    def __post_init__(self) -> None:
        if self.base not in self.registry.bases:
            raise ValueError(f"base must be one of {sorted(self.registry.bases)}, got {self.base!r}")
        resolve_substitutions(self.relu, self.substitute)  # validates relu and substitute

    @property
    def rule_options(self) -> dict[str, Any]:
        """What the rules see as ``ctx.options``."""
        chosen = resolve_substitutions(self.relu, self.substitute)
        if not chosen:
            return {}
        return {"relu": self.relu, "substitute": chosen, "negative_slope": float(self.negative_slope)}


def audit(model: nn.Module, example_inputs: Any, **options: Any) -> Report:
    """Trace ``model`` on ``example_inputs`` and report, node by node, what can be flowified.

    ``options`` are those of :class:`Options` (``base``, ``registry``, ``relu``, ``negative_slope``,
    ``substitute``).
    Runs capture, legalize, lower (cheap checks: no weight is factorized) and report. Never
    raises for unsupported nodes or untraceable code (they are problems in the report);
    raises :class:`~flowconvert.tracing.ExampleInputError` when the model fails on the example
    inputs. The model is not modified.
    """
    return _run(model, example_inputs, Options(**options), build=False)[0]


def convert(model: nn.Module, example_inputs: Any, *, density: Any = "gaussian", **options: Any) -> FlowModel:
    """Convert ``model`` into a :class:`~flowconvert.flow.FlowModel`.

    ``density`` is the family of the densities of dropped coordinates (:mod:`flowconvert.families`):
    ``"gaussian"`` (linear-Gaussian, closed-form calibration: a full covariance with a calibrated
    kink for the dropped inputs of a linear layer up to 256 of them, the fused diagonal fast path
    elsewhere), ``"mlp"``, ``"flow"`` (zuko conditional splines) or a callable
    ``(features, context) -> ConditionalDensity``.
    ``base`` is the base density of each output: ``"standard"``, ``"diagonal"`` (learnable),
    ``"full"`` (learnable full covariance), ``"gaussian"`` (full up to 256 coordinates, diagonal
    beyond), ``"mixture"`` (a Gaussian mixture that calibration keeps as one Gaussian unless EM's mixture
    scores better held out), ``"flow"`` or a callable ``event_shape -> BaseDensity``; by default the
    family's (``"auto"`` for ``"gaussian"``: ``"mixture"`` up to 64 coordinates, ``"gaussian"``
    beyond; ``"mixture"`` for ``"mlp"``). The other ``options`` are those of
    :class:`Options`: ``registry``, ``relu="leaky"`` with ``negative_slope`` (substitutes
    LeakyReLU for every ReLU and a leaky clamp for ReLU6, Hardtanh, Hardsigmoid and clamps;
    refused by default, FC101/FC106), ``substitute={"gelu": "leaky", ...}`` for the
    non-monotone families (FC102). Raises
    :class:`~flowconvert.errors.ConversionError` (with the full report as ``.report``) when any
    node blocks the conversion. ``flow.report`` is the report.
    """
    from .families import resolve_base, use_densities

    base = resolve_base(density, options.pop("base", None))
    built = base if isinstance(base, str) and base in ("standard", "diagonal") else "diagonal"
    report, flow = audit_and_convert(model, example_inputs, base=built, **options)
    if flow is None:
        raise _conversion_error(report)
    use_densities(flow, density, base)  # the family's conditionals and bases replace the built ones
    report.base = base if isinstance(base, str) else getattr(base, "__name__", type(base).__name__)
    report.density = density if isinstance(density, str) else getattr(density, "__name__", type(density).__name__)
    report.density_parameters = density_parameters([*flow.layers.values(), *flow.bases.values()])
    return flow


def audit_and_convert(model: nn.Module, example_inputs: Any, **options: Any) -> tuple[Report, FlowModel | None]:
    """The report, and the flow model when the model is convertible (else ``None``)."""
    return _run(model, example_inputs, Options(**options), build=True)


def _run(model: nn.Module, example_inputs: Any, options: Options, *, build: bool) -> tuple[Report, FlowModel | None]:
    """The passes in order; ``build=False`` stops after the report."""
    inputs = as_input_tuple(example_inputs)
    name = type(model).__name__
    in_shapes = [tuple(t.shape[1:]) for t in inputs]
    try:
        cap = capture(model, inputs, leaf_types=options.registry.leaf_types)
    except ExampleInputError:
        raise
    except TracingError as err:
        return trace_failure_report(name, err, in_shapes, options.base), None
    graph, modules = cap.graph, dict(cap.module.named_modules())
    legalize(graph)
    lower(
        graph, modules, options.registry, batch=cap.batch, options=options.rule_options, base=options.base, build=build
    )
    report = build_report(graph, modules, name, input_shapes=in_shapes, base=options.base)
    if not build or not report.convertible:
        return report, None
    flow = assemble(graph, device=inputs[0].device)
    if report.substitutions:
        report.max_output_deviation = _max_deviation(cap.module, flow, inputs)
        substituted = {n.name: record(n).layer for n in graph.nodes if record(n).substitution is not None}
        deviations = measure_deviations(cap.module, inputs, substituted)
        for entry in report.substitutions:
            entry.deviation, entry.accumulated_deviation = deviations[entry.name]
    flow.report = report
    note_approximate_inverses(report, flow)
    _check_modes(cap, modules)
    _check_inverse(flow, inputs, negative_slope=options.negative_slope if report.substitutions else None)
    return report, flow


def _max_deviation(gm: fx.GraphModule, flow: FlowModel, inputs: tuple[torch.Tensor, ...]) -> float:
    """Largest |flow output - original output| over the example inputs."""
    gm.recompile()  # the graph now holds the explicit fan-out nodes
    with torch.no_grad():
        expected, got = _flat(gm(*inputs)), _flat(flow(*inputs))
    return max(((a.double() - b.double()).abs().max().item() for a, b in zip(expected, got) if a.numel()), default=0.0)


#: Modules whose function depends on the training mode (the flow follows eval mode).
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def _check_modes(cap, modules: dict[str, nn.Module]) -> None:
    """Warn when the model was in training mode and has modules that act differently in eval mode."""
    changed = sorted(n for n in cap.training if isinstance(modules.get(n), _MODE_DEPENDENT))
    if changed:
        shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        warnings.warn(
            f"{cap.model_name} is in training mode; the flow follows its eval-mode function ({shown} act "
            "differently in training mode). Call model.eval() before converting to silence this.",
            FlowConversionWarning,
            stacklevel=5,
        )


#: :func:`convert` warns when ``flow.inverse(flow(x))`` grows past this many times the largest ``|x|``.
INVERSE_GROWTH_LIMIT = 1e6


def _check_inverse(
    flow: FlowModel, inputs: tuple[torch.Tensor, ...], tolerance: float = 1e-3, negative_slope: float | None = None
) -> None:
    """Warn when the inverse misses on the example inputs (ill-conditioned compositions).

    Every flow: ``flow.inverse(flow(x))`` must be finite and within :data:`INVERSE_GROWTH_LIMIT`
    times the inputs' scale (a bound's inverse is not ``x``, but it is data-like). Exact flows
    also keep their stated direction: a bijection (no layer models anything) gives back its
    inputs, otherwise ``flow(flow.inverse(y)) == y`` is checked.
    """
    bijective = not flow.noise_shapes() and not flow.inverse_noise_shapes()  # nothing dropped, nothing added
    try:
        with torch.no_grad():
            y = _flat(flow(*inputs))
            back = flow.inverse(*y, sample=False)
            back = back if isinstance(back, tuple) else (back,)
            finite = all(torch.isfinite(b).all() for b in back)
            scale = max((a.abs().max().item() for a in inputs if a.numel()), default=0.0)
            peak = max((b.abs().max().item() for b in back if b.numel()), default=0.0) if finite else math.inf
            if not finite or peak > INVERSE_GROWTH_LIMIT * max(scale, 1.0):
                warnings.warn(
                    _amplification_message(flow, inputs[0].dtype, finite, peak, scale, negative_slope),
                    FlowConversionWarning,
                    stacklevel=5,
                )
                return
            if not (flow.exact and flow.exact_inverse):
                return  # bound layers promise no round trip; range-limited activations are marked already
            pairs = zip(inputs, back) if bijective else zip(y, _flat(flow(*back)))
            pairs = list(pairs)
    except Exception:  # noqa: BLE001 - a diagnostic must not break a conversion
        return
    worst = 0.0
    for a, b in pairs:
        if a.numel():
            scale = a.double().abs().max().item() + torch.finfo(a.dtype).tiny
            worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    if not worst <= tolerance:  # also catches NaN
        warnings.warn(
            f"the inverse of this flow is numerically unreliable: "
            f"{'flow.inverse(flow(x)) differs from x' if bijective else 'flow(flow.inverse(y)) differs from y'} by "
            f"{worst:.2g} (relative) on the example inputs; the composed maps are ill-conditioned for "
            f"{inputs[0].dtype} (convert the model in float64, or check for nearly singular layers)",
            FlowConversionWarning,
            stacklevel=5,
        )


def _amplification_message(
    flow: FlowModel, dtype: torch.dtype, finite: bool, peak: float, scale: float, slope: float | None
) -> str:
    """What :func:`_check_inverse` says when the inverse overflows or grows far beyond the inputs."""
    if finite:
        head = (
            f"the inverse of this flow amplifies: flow.inverse(flow(x)) reaches {peak:.2g} on example inputs "
            f"within {scale:.2g}, so inverses and samples of this flow are not data-like."
        )
    else:
        head = f"the inverse of this flow overflows {dtype}: flow.inverse(flow(x)) is not finite on the example inputs."
    report = getattr(flow, "report", None)
    n = len(report.substitutions) if report is not None else 0
    subs = ""
    if n and slope:
        subs = (
            f" This flow has {n} substituted activation{'s' * (n != 1)} of slope {slope:g}: "
            f"each divides negative values by {1 / slope:g} in the inverse (up to {1 / slope:g}^{n} in all)."
        )
    return (
        head + " Each layer's inverse amplifies what its forward contracted (a nearly singular weight by its "
        "condition number, a LeakyReLU substitute with slope s by 1/s), and deep compositions multiply these "
        f"factors; log_prob is unaffected.{subs} float64 widens the range, not the precision: past about 1e7 "
        "(float32) or 1e15 (float64) of amplification the inverse no longer reproduces its outputs. Substitute "
        "with a larger negative_slope (convert(..., negative_slope=...)), or invert a shallower part of the model"
    )


def _flat(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(out, lambda a: found.append(a) if isinstance(a, torch.Tensor) else None)
    return found


def _conversion_error(report: Report) -> ConversionError:
    problems = report.problems
    first = problems[0][1]
    lines = [f"cannot convert {report.model}: {len(problems)} problem{'s' * (len(problems) != 1)} (see .report)"]
    lines += [f"  [{p.code}] {n.name}: {p.message}" + (f" ({p.location})" if p.location else "") for n, p in problems]
    return ConversionError("\n".join(lines), report=report, code=first.code, location=first.location)
