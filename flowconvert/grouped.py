r"""Grouped and depthwise convolution as block-diagonal per-patch maps.

A convolution with ``groups = G`` splits the input channels into :math:`G` blocks and the
output channels into :math:`G` blocks; output block :math:`g` only reads input block
:math:`g`. Its per-patch linear map is block diagonal, so it factors exactly into :math:`G`
independent convolutions, each with ``groups=1``:

.. math:: L(x) = \sum_{g=1}^{G} L_g(x_g), \qquad x = (x_1, \dots, x_G) \text{ along channels},

and the inverse inverts every block separately. Each block is a
:class:`~flowconvert.conv.FlowConv` (Pad -> Tile -> Kernel, with its own kernel funnel,
bijection or augmentation and its own densities). A depthwise convolution is the case
``groups = C_in``: every block maps one channel's :math:`k` taps to ``C_out / C_in``
outputs per location.

``forward(x)`` is the original grouped convolution. The likelihood pass concatenates the
blocks' outputs (equal to the original within floating-point rounding). Noise for the
stochastic forward pass and for sampled inverses is one flat vector per sample, cut into
the blocks' noise in block order.

>>> import torch
>>> torch.manual_seed(0) and None
>>> conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise
>>> flow = FlowGroupedConv.from_module(conv, (4, 5, 5))
>>> x = torch.randn(2, 4, 5, 5)
>>> y, ll = flow.call_and_ll(x)
>>> torch.allclose(y, conv(x), atol=1e-5), torch.equal(flow(x), conv(x)), ll.shape
(True, True, torch.Size([2]))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv import FlowConv
from .core import DensityPart, FlowLayer
from .errors import LayerConfigurationError

__all__ = ["FlowGroupedConv"]


def _size(shape) -> int:
    return 0 if shape is None else math.prod(shape)


class FlowGroupedConv(FlowLayer):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups > 1`` (depthwise included): one :class:`FlowConv` per group.

    Args:
        weight, bias: the grouped convolution's parameters (``weight`` is ``(C_out, C_in / G, *k)``).
        input_shape: per-sample input shape ``(C_in, L)`` or ``(C_in, H, W)``.
        stride, padding, dilation, padding_mode: as in the original layer.
        groups: ``G``, dividing both channel counts.

    Attributes:
        blocks: the per-group :class:`FlowConv` layers.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        input_shape: Sequence[int],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        **kwargs,
    ):
        super().__init__()
        groups = int(groups)
        c_out, c_in_g = int(weight.shape[0]), int(weight.shape[1])
        input_shape = tuple(int(s) for s in input_shape)
        if groups < 1 or c_out % groups or input_shape[0] != c_in_g * groups:
            raise LayerConfigurationError(
                f"groups={groups} does not divide {input_shape[0]} input and {c_out} output channels", code="FC203"
            )
        self.groups, self.dim = groups, weight.dim() - 2
        self.in_per_group, self.out_per_group = c_in_g, c_out // groups
        self.input_shape = input_shape
        self.stride, self.padding, self.dilation = stride, padding, dilation
        if padding_mode != "zeros":
            raise LayerConfigurationError(f"padding_mode={padding_mode!r} is not supported; only 'zeros'", code="FC203")
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        block_shape = (c_in_g, *input_shape[1:])
        m = self.out_per_group
        self.blocks = nn.ModuleList(
            FlowConv(
                weight[g * m : (g + 1) * m],
                bias[g * m : (g + 1) * m] if bias is not None else None,
                input_shape=block_shape,
                stride=stride,
                padding=padding,
                dilation=dilation,
                **kwargs,
            )
            for g in range(groups)
        )
        self.exact = all(b.exact for b in self.blocks)
        self.block_shape = block_shape
        self.output_shape = (c_out, *self.blocks[0].output_shape[1:])

    @classmethod
    def from_module(cls, module: nn.Conv1d | nn.Conv2d, input_shape: Sequence[int], **kwargs) -> "FlowGroupedConv":
        return cls(
            module.weight,
            module.bias,
            input_shape=input_shape,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            **kwargs,
        )

    # -- noise: one flat vector per sample, cut per block ---------------------------------------
    def _block_noise_shapes(self, inverse: bool) -> list[tuple[int, ...] | None]:
        out_block = (self.out_per_group, *self.output_shape[1:])
        if inverse:
            return [b.inverse_noise_shape(out_block) for b in self.blocks]
        return [b.noise_shape(self.block_shape) for b in self.blocks]

    def noise_shape(self, input_shape: Sequence[int]) -> tuple[int, ...] | None:
        total = sum(_size(s) for s in self._block_noise_shapes(False))
        return (total,) if total else None

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> tuple[int, ...] | None:
        total = sum(_size(s) for s in self._block_noise_shapes(True))
        return (total,) if total else None

    @staticmethod
    def _cut(noise: Tensor | None, shapes) -> list[Tensor | None]:
        if noise is None:
            return [None] * len(shapes)
        out, offset = [], 0
        for s in shapes:
            n = _size(s)
            out.append(None if s is None else noise[:, offset : offset + n].reshape(noise.shape[0], *s))
            offset += n
        return out

    # -- the contract ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        conv = F.conv1d if self.dim == 1 else F.conv2d
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        parts = x.split(self.in_per_group, 1)
        noises = self._cut(noise, self._block_noise_shapes(False))
        ys, ll = [], x.new_zeros(x.shape[0])
        for block, part, eps in zip(self.blocks, parts, noises):
            y, block_ll = block.call_and_ll(part, eps)
            ys.append(y)
            ll = ll + block_ll
        return torch.cat(ys, 1), ll

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        noises = self._cut(noise, self._block_noise_shapes(True)) if sample else [None] * self.groups
        parts = y.split(self.out_per_group, 1)
        return torch.cat([b.inverse(p, sample=sample, noise=e) for b, p, e in zip(self.blocks, parts, noises)], 1)

    def density_parts(self) -> tuple[DensityPart, ...]:
        """The blocks' parts, named ``blocks.<g>.<part>``."""
        return tuple(
            dataclasses.replace(part, name=f"blocks.{g}.{part.name}")
            for g, block in enumerate(self.blocks)
            for part in block.density_parts()
        )

    def observe(self, x: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor | None]]:
        parts = x.split(self.in_per_group, 1)
        noises = self._cut(noise, self._block_noise_shapes(False))
        return {
            f"blocks.{g}.{name}": rows
            for g, (block, part, eps) in enumerate(zip(self.blocks, parts, noises))
            for name, rows in block.observe(part, eps).items()
        }

    def network_parameters(self) -> list[nn.Parameter]:
        return [p for b in self.blocks for p in b.network_parameters()]

    def sync_network(self) -> None:
        for b in self.blocks:
            b.sync_network()
        with torch.no_grad():
            self.weight.copy_(
                torch.cat([b.kernel.weight.reshape(self.out_per_group, *self.weight.shape[1:]) for b in self.blocks])
            )
            if self.bias is not None:
                self.bias.copy_(torch.cat([b.kernel.bias for b in self.blocks]))

    def prepare_for_export(self) -> None:
        for b in self.blocks:
            b.prepare_for_export()

    def extra_repr(self) -> str:
        return f"groups={self.groups}, input_shape={self.input_shape}, exact={self.exact}"
