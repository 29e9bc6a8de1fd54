"""The SPEC's correctness obligations, checked on one converted model (for the fuzzer).

:func:`check` converts an :class:`~architectures.Architecture` and returns one
:class:`Outcome` per obligation instead of stopping at the first failure, so that
``benchmarks/fuzz.py`` can count failures per obligation and ``tests/test_fuzz.py`` can
report all of them for the shrunk example. Obligations (SPEC section 8, numbers float64
unless stated):

* ``convert``: the model converts; ``exact_flag``: ``flow.exact`` is what the SPEC predicts.
* ``outputs``: ``flow(x)`` and the deterministic likelihood pass equal ``model(x)`` within
  1e-10 (float64) and 1e-5 (float32); ``bitwise``: ``flow(x)`` is bit-for-bit ``model(x)``.
* ``log_prob``: finite, shape ``(batch,)``; stochastic == deterministic for exact flows;
  explicit zero noise == deterministic.
* ``logdet_model``: for a bijection, ``log_prob(x) = log N(f(x)) + log|det J_f(x)|`` with the
  Jacobian of the *user's model* from autograd; for an exact flow that drops coordinates, the
  generative change of variables: the sampled inverse ``x = g(z, eps)`` (``eps`` the explicit
  inverse noise) is a bijection, so ``log_prob(x) = log N(z) + log N(eps) - log|det J_g|``.
* ``logdet_layers``: the same per layer, on the values the layer sees inside the model
  (bijections: ``L = log|det J|``; funnels: ``L(g(y, eps)) = log N(eps) - log|det J_g|``;
  augmentations: ``L(x, eps) = log|det d y / d(x, eps)| - log N(eps)``), wherever the map is square.
* ``round_trip_model`` / ``round_trip_layers``: ``inverse(forward(x)) == x`` for bijections
  and augmentations (also with noise), ``forward(inverse(z)) == z`` for funnels (sampled and
  mean inverses); the model-level one where the whole model has a direction.
* ``sample``: ``flow.sample`` and both inverses have the input shapes and are finite.
* ``untouched``: the user's model (state dict, training flags, requires_grad, structure) is
  unchanged by conversion, by every call, and by editing the flow's tensors in place.
* ``save_load``: ``fc.load(fc.save(flow))`` reproduces outputs, ``log_prob`` and inverses
  exactly (skipped while ``fc.save`` / ``fc.load`` do not exist).
* ``after_calibrate`` / ``after_fit``: after ``fc.calibrate`` and after a few steps of
  ``fc.fit(train="all")``, ``flow(x)`` and the likelihood pass still agree, every layer
  still meets its log-det and round-trip obligations, ``fc.load(fc.save(flow))`` still
  reproduces it exactly, and the user's model is untouched.
* ``onnx``: float32 export of the likelihood and inverse graphs with noise as inputs, run in
  onnxruntime, equals PyTorch on the same inputs and noise.

Outcomes are ``ok``, ``fail`` or ``skip`` (not applicable, with why). No failure is excused as
known: a fixed defect has its regression test, an open one is a failure.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian

import flowconvert as fc

__all__ = ["OBLIGATIONS", "Outcome", "check", "check_onnx", "randomize_densities"]

OBLIGATIONS = (
    "convert",
    "exact_flag",
    "outputs",
    "bitwise",
    "log_prob",
    "logdet_model",
    "logdet_layers",
    "round_trip_model",
    "round_trip_layers",
    "sample",
    "untouched",
    "save_load",
    "onnx",
    "after_calibrate",
    "after_fit",
)

#: The detail of a round trip (or generative log-det) that fails on a flow with a declared approximate
#: inverse: a bounded activation before a funnel (issue 11, defect 8) makes ``flow.exact_inverse``
#: False, and its round trip is then not promised (a failure on a flow that does not declare it is a failure).
APPROXIMATE_INVERSE = "flow.exact_inverse is False (declared: a bounded activation before a funnel)"

LOG_2PI = math.log(2 * math.pi)


@dataclass
class Outcome:
    status: str  # ok | fail | skip
    detail: str = ""

    def __repr__(self) -> str:
        return f"{self.status}" + (f": {self.detail}" if self.detail else "")


class _Failure(AssertionError):
    pass


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise _Failure(message)


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _maxdiff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _close(a, b, atol: float, rtol: float = 0.0, what: str = "") -> None:
    a, b = _as_tuple(a), _as_tuple(b)
    _require(len(a) == len(b), f"{what}: {len(a)} vs {len(b)} values")
    for i, (p, q) in enumerate(zip(a, b)):
        _require(p.shape == q.shape, f"{what}[{i}]: shape {tuple(p.shape)} vs {tuple(q.shape)}")
        tol = atol + rtol * q.double().abs().max().item() if q.numel() else atol
        _require(bool(torch.isfinite(p).all()), f"{what}[{i}]: not finite")
        d = _maxdiff(p, q)
        _require(d <= tol, f"{what}[{i}]: max abs diff {d:.3g} > {tol:.3g}")


def _std_normal(t: Tensor) -> Tensor:
    """log N(t; 0, I) per sample."""
    flat = t.reshape(t.shape[0], -1)
    return -0.5 * (flat * flat).sum(1) - 0.5 * LOG_2PI * flat.shape[1]


def _base_log_prob(flow, zs) -> Tensor:
    """log p_base(z) per sample, summed over the outputs (the flow's own, learnable base densities)."""
    keys = flow.plan.base_keys
    return torch.stack([flow.bases[k].log_prob(z) for k, z in zip(keys, zs)]).sum(0)


def _flat_cat(values) -> Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for v in values], 1)


