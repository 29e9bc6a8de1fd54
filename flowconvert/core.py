r"""The contract every flowified layer follows.

A flow layer :math:`f` maps a value :math:`x` to :math:`y` and reports its *likelihood
contribution* :math:`L(x)`, so that for a chain of layers ending in a base density

.. math:: \log p(x) = \log p_{\text{base}}(z) + \sum_{\text{layers}} L_{\text{layer}} .

For a bijection :math:`L = \log|\det J_f(x)|` (*exact*). A layer that drops coordinates
adds the log-density of what it dropped (still exact); a layer that adds coordinates
(noise) subtracts the noise's log-density and yields a one-sample lower bound (*bound*).

The contract is one method, :meth:`FlowLayer.call_and_ll`, returning the value and its
contribution per sample, plus :meth:`FlowLayer.inverse`:

>>> import torch
>>> from flowconvert import FlowLeakyReLU
>>> layer = FlowLeakyReLU(0.5)
>>> y, ll = layer.call_and_ll(torch.tensor([[1.0, -2.0]]))
>>> y, ll
(tensor([[ 1., -1.]]), tensor([-0.6931]))
>>> layer.inverse(y)
tensor([[ 1., -2.]])

Noise is explicit: ``noise=None`` is the *deterministic* mode (all forward noise is zero);
a tensor of standard-normal draws of shape ``(batch, *layer.noise_shape(x.shape[1:]))`` is
the *stochastic* mode. :meth:`FlowLayer.draw_noise` draws one. Explicit noise makes runs
reproducible and lets an exported graph take its noise as an input.

Layers with several inputs or outputs (graph structure: fan-out, ``a + b``, ``torch.cat``,
``torch.split``; see :mod:`flowconvert.merging`) extend the contract: inputs are passed
positionally, ``call_and_ll(*xs, noise=None)``; several outputs are returned as a tuple
``y``; ``inverse`` mirrors this (it takes the outputs positionally and returns a tuple of
inputs). Such layers declare ``num_inputs`` / ``num_outputs`` (class or instance attributes,
always present: the base class declares 1 and 1).

**Density parts.** Everything a layer *models* (the density of coordinates it drops, the
scale of noise it adds) is a submodule the layer declares in :meth:`FlowLayer.density_parts`,
one :class:`DensityPart` each. Calibration, fitting, reports and saving iterate over these
declarations; nothing is found by class name. :meth:`FlowLayer.observe` returns, for one
input, the rows each part models, so that a part can be fitted without knowing the layer:

>>> from flowconvert import FlowLinear
>>> funnel = FlowLinear(torch.tensor([[1.0, 0.0, 0.0]]))
>>> funnel.density_parts()
(DensityPart(name='dropped', kind='conditional', features=2, context=1),)
>>> d, y = funnel.observe(torch.randn(5, 3))["dropped"]
>>> d.shape, y.shape
(torch.Size([5, 2]), torch.Size([5, 1]))

A conditional part may be replaced by any :class:`~flowconvert.densities.ConditionalDensity`
of the same ``features`` and ``context`` (``layer.set_submodule(part.name, new)``); the layer's
likelihood and inverse then use it. Layers may keep a fused fast path for the
linear-Gaussian family, chosen by the part's type, never by the layer's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from .config import Configurable

__all__ = ["FlowLayer", "DensityPart", "Flow", "network_training"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DensityPart:
    """One modelling part of a flow layer, declared by :meth:`FlowLayer.density_parts`.

    Attributes:
        name: path of the density module inside the layer (``layer.get_submodule(name)``;
            dotted for nested layers, e.g. ``"kernel.dropped"``).
        kind: ``"conditional"``: the density of ``features`` dropped coordinates per row given
            ``context`` kept ones (a :class:`~flowconvert.densities.ConditionalDensity`);
            ``"noise"``: the scale of ``features`` added noise coordinates per row
            (a :class:`~flowconvert.densities.GaussianNoise`), ``context == 0``;
            ``"gaps"``: the non-negative gaps of a max surjection, one per channel and row
            (a :class:`~flowconvert.densities.HalfNormal`), ``context == 0``.
        features: coordinates per row the part models.
        context: coordinates per row it is conditioned on (0 for noise).
    """

    name: str
    kind: str
    features: int
    context: int = 0


class FlowLayer(Configurable, nn.Module):
    """Base class of flowified layers.

    Subclasses implement :meth:`call_and_ll` and :meth:`inverse`, set :attr:`exact`, and
    override :meth:`noise_shape` / :meth:`inverse_noise_shape` when they consume noise.
    ``forward(x)`` is the original layer's function (deterministic, no likelihood), so a
    flow layer is a drop-in replacement for the layer it was built from.
    """

    #: True when the contribution is the exact change of log-density, False for a bound.
    exact: bool = True
    #: Names of square orthogonal factors that :func:`network_training` keeps orthogonal.
    orthogonal_factors: tuple[str, ...] = ()
    #: How many data values ``call_and_ll`` takes and returns (merging layers declare more).
    num_inputs: int = 1
    num_outputs: int = 1

    def forward(self, x: Tensor) -> Tensor:
        return self.call_and_ll(x)[0]

    def call_and_ll(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(y, ll)``: the output and the likelihood contribution of shape ``(batch,)``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        """Map an output back to an input.

        ``sample=False`` uses conditional means for whatever the forward pass dropped;
        ``sample=True`` draws it, from ``noise`` (standard normal, shape
        ``(batch, *inverse_noise_shape(y.shape[1:]))``) when given.
        """
        raise NotImplementedError

    # -- noise -----------------------------------------------------------------------
    def noise_shape(self, input_shape: Sequence[int]) -> Shape | None:
        """Per-sample shape of the standard-normal noise the stochastic forward consumes, or None."""
        return None

    def inverse_noise_shape(self, output_shape: Sequence[int]) -> Shape | None:
        """Per-sample shape of the standard-normal noise a sampled inverse consumes, or None."""
        return None

    def draw_noise(self, x: Tensor) -> Tensor | None:
        """Standard-normal noise for a stochastic forward pass on ``x`` (None if the layer has none)."""
        return _draw(x, self.noise_shape(tuple(x.shape[1:])))

    def draw_inverse_noise(self, y: Tensor) -> Tensor | None:
        """Standard-normal noise for a sampled inverse of ``y`` (None if the layer needs none)."""
        return _draw(y, self.inverse_noise_shape(tuple(y.shape[1:])))

    # -- density parts -----------------------------------------------------------------
    def density_parts(self) -> tuple[DensityPart, ...]:
        """The parts of this layer that model something (see :class:`DensityPart`); ``()`` for none."""
        return ()

    def observe(self, *xs: Tensor, noise: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor | None]]:
        """The rows each declared part models when the layer is applied to ``xs``.

        ``{part name: (rows, context rows)}``: for a conditional part the dropped coordinates
        ``(N, features)`` and the kept output they are conditioned on ``(N, context)``; for a
        noise part the signal the noise is added to ``(N, features)`` and ``None``. ``N``
        counts rows over the batch (a convolution has one row per sample and location).
        """
        return {}

    def dropped_choice_features(self) -> int:
        """Input coordinates (last dimension) whose spread :meth:`choose_dropped` wants; 0: none.

        A layer that drops input coordinates may choose *which* from the data: that choice
        parametrizes its density, never its function."""
        return 0

    def choose_dropped(self, input_std: Tensor) -> bool:
        """Re-choose the dropped coordinates from the standard deviation of each input coordinate
        ``(dropped_choice_features(),)`` on calibration data; True when the choice changed. Called by
        :func:`flowconvert.calibrate` on a flow whose densities were never calibrated or trained."""
        return False

    # -- training of the network part --------------------------------------------------
    def network_parameters(self) -> list[nn.Parameter]:
        """Parameters that define the layer's function (frozen by default)."""
        return []

    def sync_network(self) -> None:
        """Recompute caches after the network parameters changed (see :func:`network_training`)."""

    def prepare_for_export(self) -> None:
        """Precompute every weight-only tensor and keep it fixed, before tracing for export.

        Called by :func:`flowconvert.export_onnx` on the flow itself (eval mode, parameters
        frozen), so that the traced graph holds only data-dependent operations; undone by
        :meth:`release_export` after tracing. Layers with caches override both.
        """

    def release_export(self) -> None:
        """Undo :meth:`prepare_for_export`: the layer follows its parameters again (after an export)."""

    def extra_repr(self) -> str:
        return f"exact={self.exact}"


