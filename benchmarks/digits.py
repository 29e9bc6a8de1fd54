"""Test bits/dim on scikit-learn's digits, every model in one run, one table.

    python benchmarks/digits.py [--steps 1500] [--seed 0] [--threads 1] [--quick]

Split: the fixed train/test split of ``flowconvert.demo.load_digits_split``, with a validation
split carved from train (``carve_validation``). Every hyperparameter choice and early stopping
uses validation; the test split is scored once per model, at the end. All figures are bounds
on the discrete log-likelihood, dequantized as (k + u) / 17, so the -D log 17 term is
included and every figure compares with the discrete models:

  * uniform over the 17 levels (log2 17 = 4.09) and an independent per-pixel categorical model;
  * zuko's neural spline flow on the pixels (benchmark only), ``--steps`` steps, early stopping;
  * each pretrained classifier (the demo's MLP, another MLP, the demo's 2x2 CNN), converted with
    flowconvert under each density family, calibrated and densities fitted, network frozen;
  * a flowified MLP (bijective 64-64-64) trained fully, ``--steps`` steps (same split and budget
    as the NSF): with a diagonal Gaussian base from a random start, and with a spline-flow base
    of the NSF's size (3 transforms, 128-128 hidden) from the identity (``DigitsFlowMLP(identity=True)``),
    the NSF's learning rate for the densities and ``network_lr = 3e-5`` for the network.

Then samples at T = 1 and the default temperature (fraction of pixel values in [-0.05, 1.05],
recognition by a separately trained logistic regression relative to real test digits), where the
best frozen flow's samples leave the data (sampling started from the real output of each layer in
turn, :func:`samples_from_each_depth`), AUROC of log p against the classifier's max-softmax
baseline on out-of-distribution sets, and wall times. Needs zuko (a dependency of flowconvert's
"flow" family).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import flowconvert as fc
from flowconvert.demo import (
    DEFAULT_TEMPERATURE,
    IW_SAMPLES,
    LEVELS,
    DigitsFlowMLP,
    DigitsMLP,
    DigitsTileCNN,
    baseline_rows,
    carve_validation,
    convert_and_fit,
    format_table,
    iw_bits_per_dim,
    load_digits_split,
    ood_auroc,
    sample_quality,
    softmax_auroc,
    train_classifier,
)

D = 64


def zuko_nsf(data, deq, steps: int, batch: int, seed: int, patience: int = 8):
    """zuko NSF on the pixels; early stopping on validation (checked every epoch)."""
    import copy

    import zuko

    torch.manual_seed(seed)
    flow = zuko.flows.NSF(D, transforms=3, hidden_features=(128, 128))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

    class Wrapped(nn.Module):
        @torch.no_grad()
        def log_prob(self, x, deterministic=False):
            return flow().log_prob(x)

    wrapped = Wrapped()
    best, best_state, bad, step = float("inf"), None, 0, 0
    while step < steps and bad < patience:
        for idx in torch.randperm(len(data.train_x)).split(batch):
            loss = -flow().log_prob(deq(data.train_x[idx])).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            opt.step()
            step += 1
            if step >= steps:
                break
        val = fc.bits_per_dim(wrapped, data.val_x, dequantize=deq)
        if val < best:
            best, best_state, bad = val, copy.deepcopy(flow.state_dict()), 0
        else:
            bad += 1
    flow.load_state_dict(best_state)
    return wrapped, best, step


@torch.no_grad()
def samples_from_each_depth(flow, data, deq, temperature: float, seed: int = 0) -> list[tuple[str, float]] | None:
    """Where a frozen flow's samples leave the data: for a flow that is a chain of one-input layers,
    start from the *real* output of layer ``k`` on the test digits, invert layers ``k, ..., 1``
    with sampled dropped coordinates (standard-normal draws scaled by ``temperature``) and return,
    for each ``k``, the fraction of pixel values in ``[-0.05, 1.05]``. ``k = 0`` (the real inputs)
    is 1; a drop from ``k`` to ``k + 1`` is what sampling through layer ``k + 1`` costs, the errors
    of its conditional amplified by every inverse below it. None for a flow that is not a chain."""
    torch.manual_seed(seed)
    x = deq(data.test_x)
    layers = list(flow.layers.named_children())
    acts = [x]
    for _, layer in layers:
        if getattr(layer, "num_inputs", 1) != 1 or getattr(layer, "num_outputs", 1) != 1:
            return None
        acts.append(layer(acts[-1]))
    if not torch.equal(acts[-1], flow(x)):  # not a chain in this order
        return None
    rows = []
    for k in range(len(layers), -1, -1):
        v = acts[k]
        for _, layer in reversed(layers[:k]):
            shape = layer.inverse_noise_shape(tuple(v.shape[1:]))
            noise = None if shape is None else temperature * torch.randn(v.shape[0], *shape, dtype=v.dtype)
            v = layer.inverse(v, sample=True, noise=noise)
        inside = ((v >= -0.05) & (v <= 1.05) & torch.isfinite(v)).double().mean().item()
        rows.append((f"{layers[k - 1][0]} ({type(layers[k - 1][1]).__name__})" if k else "the input", inside))
    return rows


class OtherMLP(nn.Sequential):
    """A classifier of similar size that is not the demo's: 64 -> 40 -> 40 -> 10, LeakyReLU(0.1)."""

    def __init__(self):
        super().__init__(nn.Linear(64, 40), nn.LeakyReLU(0.1), nn.Linear(40, 40), nn.LeakyReLU(0.1), nn.Linear(40, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=1500, help="optimizer steps for the NSF and the fully trained flow"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--quick", action="store_true", help="few epochs everywhere (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = carve_validation(load_digits_split(seed=args.seed), seed=args.seed)
    deq = fc.Dequantize(LEVELS)
    q = 0.1 if args.quick else 1.0
    steps = max(20, int(args.steps * q))
    rows, flows, nets = [], {}, {}
    print(
        f"digits: {len(data.train_x)} train / {len(data.val_x)} validation / {len(data.test_x)} test; "
        f"{args.threads} thread(s); step budget {steps} x batch {args.batch}",
        flush=True,
    )
    rows += baseline_rows(data)

    t = time.perf_counter()
    nsf, nsf_val, nsf_steps = zuko_nsf(data, deq, steps, args.batch, args.seed)
    rows.append(
        (
            f"zuko NSF on pixels ({nsf_steps} steps)",
            nsf_val,
            fc.bits_per_dim(nsf, data.test_x, dequantize=deq),
            time.perf_counter() - t,
            iw_bits_per_dim(nsf, data.test_x, deq),
        )
    )
    print(f"  NSF done: validation {nsf_val:.3f}", flush=True)

    fit_seconds = {}
    for name, make in (("demo MLP", DigitsMLP), ("other MLP", OtherMLP), ("demo CNN", DigitsTileCNN)):
        torch.manual_seed(args.seed)
        net = make()
        acc = train_classifier(net, data, deq, epochs=20, seed=args.seed)
        nets[name] = net
        print(f"{name} classifier: test accuracy {acc:.3f}", flush=True)
        for density in ("gaussian", "mlp", "flow"):
            epochs = max(1, int(60 * q))
            flow, h, secs = convert_and_fit(net, data, deq, density, epochs=epochs)
            key = f"{name}, frozen, density={density!r}"
            test = fc.bits_per_dim(flow, data.test_x, dequantize=deq)
            rows.append((key, h.best_val_bpd, test, secs, iw_bits_per_dim(flow, data.test_x, deq)))
            flows[key], fit_seconds[key] = flow, secs
            with torch.no_grad():
                same = torch.equal(flow(deq.center(data.test_x)), net(deq.center(data.test_x)))
            print(
                f"  {key:<44} validation {h.best_val_bpd:.3f} ({h.steps} steps, {secs:.0f}s), outputs unchanged: {same}",
                flush=True,
            )

    per_epoch = math.ceil(len(data.train_x) / args.batch)

    def trained_fully(key: str, label: str, make, density: str, **options) -> None:
        """A flowified network (built by ``make`` after seeding) trained fully on the NSF's split,
        step budget and patience."""
        torch.manual_seed(args.seed)
        flow, h, secs = convert_and_fit(
            make(),
            data,
            deq,
            density,
            epochs=math.ceil(steps / per_epoch),
            max_steps=steps,
            batch_size=args.batch,
            train="all",
            patience=8,
            **options,
        )
        test = fc.bits_per_dim(flow, data.test_x, dequantize=deq)
        iw = iw_bits_per_dim(flow, data.test_x, deq)
        rows.append((f"{label}, trained fully ({h.steps} steps)", h.best_val_bpd, test, secs, iw))
        flows[key] = flow

    def nsf_sized_base(shape):
        from flowconvert.families import FlowBase

        return FlowBase(shape, transforms=3, hidden=(128, 128))

    # a diagonal base: a full-covariance one fits the random start's near-deterministic output
    # combinations, which every step of the network then breaks (training diverges)
    trained_fully(
        "trained fully", "flowified 64-64-64 MLP, diagonal base", DigitsFlowMLP, "gaussian", base="diagonal", lr=5e-3
    )
    trained_fully(
        "trained fully, spline base",
        "flowified 64-64-64 MLP, spline base",
        lambda: DigitsFlowMLP(identity=True),
        "flow",
        base=nsf_sized_base,
        lr=1e-3,
        network_lr=3e-5,
    )

    print(
        "\ntest bits/dim (lower is better), validation used for every choice; the last column is the "
        f"importance-weighted bound over {IW_SAMPLES} dequantization draws per test image (the same models;\n"
        "a tighter bound on their discrete log-likelihood; the uniform and categorical models are exact):"
    )
    print(format_table(rows))

    frozen = [r for r in rows if "demo MLP, frozen" in r[0]]
    best = min(frozen, key=lambda r: r[1])[0]
    print(f"\nsamples (best frozen demo-MLP flow by validation: {best}):")
    from flowconvert.demo import _recogniser

    clf = _recogniser(data, deq)
    for key in (best, "trained fully", "trained fully, spline base"):
        for T in (1.0, args.temperature):
            s = sample_quality(flows[key], data, deq, T, recogniser=clf, seed=args.seed)
            print(
                f"  {key:<40} T={T:<4g} in [-0.05, 1.05]: {100 * s['in_range']:5.1f}%  range {s['min']:8.2f}..{s['max']:7.2f}"
                f"  recognised {s['confidence']:.3f} / real {s['real_confidence']:.3f} = {s['confidence_ratio']:.2f}"
            )

    chain = samples_from_each_depth(flows[best], data, deq, args.temperature, seed=args.seed)
    if chain is not None:
        print(
            f"\n  where its samples leave the data (T={args.temperature:g}): started from the real output of a layer"
            " on the test digits,\n  every layer below it inverted with sampled dropped coordinates, pixel values in"
            " [-0.05, 1.05]:\n  " + "  ".join(f"{name} {100 * inside:.1f}%" for name, inside in chain)
        )

    print("\nout-of-distribution AUROC (test digits vs flipped, upside-down, shifted, uniform noise):")
    for name in nets:
        base = softmax_auroc(nets[name], data.test_x, deq, seed=args.seed)
        mean = sum(base.values()) / len(base)
        print(f"  {name + ', max softmax':<44} mean {mean:.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in base.items()))
        for key in (k for k in flows if k.startswith(name)):
            a = ood_auroc(flows[key], data.test_x, deq, seed=args.seed)
            print(
                f"  {key + ', log p':<44} mean {sum(a.values()) / len(a):.3f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in a.items())
            )

    print("\nwall time of calibrate + fit of the densities of a frozen classifier (target < 180 s on 2 cores):")
    for key, secs in fit_seconds.items():
        print(f"  {key:<44} {secs:7.1f} s")


if __name__ == "__main__":
    main()
