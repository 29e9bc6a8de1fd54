"""Published model definitions (torchvision, pytorchcv, timm) for tests and benchmarks, random weights.

torchvision's wheels link compiled operators (``torchvision::nms`` ...) against the torch they
were built with; beside another build of torch (e.g. the CPU wheel) its import fails with
``RuntimeError: operator torchvision::nms does not exist``: its Python code registers fake
kernels for two operators that the library failed to define. The model definitions need none
of the compiled operators, so :func:`import_torchvision` declares the two missing schemas with
:mod:`torch.library` and imports it again. (The compiled ops, e.g. ``torchvision.ops.nms``,
stay unavailable.)
"""

from __future__ import annotations

import importlib
import sys

import torch

__all__ = ["import_torchvision", "torchvision_model", "pytorchcv_model", "timm_model"]

#: The operator schemas torchvision's ``_meta_registrations`` registers fake kernels for at import.
TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # keeps the schema definitions alive


def import_torchvision():
    """``import torchvision``, declaring its missing operator schemas first when its compiled ops do not load."""
    global _LIBRARY
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for schema in TORCHVISION_SCHEMAS:
            _LIBRARY.define(schema)
    return importlib.import_module("torchvision")


def torchvision_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A torchvision classification model with random weights (never downloaded), in eval mode."""
    tv = import_torchvision()
    torch.manual_seed(seed)
    return tv.models.get_model(name, weights=None, **kwargs).eval()


def pytorchcv_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A pytorchcv model (e.g. ``resnet20_cifar10``, ``nin_cifar10``) with random weights, in eval mode."""
    import_torchvision()  # pytorchcv imports torchvision
    from pytorchcv.model_provider import get_model

    torch.manual_seed(seed)
    return get_model(name, pretrained=False).eval()


def timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with random weights (``pretrained=False``), in eval mode."""
    import_torchvision()
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()
