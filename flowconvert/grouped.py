r"""Grouped and depthwise convolution: one layer, the groups' kernels factorized together.

A convolution with ``groups = G`` splits the input channels into :math:`G` blocks and the
output channels into :math:`G` blocks; output block :math:`g` only reads input block
:math:`g`. Its per-patch linear map is block diagonal,

.. math:: \pi \mapsto \operatorname{blockdiag}(W_1, \dots, W_G)\,\pi + b,

so every stage of :class:`~flowconvert.conv.FlowConv` (Pad -> Tile -> Kernel) holds group by
group: the kernel is a block-diagonal :class:`~flowconvert.linear.FlowLinear` (``groups=G``:
each block's kept coordinates, ``log|det|`` and inverse come from one *batched* LU over the
groups), the density of the dropped kernel coordinates and of the dropped pixels is the
block-diagonal linear Gaussian :class:`~flowconvert.linear.GroupedConditionalNormal` (each
group's dropped coordinates given that group's outputs). ``L`` is the sum over the groups.
A depthwise convolution is the case ``groups = C_in``.

Nothing runs per group: ``forward(x)`` and the output of the deterministic likelihood pass are
the original grouped convolution (bit for bit), the linear-Gaussian density term is one more
grouped convolution of the input (kernel :math:`M_g = \operatorname{diag}(1/\sigma_g)(E_{S_g} - A_g W_g)`),
the stochastic pass and the inverse use batched matrix products over the groups.

>>> import torch
>>> torch.manual_seed(0) and None
>>> conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise
>>> flow = FlowGroupedConv.from_module(conv, (4, 5, 5))
>>> x = torch.randn(2, 4, 5, 5)
>>> y, ll = flow.call_and_ll(x)
>>> torch.equal(y, conv(x)), torch.equal(flow(x), conv(x)), ll.shape
(True, True, torch.Size([2]))
>>> flow.kernel.groups, flow.kernel.kind, [p.name for p in flow.density_parts()]
(4, 'funnel', ['kernel.dropped', 'pad_noise', 'tile_noise'])
"""

from __future__ import annotations

from .conv import FlowConv

__all__ = ["FlowGroupedConv"]


class FlowGroupedConv(FlowConv):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups > 1`` (depthwise included) as one flow layer.

    The constructor is :class:`~flowconvert.conv.FlowConv`'s (``groups`` dividing both channel
    counts, FC203 otherwise); :attr:`kernel` is the block-diagonal ``FlowLinear`` of the ``G``
    per-group kernel matrices ``(C_out / G) x (C_in / G) k``. :attr:`weight` and :attr:`bias`
    are views of the kernel's, so training the kernel trains the convolution.
    """

    def extra_repr(self) -> str:
        return f"groups={self.groups}, " + super().extra_repr()