def _unflat(v: Tensor, shapes) -> list[Tensor]:
    out, offset = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(v[:, offset : offset + n].reshape(v.shape[0], *s))
        offset += n
    return out


def _slogdet_per_sample(fn: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    """log|det d fn / d v| per row of ``v`` (``fn`` maps (1, n) -> (1, n))."""
    out = []
    for row in v:
        J = jacobian(lambda r: fn(r.reshape(1, -1)).reshape(-1), row.clone())
        _require(J.shape[0] == J.shape[1], f"Jacobian is {tuple(J.shape)}, not square")
        sign, logabs = torch.linalg.slogdet(J)
        _require(sign.item() != 0, "singular Jacobian")
        out.append(logabs)
    return torch.stack(out)


def _trip_close(back, xs, fn: Callable[[Tensor], Tensor], what: str) -> None:
    """``inverse(forward(x)) == x`` to 1e-8, or to the inverse's conditioning: a bijection computed in
    float64 recovers ``x`` only to ``eps * |y| / sigma_min(J)`` (``J`` = d forward / d x), which is large
    where a saturating map (tanh far out) is nearly flat; ``fn`` maps the flattened ``(1, n)`` inputs
    to the flattened outputs."""
    try:
        _close(back, xs, 1e-8, 1e-8, what)
        return
    except _Failure as plain:
        flat = _flat_cat(_as_tuple(xs))
        bounds = []
        for row in flat:
            J = jacobian(lambda r: fn(r.reshape(1, -1)).reshape(-1), row.clone())
            y = fn(row.reshape(1, -1)).detach()
            sigma_min = torch.linalg.svdvals(J).min().item()
            eps = torch.finfo(flat.dtype).eps
            bounds.append(64 * eps * (1.0 + y.abs().max().item()) / max(sigma_min, 1e-300))
        d = _maxdiff(_flat_cat(_as_tuple(back)), flat)
        _require(
            d <= 1e-8 * (1 + flat.abs().max().item()) + max(bounds), f"{plain} (conditioning allows {max(bounds):.3g})"
        )


def _logdet_close(got: Tensor, expected: Tensor, what: str) -> None:
    d = (got - expected).abs()
    tol = 1e-7 * expected.abs().clamp_min(1.0)
    _require(bool((d <= tol).all()), f"{what}: log-density {got.tolist()} vs autograd {expected.tolist()}")


# -- the user's model ------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "structure": repr(model),
        "types": [(n, type(m)) for n, m in model.named_modules()],
    }


def _compare_snapshot(model: nn.Module, before: dict) -> None:
    now = _snapshot(model)
    _require(
        now["structure"] == before["structure"] and now["types"] == before["types"], "the model's structure changed"
    )
    _require(now["training"] == before["training"], "training flags changed")
    _require(now["grad"] == before["grad"], "requires_grad flags changed")
    _require(set(now["state"]) == set(before["state"]), "state dict keys changed")
    for k, v in before["state"].items():
        _require(torch.equal(now["state"][k], v) and now["state"][k].dtype == v.dtype, f"state entry {k!r} changed")


