"""What the linear-Gaussian family loses to the kinks of a frozen network's activations.

    python benchmarks/kinks.py [--density gaussian,flow] [--seed 0] [--threads 1]

The ``"gaussian"`` family undoes a LeakyReLU of slope s on the coordinates a funnel drops (its
kink), not on kept coordinates nor through a bijection that mixes kinked coordinates. This
script trains the other MLP of ``benchmarks/digits.py`` (64-40-40-10, LeakyReLU(0.1)) once,
then sets the slope of its activations to 1 (a linear network: the flow's density is a Gaussian
on the pixels), 0.5, 0.2 and its own 0.1, and converts, calibrates and fits each under
``density="gaussian"`` (the recipe of ``digits.py``). Next to them: a full-covariance Gaussian
fitted to the dequantized training pixels (a small ridge chosen on validation), the best a
Gaussian on the pixels does. ``--density flow`` (or a comma-separated list) repeats the
slopes under the richer families: at slope 1 their gap to a pixel-space NSF is what the
frozen linear projections and the dequantized pixels' lattice cost, the rest is the kinks'.
Validation bits/dim for every row (the test split is not used).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

import flowconvert as fc
from flowconvert.demo import LEVELS, carve_validation, convert_and_fit, load_digits_split, train_classifier

HERE = Path(__file__).resolve().parent
# this directory holds scripts named like packages (onnx.py): keep it off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _digits_benchmark():
    """``benchmarks/digits.py`` as a module (for its other MLP)."""
    spec = importlib.util.spec_from_file_location("digits_benchmark", HERE / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_gaussian_bits(
    data, deq: fc.Dequantize, ridges=(1e-5, 1e-4, 1e-3, 1e-2), draws: int = 20
) -> tuple[float, float]:
    """``(validation bits/dim, ridge)`` of the best full-covariance Gaussian on the dequantized pixels."""
    torch.manual_seed(0)
    x = torch.cat([deq(data.train_x.double()) for _ in range(draws)])
    mean, cov = x.mean(0), torch.cov(x.T)
    best = (math.inf, None)
    for ridge in ridges:
        dist = torch.distributions.MultivariateNormal(mean, cov + ridge * torch.eye(x.shape[1], dtype=x.dtype))
        lp = torch.stack([dist.log_prob(deq(data.val_x.double())) for _ in range(5)]).mean()
        bits = (-lp.item() / x.shape[1] + math.log(LEVELS)) / math.log(2)
        best = min(best, (bits, ridge), key=lambda t: t[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--density", default="gaussian", help="comma-separated families (gaussian, mlp, flow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    digits = _digits_benchmark()
    data = carve_validation(load_digits_split(seed=args.seed), seed=args.seed)
    deq = fc.Dequantize(LEVELS)
    bits, ridge = full_gaussian_bits(data, deq)
    print(f"full-covariance Gaussian on the pixels (ridge {ridge:g}): validation {bits:.3f} bits/dim")
    torch.manual_seed(args.seed)
    net = digits.OtherMLP()
    train_classifier(net, data, deq, epochs=20, seed=args.seed)
    for density in args.density.split(","):
        for slope in (1.0, 0.5, 0.2, 0.1):
            changed = copy.deepcopy(net)
            for m in changed.modules():
                if isinstance(m, nn.LeakyReLU):
                    m.negative_slope = slope
            torch.manual_seed(args.seed)
            _, history, _ = convert_and_fit(changed, data, deq, density, epochs=60)
            print(
                f"other MLP with LeakyReLU({slope:g}), density={density!r}: "
                f"validation {history.best_val_bpd:.3f} bits/dim",
                flush=True,
            )


if __name__ == "__main__":
    main()
