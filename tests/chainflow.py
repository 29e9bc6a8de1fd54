"""A minimal chain of flow layers with the FlowModel interface, for tests of the density tools.

It follows the same interface as a converted model (``log_prob``, ``forward_with_log_prob``,
``inverse``, ``sample``, ``exact``) so calibration, training, evaluation and plotting can be
tested independently of the converter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import flowconvert as fc


class Chain(nn.Module):
    def __init__(self, *layers: nn.Module, out_shape, base: str = "standard"):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.base = fc.DiagonalNormal(out_shape) if base == "diagonal" else fc.StandardNormal(out_shape)

    @property
    def exact(self) -> bool:
        return all(getattr(m, "exact", True) for m in self.layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_with_log_prob(self, x: Tensor, deterministic: bool = True, noise=None):
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            eps = None if deterministic else layer.draw_noise(x)
            x, ll = layer.call_and_ll(x, eps)
            total = total + ll
        return x, total + self.base.log_prob(x)

    def log_prob(self, x: Tensor, deterministic: bool = False, num_samples: int = 1) -> Tensor:
        return self.forward_with_log_prob(x, deterministic=deterministic)[1]

    def inverse(self, z: Tensor, sample: bool = True, noise=None) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z, sample=sample)
        return z

    def sample(self, n: int) -> Tensor:
        return self.inverse(self.base.sample(n), sample=True)


def mlp_chain(sizes, slope: float = 0.2, seed: int = 0, base: str = "standard", dtype=torch.float32) -> Chain:
    """Linear/LeakyReLU chain with random weights, e.g. ``sizes=(4, 6, 2)``."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(m, n, generator=g, dtype=dtype) / n**0.5
        layers.append(fc.FlowLinear(w, 0.1 * torch.randn(m, generator=g, dtype=dtype)))
        if i < len(sizes) - 2:
            layers.append(fc.FlowLeakyReLU(slope))
    return Chain(*layers, out_shape=(sizes[-1],), base=base).to(dtype)
