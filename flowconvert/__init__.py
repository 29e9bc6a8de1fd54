"""flowconvert: turn trained PyTorch networks into normalizing flows.

>>> import flowconvert as fc
>>> issubclass(fc.ConversionError, fc.FlowConversionError)
True
"""

from .core import FlowLayer, network_training
from .densities import (
    ConditionalDiagonalNormal,
    ConditionalNormal,
    DiagonalNormal,
    ElementwiseConditionalNormal,
    GaussianNoise,
    StandardNormal,
)
from .errors import (
    DIAGNOSTICS,
    ConversionError,
    Diagnostic,
    ExportError,
    FileFormatError,
    FlowConversionError,
    InputError,
    LayerConfigurationError,
    SingularWeightError,
    TracingError,
)
from .linear import FlowLinear
from .conv import FlowConv
from .activations import FlowLeakyReLU
from .grouped import FlowGroupedConv
from .merging import FlowCat, FlowDuplicate, FlowSplit, FlowSum
from .pooling import FlowAvgPool, FlowMaxPool
from .elementwise import FlowBatchNorm, FlowELU, FlowPReLU, FlowScalarAffine, FlowSigmoid, FlowSoftplus, FlowTanh
from .shapes import FlowIdentity, Permute, Reshape
from .export import ExportResult, export_onnx
from .conversion import audit, convert
from .flow import FlowModel
from .registry import REGISTRY, Registry
from .report import NodeReport, Problem, Report
from .dequantization import Dequantize, nats_to_bits_per_dim
from .evaluation import bits_per_dim, log_likelihood
from .calibration import CalibrationReport, calibrate
from .training import History, fit
from .io import load, save

__all__ = [
    "audit",
    "convert",
    "FlowModel",
    "Report",
    "NodeReport",
    "Problem",
    "Registry",
    "REGISTRY",
    "FlowLayer",
    "network_training",
    "FlowLinear",
    "FlowConv",
    "FlowLeakyReLU",
    "FlowGroupedConv",
    "FlowDuplicate",
    "FlowSum",
    "FlowCat",
    "FlowSplit",
    "FlowAvgPool",
    "FlowMaxPool",
    "FlowBatchNorm",
    "FlowELU",
    "FlowTanh",
    "FlowSigmoid",
    "FlowSoftplus",
    "FlowPReLU",
    "FlowScalarAffine",
    "Reshape",
    "Permute",
    "FlowIdentity",
    "StandardNormal",
    "DiagonalNormal",
    "ConditionalNormal",
    "ConditionalDiagonalNormal",
    "ElementwiseConditionalNormal",
    "GaussianNoise",
    "DIAGNOSTICS",
    "Diagnostic",
    "FlowConversionError",
    "ConversionError",
    "LayerConfigurationError",
    "SingularWeightError",
    "TracingError",
    "ExportError",
    "FileFormatError",
    "InputError",
    "save",
    "load",
    "export_onnx",
    "ExportResult",
    "Dequantize",
    "nats_to_bits_per_dim",
    "bits_per_dim",
    "log_likelihood",
    "calibrate",
    "CalibrationReport",
    "fit",
    "History",
]

__version__ = "0.1.0"
