"""Checks at the public boundary: shapes, dtypes, finiteness and argument ranges.

Every public entry point of a flow checks its data here before any layer runs, so a wrong
input fails with an :class:`~flowconvert.errors.InputError` that says what was expected
(``FC601`` shape, ``FC602`` dtype, ``FC603`` non-finite values, ``FC604`` argument values)
instead of a matmul error deep inside, or worse, a finite but meaningless result.
The checks are metadata comparisons (no pass over the data) except :func:`check_finite`,
which the data-set entry points (calibration, fitting, evaluation) call once per batch.

>>> import torch
>>> check_batch([torch.zeros(2, 3)], [(3,)], torch.float32, what="input")
2
>>> try:
...     check_batch([torch.zeros(2, 4)], [(3,)], torch.float32, what="input")
... except InputError as err:
...     print(err.code, err.message)
FC601 input has shape (2, 4); the flow expects (batch, 3)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError

__all__ = [
    "check_batch",
    "check_noise",
    "check_finite",
    "check_count",
    "check_positive",
    "check_data",
    "tensor_data",
    "flow_dtype",
    "InputError",
]

Shape = tuple[int, ...]


def _shape_text(shape: Sequence[int]) -> str:
    return ", ".join(str(s) for s in ("batch", *shape))


def check_batch(
    values: Sequence[Any], shapes: Sequence[Shape], dtype: torch.dtype | None, *, what: str = "input"
) -> int:
    """Check tensors against per-sample ``shapes`` and ``dtype``; return the common batch size."""
    if len(values) != len(shapes):
        raise InputError(
            f"expected {len(shapes)} {what}{'s' * (len(shapes) != 1)} "
            f"of shapes {[tuple(s) for s in shapes]}, got {len(values)}",
            code="FC601",
        )
    batch = None
    for i, (t, shape) in enumerate(zip(values, shapes)):
        label = what if len(shapes) == 1 else f"{what} {i}"
        if not isinstance(t, Tensor):
            raise InputError(
                f"{label} must be a tensor of shape ({_shape_text(shape)}), got {type(t).__name__}", code="FC602"
            )
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape):
            raise InputError(
                f"{label} has shape {tuple(t.shape)}; the flow expects ({_shape_text(shape)})", code="FC601"
            )
        if dtype is not None and t.dtype != dtype:
            hint = (
                " (integers: a flow models continuous values; use Dequantize for discrete data)"
                if not t.is_floating_point()
                else ""
            )
            raise InputError(f"{label} has dtype {t.dtype}; the flow computes in {dtype}{hint}", code="FC602")
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch:
            raise InputError(f"{label} has batch size {t.shape[0]}, the first has {batch}", code="FC601")
    return int(batch or 0)


def check_noise(
    noise: Mapping[str, Any] | None, shapes: Mapping[str, Shape], batch: int, dtype: torch.dtype | None
) -> None:
    """Check an explicit noise dict: exactly the keys of ``shapes``, each ``(batch, *shape)``."""
    if noise is None:
        return
    if not isinstance(noise, Mapping):
        raise InputError(f"noise must be a dict {{layer name: tensor}}, got {type(noise).__name__}", code="FC602")
    unknown = set(noise) - set(shapes)
    missing = set(shapes) - set(noise)
    if unknown or missing:
        raise InputError(
            f"noise must have exactly the keys {sorted(shapes)}"
            + (f"; unknown {sorted(unknown)}" if unknown else "")
            + (f"; missing {sorted(missing)}" if missing else ""),
            code="FC601",
        )
    for key, shape in shapes.items():
        t = noise[key]
        if not isinstance(t, Tensor) or tuple(t.shape) != (batch, *shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"noise[{key!r}] has shape {got}; expected {(batch, *shape)}", code="FC601")
        if dtype is not None and t.dtype != dtype:
            raise InputError(f"noise[{key!r}] has dtype {t.dtype}; the flow computes in {dtype}", code="FC602")


def check_finite(x: Tensor, what: str = "data") -> None:
    """Refuse NaN and infinite values (``FC603``), saying how many rows have them."""
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1)
        raise InputError(
            f"{what} has {int(bad.sum())} of {x.shape[0]} rows with NaN or infinite values "
            f"(first at row {int(bad.nonzero()[0, 0])})",
            code="FC603",
        )


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer argument ``>= minimum`` (``FC604``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}", code="FC604")
    return value


def flow_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating dtype the module computes in: that of its first floating parameter or buffer."""
    for m in module.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and t.is_floating_point():
                return t.dtype
    return None


def tensor_data(data: Any) -> Tensor | None:
    """The input tensor of a data set given as a tensor or a tuple of tensors (else None)."""
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return data[0]
    return None


def check_data(flow: Any, x: Any, what: str = "data", *, dequantize: Any = None, empty_ok: bool = True) -> None:
    """A batch or a whole data set given to calibration, fitting or evaluation.

    Shape and dtype against the flow's recorded inputs (when it has ``input_shapes``; with
    ``dequantize`` the data are levels, so only the shape is checked), finite values
    (``FC603``) and, unless ``empty_ok``, at least one sample (``FC604``).
    """
    if not isinstance(x, Tensor):
        raise InputError(
            f"{what} must be a tensor (or a Dataset/DataLoader of tensors), got {type(x).__name__}", code="FC602"
        )
    shapes = getattr(flow, "input_shapes", None)
    if isinstance(shapes, list) and len(shapes) == 1:
        dtype = None if dequantize is not None else flow_dtype(flow)
        check_batch([x], shapes, dtype, what=what)
    elif x.dim() == 0:
        raise InputError(f"{what} needs a leading batch dimension, got a scalar", code="FC601")
    if not empty_ok and x.shape[0] == 0:
        raise InputError(f"{what} is empty: at least one sample is needed", code="FC604")
    check_finite(x, what)


def check_positive(name: str, value: Any) -> float:
    """A finite number ``> 0`` (``FC604``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and value < float("inf")):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}", code="FC604")
    return float(value)
