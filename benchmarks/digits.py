"""Test bits/dim on one fixed train/test split of scikit-learn's digits, in one run.

    python benchmarks/digits.py [--steps 400] [--seed 0]

Models (all evaluated as bounds on the discrete log-likelihood, dequantized as (k + u) / 17,
so the -D log 17 term is included and every figure compares with the categorical model):

  (i)   independent per-pixel categorical (add-1/2 smoothing), exact discrete likelihood;
  (ii)  zuko's neural spline flow (NSF), trained with the same data, batch size and steps;
  (iii) a pretrained MLP classifier converted with flowconvert, densities calibrated and
        fitted, network frozen (accuracy unchanged);
  (iv)  a flowified MLP (all bijective 64 -> 64 layers) trained fully (train="all");
  (v)   a flowified CNN trained fully.

Needs ``pip install zuko`` (benchmark-only dependency). Prints a table with wall times.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import flowconvert as fc
from flowconvert.demo import DigitsMLP, load_digits_split, train_classifier

LEVELS, D = 17, 64


def categorical(data, alpha: float = 0.5) -> float:
    k_train, k_test = data.train_x.long(), data.test_x.long()
    counts = torch.stack([torch.bincount(k_train[:, j], minlength=LEVELS) for j in range(D)]).double() + alpha
    logp = (counts / counts.sum(1, keepdim=True)).log()
    ll = logp[torch.arange(D), k_test].sum(1).mean().item()
    return -ll / (D * math.log(2))


def zuko_nsf(data, deq, steps: int, batch: int, seed: int) -> float:
    import zuko

    torch.manual_seed(seed)
    flow = zuko.flows.NSF(D, transforms=3, hidden_features=(128, 128))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    n, step = len(data.train_x), 0
    while step < steps:
        for idx in torch.randperm(n).split(batch):
            x = deq(data.train_x[idx])
            loss = -flow().log_prob(x).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            opt.step()
            step += 1
            if step >= steps:
                break

    class Wrapped:
        @torch.no_grad()
        def log_prob(self, x, deterministic=False):
            return flow().log_prob(x)

    return fc.bits_per_dim(Wrapped(), data.test_x, dequantize=deq)


class CNNFlowNet(nn.Module):
    """Convolutions without padding and overlap-free strides where possible (few bound layers)."""

    def __init__(self, slope: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 2, stride=2)  # 8x8 -> 4x4, a bijection per 2x2 patch
        self.act1 = nn.LeakyReLU(slope)
        self.conv2 = nn.Conv2d(4, 16, 2, stride=2)  # 4x4 -> 2x2, a bijection per patch
        self.act2 = nn.LeakyReLU(slope)
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps for (ii), (iv), (v)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = load_digits_split(seed=args.seed)
    deq = fc.Dequantize(LEVELS)
    ex = deq.center(data.train_x[:2])
    steps_per_epoch = math.ceil(len(data.train_x) / args.batch)
    epochs = math.ceil(args.steps / steps_per_epoch)
    rows = []

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        rows.append((name, value, time.perf_counter() - t))
        print(f"{name:<58} {value:7.3f} bits/dim  {rows[-1][2]:7.1f}s", flush=True)

    print(f"digits: {len(data.train_x)} train / {len(data.test_x)} test, step budget {args.steps} x batch {args.batch}")
    timed("(i)   per-pixel categorical", lambda: categorical(data))
    timed("(ii)  zuko NSF (3 transforms, 128x128)", lambda: zuko_nsf(data, deq, args.steps, args.batch, args.seed))

    def frozen():
        net = DigitsMLP()
        acc = train_classifier(net, data, deq, epochs=20, seed=args.seed)
        flow = fc.convert(net, ex, base="diagonal")
        fc.calibrate(flow, data.train_x, dequantize=deq)
        fc.fit(flow, data.train_x, dequantize=deq, epochs=epochs, max_steps=args.steps, lr=2e-3, progress=False)
        with torch.no_grad():
            acc_flow = (flow(deq.center(data.test_x)).argmax(1) == data.test_y).float().mean().item()
        print(f"      classifier accuracy {acc:.3f}, flow accuracy {acc_flow:.3f}")
        return fc.bits_per_dim(flow, data.test_x, dequantize=deq)

    timed("(iii) converted MLP classifier, densities fitted, frozen", frozen)

    def full(net):
        flow = fc.convert(net, ex, base="diagonal")
        fc.calibrate(flow, data.train_x, dequantize=deq)
        fc.fit(flow, data.train_x, dequantize=deq, epochs=epochs, max_steps=args.steps, lr=2e-3, train="all", progress=False)
        return fc.bits_per_dim(flow, data.test_x, dequantize=deq)

    torch.manual_seed(args.seed)
    timed("(iv)  flowified MLP 64-64-64-64, trained fully", lambda: full(_square_mlp()))
    torch.manual_seed(args.seed)
    timed("(v)   flowified CNN (2x2 stride-2 convs), trained fully", lambda: full(CNNFlowNet()))


def _square_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.5), nn.Linear(64, 64), nn.LeakyReLU(0.5), nn.Linear(64, 64))


if __name__ == "__main__":
    main()
