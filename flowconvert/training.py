r"""Maximum-likelihood training of a flow, with the network frozen or trained too.

The objective is the mean negative log-likelihood in bits per dimension,

.. math:: \mathcal J = -\frac{1}{B\,D\ln 2}\sum_{i=1}^{B} \big(\log p(x_i) + \log|\det|_{\text{deq}}\big),

minimized with Adam, gradient-norm clipping, and early stopping on validation data (the
parameters of the best validation epoch, or the starting ones if no epoch beats them, are
restored). For flows with bound layers
:math:`\log p` is the stochastic one-sample lower bound, as in training a VAE.

``train="densities"`` optimizes only the density parts (dropped-coordinate conditionals,
noise scales, a diagonal base): every network parameter stays frozen, so the network's
outputs are bit-for-bit what they were. ``train="all"`` trains everything inside
:func:`flowconvert.network_training`, which keeps the orthogonal SVD factors orthogonal
and writes the trained weight back at the end.

**Several processes.** Launched with ``torchrun``, :func:`fit` notices the distributed
environment (initializing a ``gloo`` process group if none exists), wraps the model in
``DistributedDataParallel``, gives each rank its shard of the data with a
``DistributedSampler`` and averages the validation figures over ranks, so every rank takes
the same early-stopping decision and ends with identical parameters::

    torchrun --standalone --nproc_per_node=2 your_training_script.py

>>> import torch, flowconvert as fc
>>> class Gauss(torch.nn.Module):   # a 1-d Gaussian with learnable mean, as a tiny "flow"
...     def __init__(self):
...         super().__init__()
...         self.base = fc.DiagonalNormal((1,))
...     def log_prob(self, x, deterministic=False):
...         return self.base.log_prob(x)
>>> flow = Gauss()
>>> history = fit(flow, torch.randn(512, 1) + 3, epochs=60, lr=0.1, progress=False)
>>> round(flow.base.loc.item())
3
>>> history.train_bpd[-1] < history.train_bpd[0]
True
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ._data import as_dataset, first
from .core import FlowLayer, network_training
from .densities import BaseDensity, ConditionalDensity
from .dequantization import Dequantize, nats_to_bits_per_dim, warn_if_discrete
from .errors import InputError
from .evaluation import sum_log_likelihood
from .validation import check_count, check_data, check_positive, tensor_data

__all__ = ["fit", "History", "network_parameter_set"]


@dataclass
class History:
    """What :func:`fit` did: per-epoch mean bits/dim (train: running over the epoch)."""

    epochs: list[int] = field(default_factory=list)
    train_bpd: list[float] = field(default_factory=list)
    val_bpd: list[float] = field(default_factory=list)
    steps: int = 0
    best_epoch: int | None = None  # 0: the starting parameters were best
    #: with the network frozen and no noise added, the epoch each part's parameters come from
    #: (outermost layers and bases by name), when that combination beat ``best_epoch`` held out
    part_best_epochs: dict[str, int] = field(default_factory=dict)
    best_val_bpd: float | None = None
    stopped_early: bool = False
    skipped_steps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def network_parameter_set(flow: nn.Module) -> set[int]:
    """``id`` of every network parameter of every flow layer (what ``train="densities"`` freezes)."""
    ids: set[int] = set()
    for m in flow.modules():
        if isinstance(m, FlowLayer):
            ids.update(id(p) for p in m.network_parameters())
            for name in m.orthogonal_factors:
                if hasattr(m, name):
                    ids.add(id(getattr(m, name)))
    return ids


class _LogProb(nn.Module):
    """``forward(x) = flow.log_prob(x)``, so DistributedDataParallel can wrap the likelihood."""

    def __init__(self, flow: nn.Module, deterministic: bool):
        super().__init__()
        self.flow, self.deterministic = flow, deterministic

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x, deterministic=self.deterministic)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes a gloo group under torchrun when none exists."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loader(data: Any, batch_size: int, shuffle: bool, world: int, rank: int, seed: int) -> DataLoader:
    if isinstance(data, DataLoader):
        if world == 1 or isinstance(data.sampler, DistributedSampler):
            return data
        data, batch_size = data.dataset, data.batch_size or batch_size
    dataset = as_dataset(data)
    if world > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g)


def _reduce(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def natural_scales(flow: nn.Module, params: list[nn.Parameter]) -> list[tuple[nn.Parameter, Tensor]]:
    """``(parameter, unit of its step)`` for the trained density parameters that declare one
    (:meth:`~flowconvert.densities.ConditionalDensity.natural_scales`), read once before training."""
    trained = {id(p) for p in params}
    found = []
    for module in flow.modules():
        if isinstance(module, (ConditionalDensity, BaseDensity)):
            for name, scale in module.natural_scales().items():
                p = module.get_parameter(name)
                if id(p) in trained:
                    found.append((p, scale.to(p.dtype).expand_as(p).clone()))
    return found


def natural_step(optimizer: torch.optim.Optimizer, scaled: list[tuple[nn.Parameter, Tensor]]) -> None:
    r"""``optimizer.step()``, then each update of a scaled parameter multiplied by its unit:
    :math:`\theta \leftarrow \theta_0 + s \odot (\theta_1 - \theta_0)`. For Adam, whose steps have
    about the size of the learning rate whatever the gradient's scale, this is a per-coordinate
    learning rate ``lr * s``: a conditional mean moves in units of its own standard deviation."""
    before = [p.detach().clone() for p, _ in scaled]
    optimizer.step()
    with torch.no_grad():
        for (p, s), p0 in zip(scaled, before):
            p.copy_(p0 + s * (p - p0))


def _checked_inputs(flow, loader, what: str, dequantize) -> Iterator[Tensor]:
    for batch in loader:
        x = first(batch)
        check_data(flow, x, what, dequantize=dequantize)
        yield x


@torch.no_grad()
def _evaluate(flow, loader, dequantize, deterministic, world) -> float:
    """Mean bits/dim on the validation loader (summed over the processes of a distributed run)."""
    batches = _checked_inputs(flow, loader, "a batch of val_data", dequantize)
    total, count, dims = sum_log_likelihood(flow, batches, dequantize=dequantize, deterministic=deterministic)
    total, count = _reduce([total, float(count)], world)
    if count == 0:
        raise InputError("val_data is empty: at least one sample is needed", code="FC604")
    return nats_to_bits_per_dim(-total / count, max(dims, 1))


class _Parts:
    """Per-part early stopping for a frozen network that adds no noise.

    Then ``log p`` is a sum of independent terms: each outermost flow layer's and each base's
    depend on that module's own density parameters only (the values flowing through the network
    do not). Each term keeps the epoch where its own held-out sum was best; the combination is
    at least as good held out as any single epoch's parameters (up to the dequantization noise
    of the held-out pass, checked once at the end)."""

    def __init__(self, flow: nn.Module, params: list[nn.Parameter]):
        from .calibration import _bases, flow_layers

        trained = {id(p) for p in params}
        found = [*flow_layers(flow), *_bases(flow)]
        self.modules = [(name, m) for name, m in found if any(id(p) in trained for p in m.parameters())]
        self.best = [-float("inf")] * len(self.modules)
        self.states: list[dict[str, Tensor] | None] = [None] * len(self.modules)
        self.epochs = [0] * len(self.modules)

    @staticmethod
    def applies(flow: nn.Module, train: str, has_val: bool) -> bool:
        noise = getattr(flow, "noise_shapes", None)
        return train == "densities" and has_val and callable(noise) and not noise() and hasattr(flow, "layers")

    def evaluate(self, flow, loader, dequantize, deterministic, world) -> tuple[float, list[float]]:
        """Mean bits/dim on the loader and each part's held-out sum of its term."""
        from .calibration import observed_calls

        sums = [0.0] * len(self.modules)
        index = {id(m): i for i, (_, m) in enumerate(self.modules)}

        def on_layer(layer, xs, noise, out):
            sums[index[id(layer)]] += out[1].detach().double().sum().item()

        def on_base(base, z, lp):
            sums[index[id(base)]] += lp.detach().double().sum().item()

        layers = [m for _, m in self.modules if isinstance(m, FlowLayer)]
        bases = [m for _, m in self.modules if not isinstance(m, FlowLayer)]
        with observed_calls(layers, on_layer, bases, on_base):
            batches = _checked_inputs(flow, loader, "a batch of val_data", dequantize)
            total, count, dims = sum_log_likelihood(flow, batches, dequantize=dequantize, deterministic=deterministic)
        total, count, *sums = _reduce([total, float(count), *sums], world)
        if count == 0:
            raise InputError("val_data is empty: at least one sample is needed", code="FC604")
        return nats_to_bits_per_dim(-total / count, max(dims, 1)), sums

    def update(self, sums: list[float], epoch: int) -> None:
        for i, value in enumerate(sums):
            if value > self.best[i]:
                self.best[i], self.epochs[i] = value, epoch
                self.states[i] = copy.deepcopy(self.modules[i][1].state_dict())

    def restore(self) -> None:
        for (_, m), state in zip(self.modules, self.states):
            if state is not None:
                m.load_state_dict(state)

    def best_epochs(self) -> dict[str, int]:
        return {name: epoch for (name, _), epoch in zip(self.modules, self.epochs)}


