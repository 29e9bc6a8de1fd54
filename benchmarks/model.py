"""Cost of a converted model's likelihood pass, and of the conversion itself.

For two models on CPU at batch 128 with a fixed number of threads, under
``torch.inference_mode()``, prints

* ``log_prob / forward``: time of ``flow.log_prob(x)`` divided by the original
  ``model(x)`` (target for the MLP: at most 2.5), in stochastic mode (the default, noise
  drawn inside the timed region) and deterministic mode;
* ``convert``: wall time of ``flowconvert.convert(model, x[:1], density=...)`` (trace, shape
  propagation, SVDs, graph generation, the density parts).

for each density family (``--densities``; the target is for ``"gaussian"``, the richer
``"mlp"`` and ``"flow"`` print their ratio, over ``--family-repeats`` repeats: a ``"flow"``
likelihood pass of the CNN runs zuko's spline on every dropped coordinate of every location
and takes seconds).

Models: an MLP 784-512-256-128-64-32-8 with LeakyReLU, and a CNN of about 1M parameters
(three convolutions, two linear layers). Each repeat times the original, the two
likelihood passes and the original again, each over enough calls to last about 20 ms; the
ratio is taken within a repeat (against the faster original timing) and the median over
repeats is printed, so background load affects numerator and denominator alike.

    python benchmarks/model.py [--threads 2] [--repeats 15] [--batch 128] [--densities gaussian,mlp,flow]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import flowconvert as fc


def mlp() -> nn.Module:
    sizes = [784, 512, 256, 128, 64, 32, 8]
    layers: list[nn.Module] = []
    for i, (n, m) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n, m))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.01))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    """28x28 grey images -> 10 logits, about 1M parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 300)
        self.fc2 = nn.Linear(300, 10)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.act(self.conv3(x))
        x = x.view(x.size(0), -1)
        return self.fc2(self.act(self.fc1(x)))


def per_call(fn, target: float = 0.02) -> float:
    """Seconds per call of ``fn``, timed over enough calls to last about ``target`` seconds."""
    fn()
    n, start = 1, time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    if once >= target:  # one call lasts long enough
        return once
    n = max(1, int(target / once))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def measure(name: str, model: nn.Module, x: torch.Tensor, repeats: int, density: str = "gaussian") -> None:
    model.eval()
    conversions = []
    for _ in range(3):
        start = time.perf_counter()
        flow = fc.convert(model, x[:1], density=density)
        conversions.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    stochastic, deterministic = [], []
    with torch.inference_mode():
        assert torch.allclose(flow(x), model(x), atol=1e-5)
        for _ in range(repeats):
            t0 = per_call(lambda: model(x))
            ts = per_call(lambda: flow.log_prob(x))
            td = per_call(lambda: flow.log_prob(x, deterministic=True))
            t1 = per_call(lambda: model(x))
            base = min(t0, t1)
            stochastic.append(ts / base)
            deterministic.append(td / base)
        forward_ms = per_call(lambda: model(x)) * 1e3
    print(
        f"{name:<5} {density:<9} params={params:>9,d}  exact={str(flow.exact):<5}  forward={forward_ms:6.2f} ms  "
        f"log_prob/forward={statistics.median(stochastic):5.2f} (deterministic {statistics.median(deterministic):5.2f})  "
        f"convert={statistics.median(conversions) * 1e3:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--densities", default="gaussian,mlp,flow", help="comma-separated density families")
    parser.add_argument("--family-repeats", type=int, default=3, help='repeats for the families other than "gaussian"')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, median of {args.repeats} repeats ({args.family_repeats} for the other families)"
    )
    models = (("MLP", mlp(), torch.randn(args.batch, 784)), ("CNN", CNN(), torch.randn(args.batch, 1, 28, 28)))
    for density in args.densities.split(","):
        repeats = args.repeats if density == "gaussian" else args.family_repeats
        for name, model, x in models:
            measure(name, model, x, repeats, density)


if __name__ == "__main__":
    main()