def randomize_densities(flow: nn.Module, seed: int = 0) -> None:
    """Move every trainable (density) parameter away from its initial value, as calibration would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.25 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# -- recording what each layer sees ------------------------------------------------------------------
def _record_layer_inputs(flow, x: Tensor) -> list[tuple[str, nn.Module, tuple]]:
    """Run the deterministic likelihood pass, recording each top-level layer's inputs."""
    records: list[tuple[str, nn.Module, tuple]] = []
    layers = dict(flow.layers.items())
    for name, layer in layers.items():
        original = layer.call_and_ll

        def recorder(*xs, _name=name, _layer=layer, _orig=original, **kw):
            records.append((_name, _layer, tuple(t.detach() for t in xs[: _layer.num_inputs])))
            return _orig(*xs, **kw)

        layer.__dict__["call_and_ll"] = recorder
    try:
        with torch.no_grad():
            flow.forward_with_log_prob(x, deterministic=True)
    finally:
        for layer in layers.values():
            layer.__dict__.pop("call_and_ll", None)
    return records


def _layer_checks(
    name: str, layer: nn.Module, xs: tuple[Tensor, ...], gen: torch.Generator
) -> tuple[list[str], list[str]]:
    """Per-layer log-det and round-trip checks; returns (log-det failures, round-trip failures)."""
    logdet_fail, trip_fail = [], []
    xs = tuple(t[:2].clone() for t in xs)
    in_shapes = [tuple(t.shape[1:]) for t in xs]
    with torch.no_grad():
        y, ll = layer.call_and_ll(*xs)
    ys = _as_tuple(y)
    out_shapes = [tuple(t.shape[1:]) for t in ys]
    fwd = layer.noise_shape(in_shapes[0])
    inv = layer.inverse_noise_shape(out_shapes[0])
    n_in, n_out = sum(map(math.prod, in_shapes)), sum(map(math.prod, out_shapes))
    randn = lambda shape: torch.randn((xs[0].shape[0], *shape), generator=gen, dtype=torch.float64).to(xs[0].dtype)
    what = f"{name} ({type(layer).__name__})"

    def run(fn, bucket):
        try:
            fn()
        except _Failure as err:
            bucket.append(f"{what}: {err}")

    if fwd is None and inv is None:  # a bijection

        def logdet():
            _require(n_in == n_out, f"no noise in either direction, but {n_in} -> {n_out} coordinates")
            f = lambda v: _flat_cat(_as_tuple(layer.call_and_ll(*_unflat(v, in_shapes))[0]))
            # nudged off the kinks of piecewise maps (a value can be exactly 0, e.g. ELU(x) - x for x > 0)
            nudged = tuple(t + 1e-6 * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in xs)
            with torch.no_grad():
                ll_nudged = layer.call_and_ll(*nudged)[1]
            _logdet_close(ll_nudged, _slogdet_per_sample(f, _flat_cat(nudged)), what)

        def trip():
            with torch.no_grad():
                back = _as_tuple(layer.inverse(*ys))
            f = lambda v: _flat_cat(_as_tuple(layer.call_and_ll(*_unflat(v, in_shapes))[0]))
            _trip_close(back, xs, f, "inverse(forward(x))")

        run(logdet, logdet_fail)
        run(trip, trip_fail)
    elif fwd is None:  # a funnel: forward(inverse(y)) == y, generative change of variables
        eps = randn(inv)

        def trip():
            with torch.no_grad():
                for sample in (True, False):
                    back = _as_tuple(layer.inverse(*ys, sample=sample, noise=eps if sample else None))
                    _close(
                        _as_tuple(layer.call_and_ll(*back)[0]), ys, 1e-8, 1e-8, f"forward(inverse(y, sample={sample}))"
                    )

        def logdet():
            if n_out + math.prod(inv) != n_in:
                return  # not a bijection in (y, eps) (e.g. max pooling): not applicable
            shapes = [*out_shapes, inv]
            g = lambda v: _flat_cat(
                _as_tuple(layer.inverse(*_unflat(v, shapes)[:-1], sample=True, noise=_unflat(v, shapes)[-1]))
            )
            with torch.no_grad():
                x2 = _as_tuple(layer.inverse(*ys, sample=True, noise=eps))
                ll2 = layer.call_and_ll(*x2)[1]
            expected = _std_normal(eps) - _slogdet_per_sample(g, _flat_cat([*ys, eps]))
            _logdet_close(ll2, expected, what)

        run(trip, trip_fail)
        run(logdet, logdet_fail)
    elif inv is None:  # an augmentation: inverse(forward(x, eps)) == x
        eps = randn(fwd)

        def trip():
            with torch.no_grad():
                for noise in (None, eps, torch.zeros_like(eps)):
                    out = _as_tuple(layer.call_and_ll(*xs, noise=noise)[0])
                    _close(
                        _as_tuple(layer.inverse(*out, sample=False)),
                        xs,
                        1e-8,
                        1e-8,
                        f"inverse(forward(x, noise={'given' if noise is not None else None}))",
                    )
                y0, ll0 = layer.call_and_ll(*xs, noise=torch.zeros_like(eps))
                _close(ll0, ll, 1e-9, 1e-9, "log-likelihood at zero noise vs deterministic")
                _close(_as_tuple(y0), ys, 1e-12, 0, "output at zero noise vs deterministic")

        def logdet():
            if n_in + math.prod(fwd) != n_out:
                return  # the noise is not a coordinate system of the added part (e.g. tiling): n/a
            shapes = [*in_shapes, fwd]
            f = lambda v: _flat_cat(
                _as_tuple(layer.call_and_ll(*_unflat(v, shapes)[:-1], noise=_unflat(v, shapes)[-1])[0])
            )
            with torch.no_grad():
                ll2 = layer.call_and_ll(*xs, noise=eps)[1]
            expected = _slogdet_per_sample(f, _flat_cat([*xs, eps])) - _std_normal(eps)
            _logdet_close(ll2, expected, what)

        run(trip, trip_fail)
        run(logdet, logdet_fail)
    # layers with noise in both directions (padded convolutions that also drop) have no
    # stated round trip; their zero-noise consistency is checked on the whole model
    return logdet_fail, trip_fail


