r"""Log-likelihoods and bits per dimension of a flow on a data set.

For a flow with *bound* layers (noise-adding) one stochastic pass gives a lower bound
:math:`L = \log p(x, u) - \log q(u)` on :math:`\log p(x)`. With :math:`K` independent passes
the importance-weighted bound

.. math:: \mathcal L_K = \log \frac1K \sum_{k=1}^K e^{L_k}

satisfies :math:`\mathbb E\,\mathcal L_1 \le \mathbb E\,\mathcal L_K \le \mathbb E\,\mathcal L_{2K} \le \log p(x)`
(Burda et al. 2016). For dequantized discrete data the uniform noise :math:`u_{\text{deq}}`
is one more latent and is importance-weighted in the same sum, so :math:`\mathcal L_K`
bounds :math:`\log P(k)`; the :math:`-D\log K` of the dequantizer is included.

``flow`` is anything with ``log_prob(x, deterministic=...)`` returning one value per sample
(a converted :class:`FlowModel`, or your own module).

>>> import torch
>>> class Gauss(torch.nn.Module):   # a 2-d standard normal "flow"
...     exact = True
...     def log_prob(self, x, deterministic=False):
...         return -0.5 * (x * x).sum(1) - math.log(2 * math.pi)
>>> x = torch.zeros(3, 2)
>>> log_likelihood(Gauss(), x)
tensor([-1.8379, -1.8379, -1.8379])
>>> round(bits_per_dim(Gauss(), x), 4)   # 1.8379 / (2 ln 2)
1.3257
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ._data import iter_inputs
from .core import Flow
from .dequantization import Dequantize, nats_to_bits_per_dim, warn_if_discrete
from .errors import InputError
from .validation import check_count, check_data, tensor_data

__all__ = ["log_likelihood", "bits_per_dim", "mean_log_likelihood", "sum_log_likelihood"]


def _flow_log_prob(flow: Flow, x: Tensor, deterministic: bool) -> Tensor:
    return flow.log_prob(x, deterministic=deterministic)


def log_likelihood(
    flow: Flow,
    x: Tensor,
    *,
    dequantize: Dequantize | None = None,
    num_samples: int = 1,
    deterministic: bool = False,
) -> Tensor:
    r"""Per-sample :math:`\log p(x)` (or its importance-weighted bound with ``num_samples`` draws).

    With ``dequantize``, ``x`` holds integer levels and the result bounds :math:`\log P(x)`
    (dequantization noise drawn afresh for every sample, :math:`D\log`-Jacobian included).
    ``deterministic=True`` sets every forward noise to zero (a point evaluation, not a bound,
    when the flow has bound layers).
    """
    check_count("num_samples", num_samples, 1)
    check_data(flow, x, "data", dequantize=dequantize)
    stochastic = dequantize is not None or not deterministic
    draws = num_samples if stochastic else 1
    terms = []
    for _ in range(draws):
        xi = dequantize(x) if dequantize is not None else x
        ll = _flow_log_prob(flow, xi, deterministic)
        if dequantize is not None:
            ll = ll + dequantize.log_det(x[0].numel())
        terms.append(ll)
    if len(terms) == 1:
        return terms[0]
    return torch.logsumexp(torch.stack(terms), 0) - math.log(len(terms))


@torch.no_grad()
def sum_log_likelihood(flow: Flow, batches: Iterable[Tensor], **kwargs) -> tuple[float, int, int]:
    """``(sum of log_likelihood, number of samples, per-sample dimension D)`` over ``batches``
    (input tensors; empty ones are skipped); ``kwargs`` are those of :func:`log_likelihood`. The
    one loop that evaluation, calibration's held-out guard and training's validation share."""
    total, count, dims = 0.0, 0, 0
    for x in batches:
        if not x.shape[0]:
            continue
        total += log_likelihood(flow, x, **kwargs).double().sum().item()
        count += x.shape[0]
        dims = x[0].numel()
    return total, count, dims


def mean_log_likelihood(flow: Flow, data: Any, *, batch_size: int = 512, **kwargs) -> tuple[float, int]:
    """Mean of :func:`log_likelihood` over a data set, and the per-sample dimension ``D``."""
    check_count("batch_size", batch_size, 1)
    if tensor_data(data) is not None:  # a whole tensor is checked at once (rows numbered as given)
        check_data(flow, tensor_data(data), "data", dequantize=kwargs.get("dequantize"))
    total, count, dims = sum_log_likelihood(flow, iter_inputs(data, batch_size), **kwargs)
    if count == 0:
        raise InputError("the data set is empty: a mean over no samples is undefined", code="FC604")
    return total / count, dims


def bits_per_dim(
    flow: Flow,
    data: Any,
    *,
    dequantize: Dequantize | None = None,
    num_samples: int = 1,
    deterministic: bool = False,
    batch_size: int = 512,
) -> float:
    r"""Mean bits per dimension :math:`-\log p(x) / (D\ln 2)` of ``flow`` on ``data``.

    ``data`` is a tensor, Dataset or DataLoader; see :func:`log_likelihood` for the other
    arguments. Lower is better; with ``dequantize`` it is comparable with discrete models.
    """
    warn_if_discrete(data, dequantize, "bits_per_dim")
    mean, dims = mean_log_likelihood(
        flow, data, batch_size=batch_size, dequantize=dequantize, num_samples=num_samples, deterministic=deterministic
    )
    return float(nats_to_bits_per_dim(-mean, dims))
