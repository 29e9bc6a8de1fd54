"""Constructor recording: the one mechanism that lets :mod:`flowconvert.io` save any flow as data.

Every class derived from :class:`Configurable` (flow layers, density families, base
densities, noise, :class:`~flowconvert.flow.FlowModel`) remembers the arguments its
constructor was called with, as ``module.init_config() -> (args, kwargs)``. Saving writes
them as JSON (tensors by reference into the safetensors file); loading calls the same
constructor again, from an allow-list of recorded classes, and then loads the state dict.
A new layer or density family needs no saving code: deriving from the base class is enough,
as long as its constructor arguments are JSON-like values, tensors, dtypes, dataclasses of
flowconvert, or other recorded modules.

>>> import torch
>>> from flowconvert import FlowLeakyReLU
>>> FlowLeakyReLU(0.5).init_config()
((0.5,), {})
>>> "flowconvert.activations.FlowLeakyReLU" in RECORDED
True
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["RECORDED", "Configurable", "class_key"]

#: Every recorded class by ``module.qualname``: the allow-list :func:`flowconvert.load` builds from.
RECORDED: dict[str, type] = {}

_CONFIG = "_fc_init_config"


def class_key(cls: type) -> str:
    """``"package.module.QualName"`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Configurable:
    """Mixin: the constructor call of each instance is recorded (see the module docstring).

    Only the outermost constructor call is kept (a subclass calling ``super().__init__`` with
    other arguments records its own). Arguments are kept by reference, not copied; tensors
    are detached (sharing storage), so the record holds no autograd graph and copies with
    ``copy.deepcopy``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RECORDED[class_key(cls)] = cls
        init = cls.__dict__.get("__init__", cls.__init__)
        if getattr(init, "_fc_records", False):
            return  # inherits a recording constructor, which records for this class too

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            if type(self).__init__ is recording_init:  # the outermost constructor of this instance
                args, kw = _own(self, list(args), dict(kw))
                object.__setattr__(self, _CONFIG, (_detached(tuple(args)), _detached(kw)))

        recording_init._fc_records = True  # type: ignore[attr-defined]
        cls.__init__ = recording_init  # type: ignore[misc]

    #: The leading constructor arguments that the instance copies into attributes of the same
    #: names (e.g. ``("weight", "bias")``): the record names the instance's own tensors, equal at
    #: construction, so that it keeps no reference to the caller's (no second copy stays alive).
    _record_own: tuple[str, ...] = ()

    def init_config(self) -> tuple[tuple, dict[str, Any]] | None:
        """``(args, kwargs)`` of the constructor call that made this instance (None if unknown)."""
        return self.__dict__.get(_CONFIG)


def _own(module: Configurable, args: list, kw: dict) -> tuple[list, dict]:
    """``args``/``kw`` with the arguments named by ``module._record_own`` taken from the module (when given)."""
    for i, name in enumerate(module._record_own):
        if i < len(args):
            if args[i] is not None:
                args[i] = getattr(module, name)
        elif kw.get(name) is not None:
            kw[name] = getattr(module, name)
    return args, kw


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value