# -- the whole model -----------------------------------------------------------------------------
def _model_logdet_and_trip(arch, flow, x: Tensor, gen: torch.Generator) -> tuple[Outcome, Outcome]:
    fwd, inv = flow.noise_shapes(), flow.inverse_noise_shapes()
    in_shapes = list(flow.input_shapes)
    n_in = sum(map(math.prod, in_shapes))
    with torch.no_grad():
        z = _as_tuple(flow(x))
    out_shapes = [tuple(t.shape[1:]) for t in z]
    n_out = sum(map(math.prod, out_shapes))
    xs = x[:2]
    zs = tuple(t[:2] for t in z)
    # a bounded activation before a funnel: the flow declares its approximate inverse
    # (flow.exact_inverse False) and then the funnel's round trip (and the change of variables
    # through it) is not promised; a failure the flow does not declare is a failure
    declared = not flow.exact_inverse

    def unpromised(err: _Failure) -> Outcome:
        if declared:
            return Outcome("skip", f"{APPROXIMATE_INVERSE}: {err}")
        return Outcome("fail", f"{err} (flow.exact_inverse is True)" if arch.range_hazard else str(err))

    if not fwd and not inv:  # a bijection: autograd on the user's model
        try:
            _require(n_in == n_out, f"no noise, but {n_in} -> {n_out} coordinates")
            f = lambda v: _flat_cat(_as_tuple(arch.model(v.reshape(1, *arch.input_shape))))
            with torch.no_grad():
                lp = flow.log_prob(xs, deterministic=True)
            expected = _base_log_prob(flow, zs) + _slogdet_per_sample(f, xs.reshape(2, -1))
            _logdet_close(lp, expected, "model")
            logdet = Outcome("ok", "bijection: autograd Jacobian of the model")
        except _Failure as err:
            logdet = Outcome("fail", str(err))
        try:
            with torch.no_grad():
                back = flow.inverse(*z, sample=False)
            f = lambda v: _flat_cat(_as_tuple(arch.model(v.reshape(-1, *arch.input_shape))))
            _trip_close(back, x, f, "inverse(forward(x))")
            trip = Outcome("ok", "bijection")
        except _Failure as err:
            trip = Outcome("fail", str(err))
        return logdet, trip

    if not fwd:  # exact, drops coordinates: forward(inverse(z)) == z; generative change of variables
        eps = {k: torch.randn((2, *s), generator=gen, dtype=torch.float64).to(x.dtype) for k, s in inv.items()}
        try:
            with torch.no_grad():
                for sample in (True, False):
                    back = flow.inverse(*zs, sample=sample, noise=eps if sample else None)
                    _close(_as_tuple(flow(back)), zs, 1e-8, 1e-8, f"forward(inverse(z, sample={sample}))")
            trip = Outcome("ok", "funnel")
        except _Failure as err:
            trip = unpromised(err)
        n_eps = sum(map(math.prod, inv.values()))
        if n_out + n_eps != n_in:
            return Outcome(
                "skip",
                f"the sampled inverse is not a bijection of (z, eps) ({n_out}+{n_eps} -> {n_in}), e.g. max pooling",
            ), trip
        try:
            keys = list(inv)
            shapes = [*out_shapes, *(inv[k] for k in keys)]

            def g(v):
                parts = _unflat(v, shapes)
                noise = dict(zip(keys, parts[len(out_shapes) :]))
                return _flat_cat(_as_tuple(flow.inverse(*parts[: len(out_shapes)], sample=True, noise=noise)))

            with torch.no_grad():
                x2 = flow.inverse(*zs, sample=True, noise=eps)
                lp = flow.log_prob(*_as_tuple(x2), deterministic=True)
            v = _flat_cat([*zs, *(eps[k] for k in keys)])
            expected = (
                _base_log_prob(flow, zs) + _std_normal(_flat_cat([eps[k] for k in keys])) - _slogdet_per_sample(g, v)
            )
            _logdet_close(lp, expected, "model (generative change of variables)")
            logdet = Outcome("ok", "funnel: generative change of variables")
        except _Failure as err:
            logdet = unpromised(err)
        return logdet, trip

    if not inv:  # augmentations only: inverse(forward(x, eps)) == x
        eps = {k: torch.randn((x.shape[0], *s), generator=gen, dtype=torch.float64).to(x.dtype) for k, s in fwd.items()}
        try:
            with torch.no_grad():
                for noise in (None, eps):
                    out = flow.forward_with_log_prob(x, deterministic=noise is None, noise=noise)[0]
                    _close(
                        _as_tuple(flow.inverse(*_as_tuple(out), sample=False)),
                        (x,),
                        1e-8,
                        1e-8,
                        f"inverse(forward(x, {'noise' if noise else 'deterministic'}))",
                    )
            trip = Outcome("ok", "augmentation")
        except _Failure as err:
            trip = Outcome("fail", str(err))
        return Outcome("skip", "bound: checked per layer"), trip

    return Outcome("skip", "noise in both directions: checked per layer"), Outcome(
        "skip", "no whole-model direction: per layer"
    )