@runtime_checkable
class Flow(Protocol):
    """The protocol of a whole flow (:class:`~flowconvert.flow.FlowModel` and anything that
    export, calibration and training accept in its place). One set of defaults:

    * ``forward(*x)``: the original network's outputs;
    * ``forward_with_log_prob(*x, deterministic=False, noise=None)`` and
      ``log_prob(*x, deterministic=False, num_samples=1, noise=None)``: stochastic by default
      (the one-sample bound for bound layers; identical to deterministic for exact flows);
    * ``inverse(*z, sample=False, noise=None, temperature=1.0)``: conditional means by default;
    * ``sample(n, temperature=1.0, noise=None)``: draws from the model.
    """

    exact: bool

    def forward_with_log_prob(
        self, *inputs: Tensor, deterministic: bool = False, noise: Mapping[str, Tensor] | None = None
    ) -> tuple[Any, Tensor]: ...

    def log_prob(
        self,
        *inputs: Tensor,
        deterministic: bool = False,
        num_samples: int = 1,
        noise: Mapping[str, Tensor] | None = None,
    ) -> Tensor: ...

    def inverse(
        self,
        *outputs: Tensor,
        sample: bool = False,
        noise: Mapping[str, Tensor] | None = None,
        temperature: float = 1.0,
    ) -> Any: ...

    def sample(self, n: int, temperature: float = 1.0, noise: Mapping[str, Tensor] | None = None) -> Any: ...

    def noise_shapes(self) -> dict[str, Shape]: ...

    def inverse_noise_shapes(self) -> dict[str, Shape]: ...


