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
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["iter_inputs", "first", "as_dataset"]


def first(batch: Any) -> Tensor:
    """The input tensor of a batch (the batch itself, or its first element)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    raise TypeError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


def as_dataset(data: Any) -> Dataset:
    """``data`` (a tensor, a tuple of tensors with inputs first, or a Dataset) as a Dataset."""
    if isinstance(data, Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return TensorDataset(data[0])
    if isinstance(data, Dataset):
        return data
    raise TypeError(f"unsupported data of type {type(data).__name__}: pass a tensor, a Dataset or a DataLoader")


def iter_inputs(data: Any, batch_size: int = 512) -> Iterator[Tensor]:
    """Yield input batches from a tensor, tensors tuple, Dataset or DataLoader (in order)."""
    if isinstance(data, DataLoader):
        batches = data
    elif isinstance(data, Dataset):
        batches = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:  # a tensor (or inputs and labels): split, no per-row indexing
        batches = as_dataset(data).tensors[0].split(batch_size)
    for batch in batches:
        yield first(batch)