# -- ONNX -------------------------------------------------------------------------------------------
def check_onnx(arch, seed: int = 0, batch: int = 3) -> Outcome:
    """Only the ONNX obligation (float32 export of both graphs, noise as inputs, onnxruntime vs PyTorch)."""
    try:
        return _onnx(arch, arch.inputs(batch, seed=seed + 1), seed)
    except Exception as err:
        return Outcome("fail", f"crash: {type(err).__name__}: {str(err)[:400]}")


def _onnx(arch, x64: Tensor, seed: int) -> Outcome:
    import onnxruntime as ort

    from flowconvert.export import export_onnx

    model = copy.deepcopy(arch.model).float()
    x = x64.float()
    flow = fc.convert(model, x[:1])
    randomize_densities(flow, seed)
    flow64 = copy.deepcopy(flow).double()
    gen = torch.Generator().manual_seed(seed)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for graph in ("likelihood", "inverse"):
            with torch.no_grad():
                data = (x,) if graph == "likelihood" else _as_tuple(flow(x))
            shapes = flow.noise_shapes() if graph == "likelihood" else flow.inverse_noise_shapes()
            eps = {k: torch.randn((x.shape[0], *s), generator=gen) for k, s in shapes.items()}
            try:
                result = export_onnx(flow, Path(tmp) / f"{graph}.onnx", x, graph=graph, noise="input")
            except Exception as err:
                problems.append(f"{graph}: export failed: {type(err).__name__}: {str(err)[:300]}")
                continue
            session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
            feeds = {name: t.numpy() for name, t in zip(result.input_names, data)}
            feeds.update({name: eps[key].numpy() for name, key in result.noise_inputs.items()})
            got = [torch.from_numpy(g) for g in session.run(None, feeds)]
            with torch.no_grad():
                if graph == "likelihood":
                    out, lp = flow.forward_with_log_prob(x, deterministic=False, noise=eps)
                    out64, lp64 = flow64.forward_with_log_prob(
                        x.double(), deterministic=False, noise={k: v.double() for k, v in eps.items()}
                    )
                    expected, exact = [*_as_tuple(out), lp], [*_as_tuple(out64), lp64]
                else:
                    expected = list(_as_tuple(flow.inverse(*data, sample=True, noise=eps)))
                    exact = list(
                        _as_tuple(
                            flow64.inverse(
                                *(d.double() for d in data), sample=True, noise={k: v.double() for k, v in eps.items()}
                            )
                        )
                    )
            if len(got) != len(expected):
                problems.append(f"{graph}: {len(got)} outputs, PyTorch has {len(expected)}")
                continue
            for i, (g, e, r) in enumerate(zip(got, expected, exact)):
                # onnxruntime may round differently from PyTorch in float32; allow 1e-4 relative,
                # or 3x PyTorch's own float32 error against float64 where that is larger
                tol = max(1e-4 * max(1.0, e.abs().max().item()), 3 * _maxdiff(e, r))
                d = _maxdiff(g, e) if g.shape == e.shape else math.inf
                if not d <= tol:
                    problems.append(f"{graph} output {i}: onnxruntime vs PyTorch max abs diff {d:.3g} > {tol:.3g}")
    return Outcome("fail", "; ".join(problems)) if problems else Outcome("ok")