def fit(
    flow: nn.Module,
    data: Any,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    train: str = "densities",
    network_lr: float | None = None,
    val_data: Any = None,
    batch_size: int = 128,
    dequantize: Dequantize | None = None,
    patience: int = 5,
    clip: float | None = 5.0,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    deterministic: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> History:
    """Train ``flow`` by maximum likelihood and return a :class:`History`.

    Args:
        flow: a converted model (anything with ``log_prob(x, deterministic=...)``).
        data: training inputs: a tensor, a Dataset or a DataLoader (labels ignored).
        epochs, lr, batch_size, weight_decay: Adam settings; ``max_steps`` caps the
            total number of optimizer steps (for fixed step budgets).
        train: ``"densities"`` (network frozen, outputs unchanged) or ``"all"``. Training the
            network from a random start works best with a diagonal base
            (``convert(..., base="diagonal")``): a calibrated full covariance fits near-deterministic
            combinations of the random network's outputs, and every step of the network breaks them.
        network_lr: with ``train="all"``, the learning rate of the network's own parameters
            (weights, biases, slopes; default ``lr``). Adam moves every weight by about its
            learning rate per step, so a 64 x 64 identity becomes a dense mixing after a hundred
            steps at ``lr = 1e-3``; a smaller ``network_lr`` lets the densities lead.
        val_data: validation inputs; enables early stopping after ``patience`` epochs
            without improvement and restores the best epoch's parameters. With the network
            frozen and no noise added anywhere, ``log p`` is a sum of independent terms (one per
            layer and base), and each part keeps the epoch where its own held-out term was best
            (``History.part_best_epochs``) when that combination is better held out.
        dequantize: turns integer-level batches into continuous inputs (fresh noise each
            step); its log-determinant is part of the reported bits/dim.
        clip: maximum gradient norm (None: no clipping).
        deterministic: train the deterministic-mode likelihood instead of the bound.
        progress: show a tqdm bar with the running bits/dim (rank 0 only).
        seed: seeds the shuffling and the noise draws; the global random state is left as it was.

    Densities that refine a simpler one (the spline of the ``"flow"`` family on top of its
    heteroscedastic Gaussian) declare those parameters
    (:meth:`~flowconvert.densities.ConditionalDensity.staged_parameters`); ``fit`` then runs in
    two stages: everything else first, to its best held-out epoch, then everything, starting
    there (so with ``val_data`` the result is no worse held out than the first stage). Each
    stage has ``epochs`` and ``patience``; ``max_steps`` caps both together, and the returned
    history runs through both (epochs numbered on).

    Data are checked first (shapes and dtype against the flow, no NaN/Inf, not empty;
    :class:`~flowconvert.errors.InputError`). ``epochs=0`` (or ``max_steps=0``) leaves the
    flow exactly as it was. If training fails (an error in a batch), every parameter and
    buffer is restored to its value before the call; on any exit, interrupts included, the
    flow gets its training mode back and no gradients are left on its parameters.
    """
    if train not in ("densities", "all"):
        raise InputError(f'train must be "densities" or "all", got {train!r}', code="FC604")
    check_count("epochs", epochs, 0)
    check_count("batch_size", batch_size, 1)
    check_count("patience", patience, 0)
    if max_steps is not None:
        check_count("max_steps", max_steps, 0)
    check_positive("lr", lr)
    if network_lr is not None:
        check_positive("network_lr", network_lr)
        if train != "all":
            raise InputError('network_lr needs train="all" (the network is frozen otherwise)', code="FC604")
    for name, given in (("data", data), ("val_data", val_data)):
        if tensor_data(given) is not None:
            check_data(flow, tensor_data(given), name, dequantize=dequantize, empty_ok=False)
    warn_if_discrete(data, dequantize, "fit")
    if epochs == 0 or max_steps == 0:
        return History()
    was_training = flow.training
    had_grad = {id(p) for p in flow.parameters() if p.grad is not None}
    before = _all_tensors(flow)
    try:
        history, stages = History(), _stages(flow, train)
        for i, held_back in enumerate(stages):
            steps_left = None if max_steps is None else max_steps - history.steps
            if steps_left == 0:
                break
            with torch.random.fork_rng(devices=[]):
                stage = _fit(
                    flow,
                    data,
                    epochs=epochs,
                    lr=lr,
                    train=train,
                    network_lr=network_lr,
                    val_data=val_data,
                    batch_size=batch_size,
                    dequantize=dequantize,
                    patience=patience,
                    clip=clip,
                    weight_decay=weight_decay,
                    max_steps=steps_left,
                    deterministic=deterministic,
                    progress=progress,
                    seed=seed,
                    held_back=held_back,
                    desc="fit" if len(stages) == 1 else f"fit, stage {i + 1} of {len(stages)}",
                )
            history = _chain(history, stage)
        if history.steps == history.skipped_steps:
            _restore_tensors(flow, before)  # no step was taken: not even rounding may change
        else:
            flow.density_state = "fitted"  # read by flowconvert export (an untrained flow gets a warning)
        return history
    except Exception:
        _restore_tensors(flow, before)  # nothing half-done
        raise
    finally:
        for p in flow.parameters():
            if id(p) not in had_grad:
                p.grad = None
        flow.train(was_training)


def _stages(flow: nn.Module, train: str) -> list[set[int]]:
    """The parameters each stage of :func:`fit` holds back (``id`` sets): the staged parameters of
    every density (:meth:`~flowconvert.densities.ConditionalDensity.staged_parameters`), then none.
    One stage when no density declares any, or when they are all there is to train."""
    staged: set[int] = set()
    for module in flow.modules():
        if isinstance(module, (ConditionalDensity, BaseDensity)):
            staged.update(id(p) for p in module.staged_parameters() if p.requires_grad)
    frozen = network_parameter_set(flow) if train == "densities" else set()
    trainable = {id(p) for p in flow.parameters() if p.requires_grad and id(p) not in frozen}
    return [staged, set()] if staged and trainable - staged else [set()]


def _chain(first: History, then: History) -> History:
    """One history of two consecutive stages (epochs numbered on; the later stage's best counts,
    since it starts from the earlier one's best: its epoch 0 is where the earlier stage ended)."""
    if not first.epochs and not first.steps:
        return then
    offset = first.epochs[-1] if first.epochs else 0

    def renumber(epoch: int | None, before: int | None) -> int | None:
        return before if epoch == 0 else (None if epoch is None else offset + epoch)

    return History(
        epochs=first.epochs + [offset + e for e in then.epochs],
        train_bpd=first.train_bpd + then.train_bpd,
        val_bpd=first.val_bpd + then.val_bpd,
        steps=first.steps + then.steps,
        best_epoch=renumber(then.best_epoch, first.best_epoch),
        part_best_epochs={
            k: renumber(e, first.part_best_epochs.get(k, first.best_epoch)) for k, e in then.part_best_epochs.items()
        },
        best_val_bpd=then.best_val_bpd,
        stopped_early=then.stopped_early,
        skipped_steps=first.skipped_steps + then.skipped_steps,
        seconds=first.seconds + then.seconds,
    )


def _all_tensors(flow: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter and buffer (non-persistent caches too), by name."""
    tensors = {f"p:{k}": v.detach().clone() for k, v in flow.named_parameters()}
    tensors.update({f"b:{k}": v.detach().clone() for k, v in flow.named_buffers()})
    return tensors


@torch.no_grad()
def _restore_tensors(flow: nn.Module, saved: dict[str, Tensor]) -> None:
    current = {f"p:{k}": v for k, v in flow.named_parameters()}
    current.update({f"b:{k}": v for k, v in flow.named_buffers()})
    for key, value in saved.items():
        t = current.get(key)
        if t is not None and t.shape == value.shape and not torch.equal(t, value):
            t.copy_(value)  # in place: version counters move, so layer caches follow


def _fit(
    flow: nn.Module,
    data: Any,
    *,
    epochs: int,
    lr: float,
    train: str,
    network_lr: float | None,
    val_data: Any,
    batch_size: int,
    dequantize: Dequantize | None,
    patience: int,
    clip: float | None,
    weight_decay: float,
    max_steps: int | None,
    deterministic: bool,
    progress: bool,
    seed: int,
    held_back: set[int] = frozenset(),
    desc: str = "fit",
) -> History:
    rank, world = _distributed()
    torch.manual_seed(seed + rank)  # different dequantization/noise draws per rank
    loader = _loader(data, batch_size, True, world, rank, seed)
    val_loader = _loader(val_data, 512, False, world, rank, seed) if val_data is not None else None
    history = History()
    start = time.perf_counter()
    was_training = flow.training
    flow.train()
    if train == "all":
        context = network_training(flow)
    else:
        context = contextlib.nullcontext([])
    frozen = network_parameter_set(flow)
    frozen_before = [p.detach().clone() for p in flow.parameters() if id(p) in frozen] if train == "densities" else []
    with context:
        if train == "densities":
            params = [p for p in flow.parameters() if p.requires_grad and id(p) not in frozen | held_back]
        else:
            params = [p for p in flow.parameters() if p.requires_grad and id(p) not in held_back]
        if not params:
            raise ValueError("nothing to train: the flow has no trainable density parameters")
        model: nn.Module = _LogProb(flow, deterministic)
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
        groups: list[dict[str, Any]] = [{"params": params}]
        if network_lr is not None:
            groups = [
                {"params": [p for p in params if id(p) not in frozen]},
                {"params": [p for p in params if id(p) in frozen], "lr": network_lr},
            ]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
        scaled = natural_scales(flow, params)
        best_state, bad_epochs = None, 0
        parts = _Parts(flow, params) if _Parts.applies(flow, train, val_loader is not None) else None

        def common_noise():
            """The same held-out dequantization draws at every evaluation: parts are chosen on one sample."""
            stack = contextlib.ExitStack()
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(seed + 7919)
            return stack

        def evaluate(epoch: int) -> float:
            if parts is None:
                return _evaluate(flow, val_loader, dequantize, deterministic, world)
            with common_noise():
                val, sums = parts.evaluate(flow, val_loader, dequantize, deterministic, world)
            parts.update(sums, epoch)
            return val

        if val_loader is not None:  # the starting point competes too: training never makes it worse
            history.best_val_bpd, history.best_epoch = evaluate(0), 0
            best_state = copy.deepcopy(flow.state_dict())
        bar = _progress(epochs, progress and rank == 0, desc)
        for epoch in range(epochs):
            if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                loader.sampler.set_epoch(epoch)
            total, count = 0.0, 0
            for batch in loader:
                x = first(batch)
                check_data(flow, x, "a batch of data", dequantize=dequantize)
                xi = dequantize(x) if dequantize is not None else x
                log_det = dequantize.log_det(x[0].numel()) if dequantize is not None else 0.0
                loss_per = nats_to_bits_per_dim(-(model(xi) + log_det), x[0].numel())
                loss = loss_per.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                if torch.isfinite(loss) and grads_ok:
                    natural_step(optimizer, scaled)
                else:
                    history.skipped_steps += 1
                history.steps += 1
                total += loss_per.detach().double().sum().item()
                count += x.shape[0]
                if bar is not None:
                    bar.set_postfix_str(f"epoch {epoch + 1} train {total / count:.3f} bits/dim")
                if max_steps is not None and history.steps >= max_steps:
                    break
            total, count = _reduce([total, float(count)], world)
            if count == 0:
                raise InputError("data is empty: fit needs at least one training sample", code="FC604")
            history.epochs.append(epoch + 1)
            history.train_bpd.append(total / max(count, 1.0))
            if val_loader is not None:
                val = evaluate(epoch + 1)
                history.val_bpd.append(val)
                if history.best_val_bpd is None or val < history.best_val_bpd:
                    history.best_val_bpd, history.best_epoch, bad_epochs = val, epoch + 1, 0
                    best_state = copy.deepcopy(flow.state_dict())
                else:
                    bad_epochs += 1
                if bar is not None:
                    bar.set_postfix_str(f"train {history.train_bpd[-1]:.3f} val {val:.3f} bits/dim")
            if bar is not None:
                bar.update(1)
            if max_steps is not None and history.steps >= max_steps:
                break
            if val_loader is not None and bad_epochs >= patience:
                history.stopped_early = True
                break
        if bar is not None:
            bar.close()
        if best_state is not None:
            flow.load_state_dict(best_state)
        if parts is not None and history.steps:
            parts.restore()  # each part at its own best epoch
            with common_noise():
                combined = _evaluate(flow, val_loader, dequantize, deterministic, world)
            if combined < history.best_val_bpd:
                history.best_val_bpd, history.part_best_epochs = combined, parts.best_epochs()
            else:
                flow.load_state_dict(best_state)
    for p, before in zip([p for p in flow.parameters() if id(p) in frozen], frozen_before):
        if not torch.equal(p.detach(), before):  # pragma: no cover - a safety net
            raise RuntimeError('train="densities" changed a network parameter; this is a bug')
    flow.train(was_training)
    history.seconds = time.perf_counter() - start
    return history


def _progress(total: int, enabled: bool, desc: str = "fit"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="epoch", desc=desc, leave=True)
