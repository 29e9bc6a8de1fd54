"""Pictures: grids of samples and reconstructions, and training curves (matplotlib, Agg).

Images are drawn from flat or ``(C, H, W)`` tensors with ``image_shape=(H, W)``; values are
clipped to ``[vmin, vmax]`` (default: the unit interval the dequantizer maps data to) for
display, never silently: when values leave the range, the picture's title says how many
(and their range).

* :func:`save_samples`: ``flow.sample(n, temperature=T)`` as a grid.
* :func:`save_reconstructions`: rows of inputs, ``inverse(forward(x), sample=False)`` (the
  conditional means of everything the network dropped) and ``inverse(forward(x), sample=True)``
  (draws of it): what the network's outputs still know about the input.
* :func:`save_training_curves`: bits/dim per epoch from :class:`flowconvert.History` objects.

>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "grid.png")
>>> save_image_grid([torch.rand(6, 64)], path, image_shape=(8, 8)).endswith("grid.png")
True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["save_image_grid", "save_samples", "save_reconstructions", "save_training_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_images(x: Tensor, image_shape: Sequence[int]) -> Tensor:
    x = x.detach().cpu().float()
    return x.reshape(x.shape[0], *image_shape)


def save_image_grid(
    rows: Sequence[Tensor],
    path: str | Path,
    *,
    image_shape: Sequence[int],
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> str:
    """Save rows of images (each a ``(n, ...)`` tensor) as one PNG grid; returns the path.

    Long rows wrap onto several lines of ``math.ceil(sqrt(n))`` images when only one row is given.
    """
    plt = _pyplot()
    rows = [_as_images(r, image_shape) for r in rows]
    values = torch.cat([r.reshape(-1) for r in rows])
    outside = int(((values < vmin) | (values > vmax) | ~torch.isfinite(values)).sum())
    if outside:
        finite = values[torch.isfinite(values)]
        note = (
            f"{outside} of {values.numel()} values outside [{vmin:g}, {vmax:g}] (clipped for display; "
            f"range {finite.min().item():.3g}..{finite.max().item():.3g})"
        )
        title = f"{title}\n{note}" if title else note
    if len(rows) == 1 and rows[0].shape[0] > 12:
        per = math.ceil(math.sqrt(rows[0].shape[0]))
        rows = list(rows[0].split(per))
        row_labels = None
    ncols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(0.9 * ncols + (1.4 if row_labels else 0), 0.9 * len(rows) + 0.4), squeeze=False
    )
    for i, r in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < r.shape[0]:
                ax.imshow(r[j].clamp(vmin, vmax).numpy(), cmap="gray_r", vmin=vmin, vmax=vmax, interpolation="nearest")
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


@torch.no_grad()
def save_samples(
    flow: Any,
    path: str | Path,
    *,
    n: int = 36,
    image_shape: Sequence[int],
    title: str | None = None,
    temperature: float = 1.0,
    **kwargs,
) -> str:
    """Save ``flow.sample(n, temperature=temperature)`` as a grid; ``kwargs`` go to :func:`save_image_grid`."""
    samples = flow.sample(n, temperature=temperature) if temperature != 1.0 else flow.sample(n)
    if isinstance(samples, (tuple, list)):
        samples = samples[0]
    return save_image_grid([samples], path, image_shape=image_shape, title=title, **kwargs)


def _invert(flow: Any, outputs: Any, sample: bool, temperature: float = 1.0) -> Tensor:
    kw = {"temperature": temperature} if sample and temperature != 1.0 else {}
    outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    out = flow.inverse(*outs, sample=sample, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def save_reconstructions(
    flow: Any,
    x: Tensor,
    path: str | Path,
    *,
    image_shape: Sequence[int],
    title: str | None = None,
    draws: int = 2,
    temperature: float = 1.0,
    **kwargs,
) -> str:
    """Rows: ``x``, the inverse with ``sample=False`` and ``draws`` rows of the inverse with ``sample=True``
    at ``temperature``."""
    outputs, _ = flow.forward_with_log_prob(x, deterministic=True)
    rows = [x, _invert(flow, outputs, sample=False)] + [_invert(flow, outputs, True, temperature) for _ in range(draws)]
    labels = ["input", "mean"] + [f"draw {i + 1}" for i in range(draws)]
    return save_image_grid(rows, path, image_shape=image_shape, row_labels=labels, title=title, **kwargs)


def save_training_curves(histories: Mapping[str, Any], path: str | Path, *, title: str = "training") -> str:
    """Plot train (dashed) and validation (solid) bits/dim per epoch for each named history."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        ax.plot(h.epochs, h.train_bpd, "--", color=color, label=f"{name} (train)")
        if h.val_bpd:
            ax.plot(h.epochs[: len(h.val_bpd)], h.val_bpd, "-", color=color, label=f"{name} (validation)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits / dim")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