# -- after calibration and training -------------------------------------------------------------------
def _consistent(flow, x: Tensor, gen: torch.Generator, what: str) -> None:
    with torch.no_grad():
        direct = _as_tuple(flow(x))
        out, lp = flow.forward_with_log_prob(x, deterministic=True)
    scale = max(1.0, max(t.abs().max().item() for t in direct))
    _close(_as_tuple(out), direct, 1e-10 * scale, 0, f"{what}: likelihood pass vs flow(x)")
    _require(bool(torch.isfinite(lp).all()), f"{what}: log_prob not finite")
    problems = []
    for name, layer, xs in _record_layer_inputs(flow, x):
        a, b = _layer_checks(name, layer, xs, gen)
        problems += a + b
    _require(not problems, f"{what}: " + "; ".join(problems))


def _after_training(arch, flow, x: Tensor, seed: int, results: dict) -> None:
    gen = torch.Generator().manual_seed(seed + 11)
    data = arch.inputs(64, seed=seed + 7)
    before = _snapshot(arch.model)

    def calibrated():
        fc.calibrate(flow, data, seed=seed)
        _consistent(flow, x, gen, "after calibrate")
        _save_load(flow, x, gen)
        _compare_snapshot(arch.model, before)

    def fitted():
        trainable = any(m.network_parameters() for m in flow.modules() if isinstance(m, fc.FlowLayer))
        if not trainable and not any(p.requires_grad for p in flow.parameters()):
            try:
                fc.fit(flow, data, epochs=1, train="all", max_steps=1, progress=False)
            except ValueError as err:
                return Outcome("skip", f"nothing to train ({err})")
            raise _Failure("fit(train='all') of a flow without parameters did not refuse")
        params = [p for m in flow.modules() if isinstance(m, fc.FlowLayer) for p in m.network_parameters()]
        start = [p.detach().clone() for p in params]
        fc.fit(flow, data, epochs=1, train="all", lr=1e-2, batch_size=32, max_steps=3, progress=False, seed=seed)
        with torch.no_grad():
            moved = any(not torch.equal(a, b) for a, b in zip(_as_tuple(flow(x)), _as_tuple(arch.model(x))))
        trained = any(not torch.equal(p, q) for p, q in zip(params, start))
        _require(moved or not trained, "fit(train='all') changed the network's parameters but not flow(x)")
        _consistent(flow, x, gen, "after fit(train='all')")
        _save_load(flow, x, gen)
        _compare_snapshot(arch.model, before)

    for name, fn in (("after_calibrate", calibrated), ("after_fit", fitted)):
        try:
            results[name] = fn() or Outcome("ok")
        except _Failure as err:
            results[name] = Outcome("fail", str(err))
        except Exception as err:
            results[name] = Outcome("fail", f"crash: {type(err).__name__}: {str(err)[:400]}")


