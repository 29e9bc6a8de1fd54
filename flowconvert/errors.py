"""Exceptions and the catalogue of diagnostic codes.

Every problem flowconvert can report has a stable code (``FC101``...), a one-line title,
an explanation of *why* it prevents a normalizing flow, and a hint saying what to do.
The catalogue :data:`DIAGNOSTICS` is the single source of those texts, all declared in this
module; the report, the exceptions and the documentation all read from it.

Code ranges:

* ``FC1xx``: operations that are not invertible or not supported as flow layers.
* ``FC2xx``: supported layers whose parameters or configuration rule out a flow.
* ``FC3xx``: graph structure and tracing (fan-out, merges, control flow).
* ``FC4xx``: export and verification.
* ``FC5xx``: saved flow files (:func:`flowconvert.save` / :func:`flowconvert.load`).
* ``FC6xx``: data and arguments given to a flow (shapes, dtypes, non-finite values).

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
    "FileFormatError",
    "InputError",
    "FlowConversionWarning",
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
    "A linear map whose weight has no invertible square block (rank below min(m, n)) collapses "
    "a direction of its input onto a point: log|det| is -infinity and the map has no inverse. "
    "A block that is invertible but has a condition number above 1/rtol has a finite log|det|, "
    "but its inverse would be dominated by rounding; it is refused too (the message says which case).",
    "Singular: check the layer for dead (all-zero) rows or columns; prune the dead units, or add "
    "a small multiple of a random full-rank matrix to the weight and fine-tune. Ill-conditioned: "
    "build the layer with a smaller rtol (FlowLinear(..., rtol=...), FlowConv(..., rtol=...)) "
    "if an inaccurate inverse is acceptable.",
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

register_diagnostic(
    "FC210",
    "BatchNorm has a zero scale",
    "In eval mode BatchNorm is the per-channel affine map x -> a x + b with "
    "a = weight / sqrt(running_var + eps). A channel with a = 0 maps every input to the same "
    "value: the map has no inverse and log|a| = -infinity.",
    "Remove the dead channel (and the weights that read it), or set its BatchNorm weight to a "
    "small non-zero value and fine-tune.",
)
register_diagnostic(
    "FC211",
    "BatchNorm is in training mode or keeps no running statistics",
    "In training mode (or with track_running_stats=False) BatchNorm normalizes with the "
    "statistics of the current batch, so each sample's output depends on the other samples; "
    "there is no per-sample map to invert.",
    "Call model.eval() before converting; a BatchNorm built with track_running_stats=False "
    "needs running statistics (re-create it with tracking on and run a few batches).",
)
register_diagnostic(
    "FC212",
    "activation parameter makes the map non-invertible",
    "ELU needs alpha > 0 and PReLU needs every slope > 0: otherwise the negative half of the "
    "input is mapped to a constant or folded back onto the positive half, so the activation "
    "is not injective.",
    "Use a positive alpha / slope (e.g. clamp PReLU weights to >= 0.01) and fine-tune.",
)
register_diagnostic(
    "FC213",
    "multiplication or division by zero (or a non-finite constant)",
    "x * 0 maps every input to 0, so it has no inverse and log|det| = -infinity; a non-finite "
    "constant gives no finite output at all.",
    "Remove the operation, or use a non-zero constant.",
)
register_diagnostic(
    "FC214",
    "pooling configuration is not supported",
    "Max and average pooling are flowified for any kernel, stride, padding, dilation (max), "
    "ceil_mode and adaptive output size, but this configuration asks for something without a "
    "flow version: indices returned beside the values (return_indices=True), dilation in an "
    "average pool, a window with no input cell, or an input of more than two spatial dimensions.",
    "Use return_indices=False (the indices are not a function a flow can invert), or pool a "
    "(C, L) or (C, H, W) input with windows that each contain at least one input cell.",
)
register_diagnostic(
    "FC215",
    "concatenation or split along the batch dimension",
    "Concatenating or splitting along dimension 0 moves values between samples, so one "
    "sample's output would depend on the others and there is no per-sample density.",
    "Concatenate or split along a feature dimension (dim >= 1).",
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
    "Check the named output first. A difference of about 1e-6 times the output's size is "
    "float32 rounding: raise atol/rtol, or export a float64 flow (flow.double() with float64 "
    "example inputs; the ops onnxruntime lacks double kernels for run in float32 and are "
    "listed in ExportResult.float32_ops). A larger difference is a wrongly exported "
    "operation: report it with the model.",
)
register_diagnostic(
    "FC405",
    "the output file cannot be written",
    "The path of the exported model (or of its report) is not a writable file: a parent is "
    "not a directory, the directory is read-only, or the path is a directory.",
    "Pass a path in a writable directory, e.g. out/model.onnx.",
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
    """A weight matrix is singular, or its kept block is ill-conditioned beyond ``1 / rtol`` (``FC201``)."""


class TracingError(FlowConversionError):
    """torch.fx could not trace the model (data-dependent control flow, untraceable calls)."""


class ConversionError(FlowConversionError):
    """The model cannot be converted; ``.report`` holds the full audit report."""

    def __init__(self, message: str, *, report=None, code: str | None = None, location: str | None = None):
        self.report = report
        super().__init__(message, code=code, location=location)

    def _format(self) -> str:
        # the message lists every problem with its code and location; add only the first one's why and hint
        diag = self.diagnostic
        return self.message + (f"\n  why: {diag.explanation}\n  hint: {diag.hint}" if diag is not None else "")


class ExportError(FlowConversionError):
    """ONNX export or its verification failed (``FC4xx``)."""


class FlowConversionWarning(UserWarning):
    """Something about a conversion the user should know: the result works, but not as they may assume."""


class FileFormatError(FlowConversionError, ValueError):
    """A flow file cannot be written or read (``FC5xx``); pickled files are refused, never loaded."""


class InputError(FlowConversionError, ValueError):
    """Data or an argument given to a flow does not fit it (``FC6xx``): the message says what was expected."""


# Saved flow files (flowconvert.save / flowconvert.load).
register_diagnostic(
    "FC501",
    "not a flowconvert flow file",
    "flowconvert.load reads the files flowconvert.save writes: safetensors tensors with a "
    "versioned JSON description of the flow. This file is not one (a state dict in "
    "safetensors, another format, or a truncated file).",
    "Save the flow with flowconvert.save(flow, path) or 'flowconvert convert -o FILE'; a "
    "state dict of the original model goes to --weights instead.",
)
register_diagnostic(
    "FC502",
    "pickled file refused",
    "The file is a pickle (torch.save or pickle.dump). Unpickling runs whatever code the "
    "file names, so a crafted file can take over the machine; flowconvert never unpickles.",
    "Convert the model again and save the flow with flowconvert.save (or 'flowconvert convert "
    "-o FILE'); for the model's weights, save model.state_dict() and pass it with --weights "
    "(read with torch.load(weights_only=True)).",
)
register_diagnostic(
    "FC503",
    "unknown flow file version",
    "The file was written by a flowconvert with a newer (or unknown) file format version, "
    "whose description this flowconvert cannot read safely.",
    "Upgrade flowconvert, or save the flow again with this version.",
)
register_diagnostic(
    "FC504",
    "flow file does not describe a loadable flow",
    "The description names a class that is not a flowconvert layer or density (only "
    "recorded flowconvert classes are built), or its tensors do not fit the layers it "
    "describes (a damaged or edited file, or one written by a flowconvert whose layers differ: "
    "the message names the version that wrote it).",
    "Save the flow again with flowconvert.save; for layers of your own, pass their classes "
    "with flowconvert.load(path, classes=[MyLayer]).",
)
register_diagnostic(
    "FC505",
    "flow cannot be saved",
    "flowconvert.save writes a flow as data: each layer's constructor arguments as JSON and "
    "its tensors in safetensors. A layer or density part has an argument that is not data "
    "(a function, an arbitrary object) or is not a flowconvert class.",
    "Use flowconvert layers and density families (derived from FlowLayer, ConditionalDensity, "
    "BaseDensity), whose constructors take numbers, strings, shapes, tensors and modules.",
)

# Data and arguments given to a flow.
register_diagnostic(
    "FC601",
    "input shape does not fit the flow",
    "A flow is built for the per-sample shapes of the example inputs it was converted with; "
    "another shape would run some layers on a different layout than the density assumes "
    "and give a meaningless log-density.",
    "Pass a batch of shape (batch, *shape) with the shape the message names (see "
    "flow.input_shapes / flow.output_shapes), e.g. x.reshape(len(x), *flow.input_shapes[0]).",
)
register_diagnostic(
    "FC602",
    "input dtype does not fit the flow",
    "The flow's parameters have one floating-point dtype; data of another dtype (integers, "
    "a different precision) would fail inside a layer or silently lose precision.",
    "Convert the data with x.to(dtype) to the dtype the message names, or the flow with flow.to(dtype).",
)
register_diagnostic(
    "FC603",
    "data contains NaN or infinite values",
    "A non-finite value makes every log-density and every fitted statistic it touches "
    "non-finite (or breaks the linear algebra of calibration), so it is refused rather "
    "than silently spreading.",
    "Remove or impute the rows with NaN/Inf (e.g. data[torch.isfinite(data).flatten(1).all(1)]).",
)
register_diagnostic(
    "FC604",
    "invalid argument",
    "An argument is outside the values the function accepts (a negative count, an empty "
    "data set where data are needed, an unknown option).",
    "Pass a value in the range the message names.",
)


# Operations that are not invertible or have no flow layer (reported by the audit).
register_diagnostic(
    "FC101",
    "ReLU is not invertible",
    "ReLU maps all negative inputs to 0, so it has no inverse: many inputs give the same "
    "output and the change of log-density is -infinity there.",
    "Replace nn.ReLU with nn.LeakyReLU(negative_slope=0.01) and fine-tune, or convert with "
    'relu="leaky" (--relu leaky on the command line) to substitute LeakyReLU as is; the report '
    "then gives each substituted node's output deviation and the largest one at the outputs.",
)
register_diagnostic(
    "FC102",
    "GELU/SiLU-type activation is not monotone",
    "GELU, SiLU and Mish dip below zero for negative inputs and come back up, so two "
    "different inputs give the same output; they have no inverse.",
    "Replace the activation with nn.LeakyReLU(negative_slope=0.01) (strictly increasing) and "
    'fine-tune, or name the substitution explicitly: convert(..., substitute={"gelu": "leaky"}) '
    '(also "silu", "hardswish", "mish"); the report then gives each node\'s output deviation.',
)
register_diagnostic(
    "FC103",
    "per-sample normalization is not invertible",
    "LayerNorm, GroupNorm and InstanceNorm subtract each sample's mean and divide by its "
    "spread, so inputs that differ only by a shift or a scale give the same output; the "
    "lost mean and scale are not modelled.",
    "Remove the normalization (or use BatchNorm, which is affine in eval mode, folded into "
    "the preceding layer) and fine-tune.",
)
register_diagnostic(
    "FC104",
    "softmax is not invertible",
    "Softmax does not change when the same constant is added to all its inputs, so it has "
    "no inverse (its outputs also sum to one: one dimension is lost).",
    "Convert the network up to the logits: remove the final Softmax/LogSoftmax from the "
    "module and apply it outside the flow.",
)
register_diagnostic(
    "FC105",
    "pooling is not supported",
    "LP pooling and 3-D pooling have no flow layer: LP pooling mixes a window's values "
    "non-linearly, and 3-D windows are not implemented. (Max, average and adaptive pooling in "
    "1-D and 2-D are supported with any kernel, stride, padding and ceil_mode.)",
    "Use nn.MaxPool2d / nn.AvgPool2d / nn.AdaptiveAvgPool2d (1-D or 2-D), fold a 3-D input into "
    "2-D, or replace the pooling by a strided convolution.",
)
register_diagnostic(
    "FC106",
    "saturating activation is not invertible",
    "ReLU6, Hardtanh, Hardsigmoid, Threshold and clamp map whole ranges of inputs to the "
    "same boundary value, so they have no inverse.",
    'convert(..., relu="leaky") (--relu leaky on the command line) substitutes a leaky clamp '
    "(slope negative_slope outside the bounds) for ReLU6, Hardtanh, Hardsigmoid and torch.clamp "
    "with constant bounds, and reports each node's output deviation; otherwise replace the "
    "activation with nn.LeakyReLU(negative_slope=0.01) and fine-tune.",
)
register_diagnostic(
    "FC107",
    "invertible activation without a flow layer yet",
    "This activation is strictly monotone, hence invertible in principle, but flowconvert "
    "has no flowified version of it yet.",
    "Replace it with nn.LeakyReLU(negative_slope=0.01) and fine-tune, or add a rule to "
    "flowconvert.registry that builds a FlowLayer for it.",
)
register_diagnostic(
    "FC109",
    "reduction without a flow layer",
    "This reduction (std, var, norm, prod, logsumexp, median, max/min with indices, amin, "
    "argmax) maps many inputs to one value in a way that has no flow layer: nothing models "
    "what it discards.",
    "Global pooling converts when written as x.mean(dims), x.sum(dims) or x.amax(dims) over "
    "non-batch dimensions (e.g. x.mean((2, 3)) or x.mean(1) over tokens), as "
    "nn.AdaptiveAvgPool2d(1) / nn.AdaptiveMaxPool2d(1), or as F.adaptive_avg_pool2d(x, 1); "
    "use x.amax(dim) instead of x.max(dim) (which also returns indices).",
)
register_diagnostic(
    "FC130",
    "in-place operation",
    "An in-place tensor method overwrites its argument; when that is a model input or a value "
    "read elsewhere, the traced graph no longer describes one function of the input, and the "
    "flow cannot recover the overwritten value.",
    "Write the operation out of place (x = x + 1 instead of x.add_(1), torch.relu(x) instead "
    "of x.relu_()); nn.ReLU(inplace=True) and similar modules are fine.",
)
register_diagnostic(
    "FC131",
    "attention or product of data values",
    "Attention and other products of two values computed from the input (x * y, x @ y, "
    "bilinear layers) are not injective in general and have no flow layer.",
    "Convert the part of the network before the attention block, or replace the product by "
    "layers with a flow version (linear maps, invertible activations, sums).",
)
register_diagnostic(
    "FC132",
    "indexing that drops data",
    "Selecting part of a value (x[:, 0], x[..., :k], narrow, index_select, gather) discards "
    "the rest without modelling it, so the flow would lose those coordinates.",
    "Use torch.split / torch.chunk and consume every piece (each piece then goes on through "
    "the flow), or a learned reducing layer such as nn.Linear.",
)
register_diagnostic(
    "FC110",
    "unsupported module",
    "flowconvert has no conversion rule for this module type, so it cannot tell whether it "
    "is invertible or what its likelihood contribution is.",
    "Rewrite it with supported layers (docs/supported.md: Linear, Conv1d/Conv2d, BatchNorm, "
    "LeakyReLU, ELU, Tanh, Sigmoid, Softplus, PReLU, tiling max/average pooling, Flatten, "
    "Identity, Dropout), or declare a rule with flowconvert.registry.REGISTRY.rule(modules=[...]).",
)
register_diagnostic(
    "FC111",
    "unsupported function",
    "flowconvert has no conversion rule for this function, so it cannot tell whether it is "
    "invertible or what its likelihood contribution is.",
    "Use a supported spelling (docs/supported.md: F.linear, F.conv1d/conv2d, F.leaky_relu, "
    "torch.flatten, torch.cat, torch.split, ...), or declare a rule with "
    "flowconvert.registry.REGISTRY.rule(functions=[...]).",
)
register_diagnostic(
    "FC112",
    "unsupported tensor method",
    "flowconvert has no conversion rule for this tensor method, so it cannot tell whether it "
    "is invertible or what its likelihood contribution is.",
    "Use a supported method (docs/supported.md: view, reshape, flatten, squeeze, unsqueeze, "
    "permute, transpose, contiguous, tanh, sigmoid, add/sub/mul/div, split, chunk; mean, sum "
    "and amax over non-batch dimensions are global pooling), or declare a rule with "
    "flowconvert.registry.REGISTRY.rule(methods=[...]).",
)
register_diagnostic(
    "FC113",
    "operation mixes samples of the batch",
    "The operation moves values between samples (for example x.view(-1), a hard-coded batch "
    "size, or a permute of the batch dimension), so one sample's output would depend on the "
    "others and there is no per-sample density.",
    "Keep the batch dimension first and untouched: write x.view(x.size(0), -1) or torch.flatten(x, 1).",
)
register_diagnostic(
    "FC114",
    "random operation in the forward pass",
    "The operation draws random numbers at inference time (for example dropout with "
    "training=True), so the network is not a fixed function to invert.",
    "Make it deterministic at inference: pass training=self.training to F.dropout, or use "
    "nn.Dropout (which flowconvert treats as the identity).",
)
register_diagnostic(
    "FC120",
    "flow layer could not be built",
    "The conversion rule for this node failed while building its flow layer.",
    "Check the layer's configuration against the supported ones in the documentation; if it "
    "should be supported, report it with the message above.",
)

# Graph structure and tracing (reported by the audit).
register_diagnostic(
    "FC301",
    "data-dependent control flow",
    "A Python `if` or `while` on a tensor value makes the computation depend on the data, "
    "so torch.fx cannot record one fixed graph of operations to turn into a flow.",
    "Express the branch with tensor operations (torch.where), or decide it from the "
    "module's configuration rather than from the input values.",
)
register_diagnostic(
    "FC302",
    "Python loop or conversion over a traced value",
    "The forward pass iterates over a tensor, calls len()/int()/range() on a traced size, "
    "or converts a tensor to a Python number, which torch.fx cannot record.",
    "Loop over a fixed number known from the configuration (e.g. range(self.num_blocks)), "
    "and keep sizes symbolic (x.view(x.size(0), -1)) instead of converting them to int.",
)
register_diagnostic(
    "FC303",
    "model could not be traced",
    "torch.fx could not record the forward pass as a graph of operations.",
    "Make the forward pass traceable by torch.fx.symbolic_trace (see the torch.fx "
    "limitations), for example by moving untraceable helper code out of forward.",
)
register_diagnostic(
    "FC304",
    "value is used more than once (fan-out)",
    "A flow must consume every value exactly once; a value with several consumers is "
    "duplicated by an augmentation layer (FlowDuplicate, a bound). This code is reported "
    "when the duplication is not possible, e.g. for a piece of a split that is read twice.",
    "Read each piece of a split or chunk once (assign it to a variable), or restructure the "
    "graph so that every value has tensor consumers only.",
)
register_diagnostic(
    "FC305",
    "operation merges several data values",
    "Two values computed from the input are combined in a way that has no flow layer: "
    "a + b and torch.cat of data values are supported, but broadcasting sums, concatenation "
    "with constants and other many-to-one maps are not.",
    "Add values of the same shape, concatenate only data values, or convert the branches as separate models.",
)
register_diagnostic(
    "FC306",
    "data value is never used",
    "A value computed from the input does not reach any output, so the flow would lose "
    "those dimensions without modelling them.",
    "Delete the unused computation from forward (or return it as an extra output).",
)
register_diagnostic(
    "FC307",
    "output does not depend on the input",
    "An output of the model is a constant or a size, not a value computed from the input, "
    "so it cannot carry a base density.",
    "Return only tensors computed from the input; move constants and sizes out of forward.",
)
register_diagnostic(
    "FC309",
    "model fails on the example inputs",
    "Running the model on the example inputs raised an error, so the shapes of its values are unknown.",
    "Pass example inputs the model accepts, with a leading batch dimension "
    "(e.g. torch.randn(1, 64) for a model taking 64 features).",
)
