"""Iterate over the inputs of a data set given as a tensor, a Dataset or a DataLoader.

Every helper that consumes data (calibration, training, evaluation) accepts the same forms:
a tensor (split into batches along dim 0), a tuple/list of tensors (inputs first, labels
ignored), a ``torch.utils.data.Dataset`` or a ``DataLoader`` whose batches are tensors or
``(inputs, labels...)`` tuples.

>>> import torch
>>> [b.shape[0] for b in iter_inputs(torch.zeros(5, 2), batch_size=2)]
[2, 2, 1]
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["iter_inputs", "first"]


def first(batch: Any) -> Tensor:
    """The input tensor of a batch (the batch itself, or its first element)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    raise TypeError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


def iter_inputs(data: Any, batch_size: int = 512) -> Iterator[Tensor]:
    """Yield input batches from a tensor, tensors tuple, Dataset or DataLoader (in order)."""
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        yield from data[0].split(batch_size)
    elif isinstance(data, DataLoader):
        for batch in data:
            yield first(batch)
    elif isinstance(data, Dataset):
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            yield first(batch)
    else:
        raise TypeError(f"unsupported data of type {type(data).__name__}: pass a tensor, a Dataset or a DataLoader")