# -- save / load ----------------------------------------------------------------------------------------
def _save_load(flow, x: Tensor, gen: torch.Generator) -> Outcome:
    if not (callable(getattr(fc, "save", None)) and callable(getattr(fc, "load", None))):
        return Outcome("skip", "fc.save / fc.load are not available yet")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flow"
        fc.save(flow, path)
        saved = [p for p in Path(tmp).iterdir()]
        loaded = fc.load(saved[0] if len(saved) == 1 and not path.exists() else path)
    with torch.no_grad():
        _close_exact = lambda a, b, what: _require(
            all(torch.equal(p, q) for p, q in zip(_as_tuple(a), _as_tuple(b)))
            and len(_as_tuple(a)) == len(_as_tuple(b)),
            f"{what} differs after save/load",
        )
        _close_exact(loaded(x), flow(x), "flow(x)")
        _close_exact(loaded.log_prob(x, deterministic=True), flow.log_prob(x, deterministic=True), "log_prob")
        z = _as_tuple(flow(x))
        _close_exact(loaded.inverse(*z, sample=False), flow.inverse(*z, sample=False), "inverse(z, sample=False)")
        inv = {
            k: torch.randn((x.shape[0], *s), generator=gen, dtype=torch.float64).to(x.dtype)
            for k, s in flow.inverse_noise_shapes().items()
        }
        _close_exact(
            loaded.inverse(*z, sample=True, noise=inv), flow.inverse(*z, sample=True, noise=inv), "inverse(z, noise)"
        )
        fwd = {
            k: torch.randn((x.shape[0], *s), generator=gen, dtype=torch.float64).to(x.dtype)
            for k, s in flow.noise_shapes().items()
        }
        _close_exact(
            loaded.forward_with_log_prob(x, deterministic=False, noise=fwd)[1],
            flow.forward_with_log_prob(x, deterministic=False, noise=fwd)[1],
            "log_prob with noise",
        )
    return Outcome("ok")