def _draw(like: Tensor, shape: Shape | None) -> Tensor | None:
    if shape is None:
        return None
    return torch.randn((like.shape[0], *shape), dtype=like.dtype, device=like.device)


def zero_ll(x: Tensor) -> Tensor:
    """A zero contribution of shape ``(batch,)``."""
    return x.new_zeros(x.shape[0])


def tensor_key(*tensors: Tensor | None) -> tuple:
    """What a weight-only cache is keyed on: version counter, storage, dtype and device of each
    tensor (``None`` skipped). It changes on in-place edits through autograd-visible operations
    (optimizer steps, ``copy_``, ``load_state_dict``), replacement and ``.to()``."""
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors if t is not None)


def _is_exporting() -> bool:
    check = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return bool(check()) if check is not None else False


def weight_only(module: nn.Module, name: str, tensors: Sequence[Tensor | None], compute: Callable[[], Any]) -> Any:
    """``compute()``, a quantity of ``module``'s weights ``tensors`` alone, kept between calls.

    Kept (in ``module.__dict__``, not in its state) and recomputed when any of ``tensors``
    changes (:func:`tensor_key`); computed afresh and not kept while autograd records a gradient
    for one of them (it must reach the weights: ``fit(train="all")``; a frozen network's weights
    need none) and while compiling or exporting (traced, it becomes part of the graph). Only
    what a layer could precompute belongs here, and only what traces into ONNX: an LU or an
    inverse cannot, so :class:`~flowconvert.linear.FlowLinear` keeps its ``log|det|`` and block
    inverse itself and fixes them as constants before an export
    (:meth:`FlowLayer.prepare_for_export`).

    >>> import torch
    >>> w, calls = torch.ones(3), []
    >>> layer = torch.nn.Module()
    >>> for _ in range(3):
    ...     total = weight_only(layer, "total", (w,), lambda: calls.append(1) or w.sum())
    >>> _ = w.add_(1.0)                 # an in-place edit: recomputed
    >>> total = weight_only(layer, "total", (w,), lambda: calls.append(1) or w.sum())
    >>> len(calls), total.item()
    (2, 6.0)
    >>> _ = w.requires_grad_()          # a gradient is recorded for w: computed at every call
    >>> total = weight_only(layer, "total", (w,), lambda: calls.append(1) or w.sum())
    >>> len(calls), total.requires_grad
    (3, True)
    """
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recorded or torch.compiler.is_compiling() or _is_exporting():
        return compute()
    store = module.__dict__.setdefault("_weight_only", {})
    key = tensor_key(*tensors)
    hit = store.get(name)
    if hit is None or hit[0] != key:
        hit = store[name] = (key, compute())
    return hit[1]


@contextlib.contextmanager
def network_training(module: nn.Module, orthogonal_map: str = "cayley") -> Iterator[list[nn.Parameter]]:
    """Make the network parameters of every flow layer in ``module`` trainable.

    Inside the block, orthogonal factors are parametrized with
    :func:`torch.nn.utils.parametrizations.orthogonal` (so gradient steps keep them
    orthogonal) and every network parameter requires grad. ``orthogonal_map`` is passed on:
    the default ``"cayley"`` trains as well as ``"matrix_exp"`` on the digits benchmark at
    less than half the cost per step (the backward pass of the matrix exponential dominates
    a step of a small flowified MLP); the block yields the list of
    trainable network parameters, for an optimizer. On exit the parametrizations are
    removed (keeping their current values), the layers recompute their cached weights,
    and ``requires_grad`` is restored. Create the optimizer *inside* the block.

    >>> import torch
    >>> from flowconvert import FlowLinear, network_training
    >>> layer = FlowLinear.from_module(torch.nn.Linear(3, 3))
    >>> with network_training(layer) as params:
    ...     loss = -layer.call_and_ll(torch.randn(8, 3))[1].mean()
    ...     loss.backward()
    >>> layer.weight.grad is not None
    True
    """
    layers = [m for m in module.modules() if isinstance(m, FlowLayer)]
    previous: list[tuple[nn.Parameter, bool]] = []
    registered: list[tuple[nn.Module, str]] = []
    try:
        for layer in layers:
            for name in layer.orthogonal_factors:
                if not parametrize.is_parametrized(layer, name):
                    getattr(layer, name).requires_grad_(True)
                    parametrizations.orthogonal(layer, name, orthogonal_map=orthogonal_map)
                    registered.append((layer, name))
        params: list[nn.Parameter] = []
        for layer in layers:
            for p in layer.network_parameters():
                previous.append((p, p.requires_grad))
                p.requires_grad_(True)
                params.append(p)
        yield params
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
        for layer, name in registered:
            parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
            getattr(layer, name).requires_grad_(False)
        for layer in layers:
            layer.sync_network()
