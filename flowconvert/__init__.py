"""flowconvert: turn trained PyTorch networks into normalizing flows.

The public names are loaded on first use (PEP 562), so that ``import flowconvert`` and the
command line cost only what they use (``flowconvert --help`` imports no torch; onnx is
imported by an export only).

>>> import flowconvert as fc
>>> issubclass(fc.ConversionError, fc.FlowConversionError)
True
"""

from __future__ import annotations

import importlib
from typing import Any

#: submodule -> the public names it provides
_PUBLIC = {
    "core": ("FlowLayer", "network_training"),
    "densities": (
        "ConditionalDiagonalNormal",
        "ConditionalFullNormal",
        "ConditionalNormal",
        "DiagonalNormal",
        "ElementwiseConditionalNormal",
        "FullNormal",
        "GaussianNoise",
        "StandardNormal",
    ),
    "errors": (
        "DIAGNOSTICS",
        "ConversionError",
        "Diagnostic",
        "ExportError",
        "FlowConversionError",
        "LayerConfigurationError",
        "SingularWeightError",
        "TracingError",
        "FileFormatError",
        "InputError",
        "FlowConversionWarning",
    ),
    "linear": ("FlowLinear",),
    "conv": ("FlowConv",),
    "activations": ("FlowLeakyClamp", "FlowLeakyReLU"),
    "grouped": ("FlowGroupedConv",),
    "merging": ("FlowCat", "FlowDuplicate", "FlowSplit", "FlowSum"),
    "pooling": ("FlowAvgPool", "FlowMaxPool", "FlowReduce", "FlowWindowPool"),
    "elementwise": (
        "FlowBatchNorm",
        "FlowELU",
        "FlowPReLU",
        "FlowScalarAffine",
        "FlowSigmoid",
        "FlowSoftplus",
        "FlowTanh",
    ),
    "shapes": ("FlowIdentity", "Permute", "Reshape"),
    "export": ("ExportResult", "export_onnx"),
    "conversion": ("audit", "convert"),
    "flow": ("FlowModel",),
    "registry": ("REGISTRY", "Registry"),
    "report": ("NodeReport", "Problem", "Report"),
    "dequantization": ("Dequantize", "nats_to_bits_per_dim"),
    "evaluation": ("bits_per_dim", "log_likelihood"),
    "calibration": ("CalibrationReport", "calibrate"),
    "training": ("History", "fit"),
    "io": ("save", "load"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [name for names in _PUBLIC.values() for name in names]

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'flowconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