# -- everything ----------------------------------------------------------------------------------------
def check(arch, *, onnx: bool = False, train: bool = False, batch: int = 3, seed: int = 0) -> dict[str, Outcome]:
    """Convert ``arch.model`` and check every obligation; ``onnx=True`` adds the (slow) ONNX parity,
    ``train=True`` the checks after calibration and training (on a second conversion)."""
    results: dict[str, Outcome] = {}
    gen = torch.Generator().manual_seed(seed)
    model = arch.model
    x = arch.inputs(batch, seed=seed + 1)
    before = _snapshot(model)

    def attempt(name: str, fn: Callable[[], Outcome | None]) -> None:
        try:
            out = fn()
            results[name] = out if isinstance(out, Outcome) else Outcome("ok")
        except _Failure as err:
            results[name] = Outcome("fail", str(err))
        except Exception as err:
            results[name] = Outcome("fail", f"crash: {type(err).__name__}: {str(err)[:400]}")

    try:
        flow = fc.convert(model, x[:1])
        results["convert"] = Outcome("ok")
    except Exception as err:
        results["convert"] = Outcome("fail", f"{type(err).__name__}: {str(err)[:600]}")
        for name in OBLIGATIONS[1:]:
            results[name] = Outcome("skip", "no flow")
        attempt("untouched", lambda: _compare_snapshot(model, before))
        return results

    attempt(
        "exact_flag",
        lambda: _require(flow.exact == arch.exact, f"flow.exact is {flow.exact}, the SPEC predicts {arch.exact}"),
    )

    def outputs():
        with torch.no_grad():
            expected = _as_tuple(model(x))
            _close(_as_tuple(flow(x)), expected, 1e-10, 0, "flow(x) vs model(x)")
            _close(
                _as_tuple(flow.forward_with_log_prob(x, deterministic=True)[0]),
                expected,
                1e-10,
                0,
                "likelihood pass vs model(x)",
            )
            m32 = copy.deepcopy(model).float()
            x32 = x.float()
            flow32 = fc.convert(m32, x32[:1])
            e32 = _as_tuple(m32(x32))
            _close(_as_tuple(flow32(x32)), e32, 1e-5, 0, "float32 flow(x) vs model(x)")
            _close(
                _as_tuple(flow32.forward_with_log_prob(x32, deterministic=True)[0]),
                e32,
                1e-5,
                0,
                "float32 likelihood pass",
            )
            results["_bitwise32"] = all(torch.equal(a, b) for a, b in zip(_as_tuple(flow32(x32)), e32))

    attempt("outputs", outputs)

    def bitwise():
        with torch.no_grad():
            same = all(torch.equal(a, b) for a, b in zip(_as_tuple(flow(x)), _as_tuple(model(x))))
        same32 = results.pop("_bitwise32", True)
        if same and same32:
            return Outcome("ok")
        return Outcome("fail", f"flow(x) is not bit-for-bit model(x) (float64 equal: {same}, float32 equal: {same32})")

    attempt("bitwise", bitwise)
    results.pop("_bitwise32", None)
    randomize_densities(flow, seed)

    def log_prob():
        with torch.no_grad():
            det = flow.log_prob(x, deterministic=True)
            _require(
                det.shape == (x.shape[0],) and det.dtype == x.dtype,
                f"log_prob shape {tuple(det.shape)} dtype {det.dtype}",
            )
            _require(bool(torch.isfinite(det).all()), f"log_prob not finite: {det.tolist()}")
            sto = flow.log_prob(x, deterministic=False)
            _require(bool(torch.isfinite(sto).all()), "stochastic log_prob not finite")
            if flow.exact:
                _close(sto, det, 1e-9, 1e-9, "exact flow: stochastic vs deterministic log_prob")
            zeros = {k: torch.zeros((x.shape[0], *s), dtype=x.dtype) for k, s in flow.noise_shapes().items()}
            out0, lp0 = flow.forward_with_log_prob(x, deterministic=False, noise=zeros)
            _close(lp0, det, 1e-9, 1e-9, "log_prob at zero noise vs deterministic")
            _close(_as_tuple(out0), _as_tuple(flow(x)), 1e-12, 0, "outputs at zero noise")
            if not flow.exact:
                _require(
                    bool(torch.isfinite(flow.log_prob(x, num_samples=3)).all()),
                    "importance-weighted log_prob not finite",
                )

    attempt("log_prob", log_prob)

    def model_level():
        logdet, trip = _model_logdet_and_trip(arch, flow, x, gen)
        results["round_trip_model"] = trip
        return logdet

    attempt("logdet_model", model_level)
    results.setdefault("round_trip_model", results["logdet_model"])

    def layer_level():
        records = _record_layer_inputs(flow, x)
        logdet_fail, trip_fail = [], []
        for name, layer, xs in records:
            a, b = _layer_checks(name, layer, xs, gen)
            logdet_fail += a
            trip_fail += b
        results["round_trip_layers"] = (
            Outcome("fail", "; ".join(trip_fail)) if trip_fail else Outcome("ok", f"{len(records)} layers")
        )
        return Outcome("fail", "; ".join(logdet_fail)) if logdet_fail else Outcome("ok", f"{len(records)} layers")

    attempt("logdet_layers", layer_level)
    results.setdefault("round_trip_layers", results["logdet_layers"])

    def sample():
        with torch.no_grad():
            z = _as_tuple(flow(x))
            for s in (True, False):
                back = _as_tuple(flow.inverse(*z, sample=s))
                _require(
                    len(back) == 1 and back[0].shape == x.shape,
                    f"inverse(sample={s}) shapes {[tuple(b.shape) for b in back]}",
                )
            draws = _as_tuple(flow.sample(2))
            _require(
                len(draws) == 1 and draws[0].shape == (2, *x.shape[1:]),
                f"sample shapes {[tuple(d.shape) for d in draws]}",
            )
            _require(all(bool(torch.isfinite(d).all()) for d in draws), "samples not finite")

    attempt("sample", sample)
    attempt("save_load", lambda: _save_load(flow, x, gen))
    if onnx:
        attempt("onnx", lambda: _onnx(arch, x, seed))
    else:
        results["onnx"] = Outcome("skip", "not sampled for ONNX")

    def untouched():
        _compare_snapshot(model, before)
        with torch.no_grad():  # the flow shares no storage with the model
            for t in [*flow.parameters(), *flow.buffers()]:
                if t.is_floating_point() and t.numel():
                    t.add_(1.0)
        _compare_snapshot(model, before)

    attempt("untouched", untouched)
    if train:
        try:
            second = fc.convert(model, x[:1])
            _after_training(arch, second, x, seed, results)
        except Exception as err:
            results["after_calibrate"] = results["after_fit"] = Outcome("fail", f"crash: {type(err).__name__}: {err}")
    else:
        results["after_calibrate"] = results["after_fit"] = Outcome("skip", "not sampled for training")
    return {name: results[name] for name in OBLIGATIONS}
