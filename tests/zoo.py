"""A zoo of small convertible networks for the converter's tests.

Each entry: a factory, an example input shape (batch first) and whether the converted
flow is exact. Weights are random (seeded by the tests), scaled to keep the maps well
conditioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SquareMLP(nn.Module):
    """6 -> 6 -> 6: every layer a bijection (exact)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.act = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ReducingMLP(nn.Module):
    """12 -> 8 -> 4: funnels (exact, with densities on the dropped coordinates)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 8), nn.LeakyReLU(0.1), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


class IncreasingMLP(nn.Module):
    """3 -> 5 -> 8: augmentations (bound)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.act = nn.LeakyReLU(0.3)
        self.fc2 = nn.Linear(5, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViewFlattenCNN(nn.Module):
    """Non-overlapping 2x2/stride-2 conv 1 -> 4 channels (a bijection), flatten via view(x.size(0), -1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=2, stride=2)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.act(self.conv(x))
        h = h.view(h.size(0), -1)
        return self.fc(h)


class PaddedCNN(nn.Module):
    """3x3 convolutions with zero padding (overlapping windows; bound), then a reducing head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.a1 = nn.LeakyReLU(0.1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        return self.fc(self.flat(self.c2(self.a1(self.c1(x)))))


class OverlappingCNN(nn.Module):
    """Unpadded overlapping windows (kernel 3, stride 1) and a strided 1-D convolution."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c2 = nn.Conv1d(3, 6, 2, stride=2)

    def forward(self, x):
        return torch.flatten(self.c2(F.leaky_relu(self.c1(x), 0.2)), 1)


class FunctionalMLP(nn.Module):
    """F.linear with get_attr weights and F.leaky_relu (square, exact)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 5) / 5**0.5 + torch.eye(5))
        self.b1 = nn.Parameter(torch.randn(5) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 5) / 5**0.5 + torch.eye(5))

    def forward(self, x):
        h = F.leaky_relu(F.linear(x, self.w1, self.b1), negative_slope=0.3)
        return F.linear(h, self.w2)


class FunctionalCNN(nn.Module):
    """F.conv2d with get_attr weights (non-overlapping, 2 -> 8 channels: a bijection), then reshape."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 2, 2, 2) * 0.5)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        h = F.conv2d(x, self.weight, self.bias, stride=2)
        h = F.leaky_relu(h, 0.2)
        return h.reshape(h.shape[0], -1)


class ShapeOps(nn.Module):
    """transpose / unsqueeze / squeeze / contiguous / Identity / Dropout around a per-row linear map."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):  # x: (B, 3, 4)
        h = x.transpose(1, 2).contiguous()  # (B, 4, 3)
        h = self.fc(h).unsqueeze(1)  # (B, 1, 4, 3)
        h = self.drop(h).squeeze(1)
        return self.ident(h.permute(0, 2, 1))


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    exact: bool
    square: bool  # a bijection end to end (autograd log|det| applies directly)


ZOO = [
    Entry("square_mlp", SquareMLP, (4, 6), True, True),
    Entry("reducing_mlp", ReducingMLP, (4, 12), True, False),
    Entry("increasing_mlp", IncreasingMLP, (4, 3), False, False),
    Entry("view_flatten_cnn", ViewFlattenCNN, (3, 1, 4, 4), True, True),
    Entry("padded_cnn", PaddedCNN, (3, 2, 6, 6), False, False),
    Entry("overlapping_cnn", OverlappingCNN, (3, 2, 8), False, False),
    Entry("functional_mlp", FunctionalMLP, (4, 5), True, True),
    Entry("functional_cnn", FunctionalCNN, (3, 2, 4, 4), True, True),
    Entry("shape_ops", ShapeOps, (4, 3, 4), True, True),
]


def make(entry: Entry, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return entry.make().to(dtype).eval()
