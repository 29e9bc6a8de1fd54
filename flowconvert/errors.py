"""Exceptions and the catalogue of diagnostic codes.

Every problem flowconvert can report has a stable code (``FC101``...), a one-line title,
an explanation of *why* it prevents a normalizing flow, and a hint saying what to do.
The catalogue :data:`DIAGNOSTICS` is the single source of those texts; the report,
the exceptions and the documentation all read from it.

Code ranges:

* ``FC1xx``: operations that are not invertible or not supported as flow layers.
* ``FC2xx``: supported layers whose parameters or configuration rule out a flow.
* ``FC3xx``: graph structure and tracing (fan-out, merges, control flow).
* ``FC4xx``: export and verification.

>>> DIAGNOSTICS["FC201"].title
'weight matrix is (numerically) singular'
>>> issubclass(ConversionError, FlowConversionError)
True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Diagnostic",
    "DIAGNOSTICS",
    "register_diagnostic",
    "FlowConversionError",
    "LayerConfigurationError",
    "SingularWeightError",
    "ConversionError",
    "TracingError",
    "ExportError",
]


@dataclass(frozen=True)
class Diagnostic:
    """A stable diagnostic: ``code``, short ``title``, ``explanation`` (why), ``hint`` (what to do)."""

    code: str
    title: str
    explanation: str
    hint: str


DIAGNOSTICS: dict[str, Diagnostic] = {}


def register_diagnostic(code: str, title: str, explanation: str, hint: str) -> Diagnostic:
    """Add a code to the catalogue; codes are unique and never reused."""
    if code in DIAGNOSTICS:
        raise ValueError(f"diagnostic code {code} is already registered")
    diag = Diagnostic(code, title, explanation, hint)
    DIAGNOSTICS[code] = diag
    return diag


# Layer-level problems (raised by the flowified layers themselves).
register_diagnostic(
    "FC201",
    "weight matrix is (numerically) singular",
    "A linear map with a vanishing singular value collapses a direction of its input onto "
    "a point, so the change-of-variables log|det| is -infinity and the map has no inverse.",
    "Check the layer for dead (all-zero) rows or columns; prune the dead units, or add a "
    "small multiple of a random full-rank matrix to the weight and fine-tune.",
)
register_diagnostic(
    "FC202",
    "LeakyReLU slope is not positive",
    "With a slope of zero or below, LeakyReLU maps different inputs to the same output "
    "(slope 0 is ReLU), so it has no inverse and no finite log-derivative.",
    "Use nn.LeakyReLU(negative_slope=0.01) (any slope > 0) and fine-tune.",
)
register_diagnostic(
    "FC203",
    "convolution configuration is not supported",
    "Only zero-padded convolutions are flowified; circular, reflect and replicate padding "
    "copy input values into the padding, which this construction does not model.",
    "Use padding_mode='zeros', or convert the padding to an explicit F.pad with zeros.",
)

# Export and verification (raised by flowconvert.export_onnx).
register_diagnostic(
    "FC401",
    "the model could not be exported to ONNX",
    "torch.export could not trace the flow's likelihood or inverse pass, or an operation it "
    "traced has no ONNX translation, so no graph could be written.",
    "Run the flow once in eager mode to check it works; data-dependent Python control flow "
    "and calls outside torch must be removed from the flow layers before export.",
)
register_diagnostic(
    "FC402",
    "the exported graph contains a linear-algebra operation",
    "Decompositions and solves (SVD, solve, det, inverse, matrix_exp) depend only on the "
    "weights; in the graph they are slow, and most have no ONNX or onnxruntime kernel.",
    "Precompute the weight-only tensor in the layer's prepare_for_export() and read it "
    "from a buffer in call_and_ll/inverse.",
)
register_diagnostic(
    "FC403",
    "the exported file fails the ONNX checker",
    "onnx.checker (full check, with shape inference) rejected the model, so runtimes may "
    "refuse to load it or compute something else.",
    "Try another opset (opset=...), and report the checker message with the model.",
)
register_diagnostic(
    "FC404",
    "onnxruntime and PyTorch disagree on the exported graph",
    "Running the exported graph in onnxruntime on the example inputs (same noise) gave "
    "outputs that differ from the PyTorch flow by more than the tolerance.",
    "Check the named output first; export in float64, or raise atol/rtol if the "
    "difference is rounding in a large model.",
)


class FlowConversionError(Exception):
    """Base class of every flowconvert error.

    ``code`` names an entry of :data:`DIAGNOSTICS` (or is ``None``); ``location`` is the
    user's ``file:line`` when known.
    """

    def __init__(self, message: str, *, code: str | None = None, location: str | None = None):
        self.code = code
        self.location = location
        self.message = message
        super().__init__(self._format())

    @property
    def diagnostic(self) -> Diagnostic | None:
        return DIAGNOSTICS.get(self.code) if self.code else None

    def _format(self) -> str:
        head = f"[{self.code}] " if self.code else ""
        text = head + self.message
        if self.location:
            text += f"\n  at {self.location}"
        diag = self.diagnostic
        if diag is not None:
            text += f"\n  why: {diag.explanation}\n  hint: {diag.hint}"
        return text


class LayerConfigurationError(FlowConversionError, ValueError):
    """A layer's parameters or configuration cannot be flowified (``FC2xx``)."""


class SingularWeightError(LayerConfigurationError):
    """A weight matrix has a singular value at or below the tolerance (``FC201``)."""


class TracingError(FlowConversionError):
    """torch.fx could not trace the model (data-dependent control flow, untraceable calls)."""


class ConversionError(FlowConversionError):
    """The model cannot be converted; ``.report`` holds the full audit report."""

    def __init__(self, message: str, *, report=None, code: str | None = None, location: str | None = None):
        self.report = report
        super().__init__(message, code=code, location=location)


class ExportError(FlowConversionError):
    """ONNX export or its verification failed (``FC4xx``)."""
