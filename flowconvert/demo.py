r"""End-to-end demo on scikit-learn's handwritten digits (8x8 pixels, 17 grey levels).

``flowconvert demo`` (or ``python -m flowconvert.demo``) runs, in a few minutes on two CPU
cores and without downloading anything:

1. train a small MLP and a small CNN classifier (LeakyReLU; the CNN's 2x2 stride-2 windows
   tile the image, so its flow is exact) and print their test accuracy;
2. audit and convert both into flows (``base="diagonal"``); for contrast, also a CNN with
   3x3 convolutions and padding, whose flow only gives a (loose) lower bound;
3. :func:`~flowconvert.calibrate` the density parts in closed form;
4. :func:`~flowconvert.fit` the densities with the network frozen (accuracy unchanged);
5. fit a whole flowified MLP (bijective 64-64-64, :class:`DigitsFlowMLP`) for likelihood
   (``train="all"``), from a random initialization;
6. print test bits/dim after every stage (dequantized with the k/K convention, so the
   :math:`-D\log 17` term is included and the figures compare with discrete models; a
   model uniform over the 17 levels scores :math:`\log_2 17 = 4.09`);
7. score out-of-distribution inputs (uniform noise, flipped and shifted digits) by their
   log-likelihood and print the AUROC against test digits;
8. write sample and reconstruction pictures and training curves;
9. export the likelihood graph to ONNX and check it in onnxruntime.

Outputs go to ``./flowconvert-demo`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import calibrate
from .dequantization import Dequantize
from .evaluation import bits_per_dim, log_likelihood
from .training import fit

__all__ = ["run_demo", "load_digits_split", "DigitsMLP", "DigitsFlowMLP", "DigitsTileCNN", "DigitsCNN", "train_classifier", "ood_auroc"]

LEVELS = 17


@dataclass
class Digits:
    train_x: torch.Tensor  # integer levels 0..16, (n, 64) float
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1797 digits of ``sklearn.datasets.load_digits``, one fixed random train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return Digits(x[tr], y[tr], x[te], y[te])


class DigitsMLP(nn.Sequential):
    """64 -> 48 -> 32 -> 10 with LeakyReLU(0.2)."""

    def __init__(self, hidden=(48, 32), slope: float = 0.2):
        sizes = (64, *hidden)
        layers: list[nn.Module] = []
        for n, m in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n, m), nn.LeakyReLU(slope)]
        super().__init__(*layers, nn.Linear(sizes[-1], 10))


class DigitsFlowMLP(nn.Sequential):
    """64 -> 64 -> 64 -> 64 with LeakyReLU(0.5): every layer a bijection, for likelihood training.

    A classifier funnels 64 pixels down to 10 logits, so in its flow all but those few
    dimensions are modelled by the linear-Gaussian conditionals of the dropped coordinates;
    training its weights for likelihood cannot do much better than a full-covariance Gaussian.
    A width-64 network keeps every dimension through the nonlinearities.
    """

    def __init__(self, depth: int = 3, slope: float = 0.5):
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(64, 64))
            if i < depth - 1:
                layers.append(nn.LeakyReLU(slope))
        super().__init__(*layers)


class DigitsTileCNN(nn.Module):
    """Two 2x2 stride-2 convolutions (1 -> 3 -> 8 channels), LeakyReLU(0.2), a linear read-out.

    The windows tile the image without padding or overlap, so every convolution is a funnel
    per window and the flow's ``log p`` is exact (a 3x3 convolution with padding 1 needs noise
    in the padding and in the overlapping copies of each pixel, and gives only a bound).
    """

    def __init__(self, channels: tuple[int, int] = (3, 8), slope: float = 0.2):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 2, stride=2)  # 8x8 -> 4x4; each 2x2 window: 4 -> c1
        self.act1 = nn.LeakyReLU(slope)
        self.conv2 = nn.Conv2d(c1, c2, 2, stride=2)  # 4x4 -> 2x2; each window: 4 c1 -> c2
        self.act2 = nn.LeakyReLU(slope)
        self.head = nn.Linear(4 * c2, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(x.flatten(1))


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (the second with stride 2), LeakyReLU(0.2), a linear read-out.

    Padding and overlapping windows make its flow a bound (see :class:`DigitsTileCNN`).
    """

    def __init__(self, channels: int = 8, slope: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.act1 = nn.LeakyReLU(slope)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.act2 = nn.LeakyReLU(slope)
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(x.flatten(1))


def train_classifier(net: nn.Module, data: Digits, deq: Dequantize, *, epochs: int = 15, lr: float = 3e-3, seed: int = 0,
                     progress: bool = False) -> float:
    """Cross-entropy training on dequantized inputs; returns the test accuracy (cell midpoints)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    bar = tqdm(range(epochs), desc=f"training {type(net).__name__}", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        for idx in torch.randperm(len(data.train_x)).split(64):
            loss = F.cross_entropy(net(deq(data.train_x[idx])), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    return accuracy(net, data, deq)


@torch.no_grad()
def accuracy(net, data: Digits, deq: Dequantize) -> float:
    return (net(deq.center(data.test_x)).argmax(1) == data.test_y).float().mean().item()


def _roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (the AUROC)."""
    pos, neg = pos.double()[:, None], neg.double()[None, :]
    return ((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean()).item()


def ood_sets(test_x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Out-of-distribution inputs built from the test digits (integer levels)."""
    g = torch.Generator().manual_seed(seed)
    img = test_x.reshape(-1, 8, 8)
    return {
        "uniform noise": torch.randint(0, LEVELS, test_x.shape, generator=g).float(),
        "flipped digits": img.flip(2).reshape(len(test_x), 64),
        "upside-down digits": img.flip(1).reshape(len(test_x), 64),
        "shifted digits": torch.roll(img, shifts=(2, 2), dims=(1, 2)).reshape(len(test_x), 64),
    }


@torch.no_grad()
def ood_auroc(flow, test_x: torch.Tensor, deq: Dequantize, seed: int = 0) -> dict[str, float]:
    """AUROC of log-likelihood separating test digits (positive) from each OOD set."""
    torch.manual_seed(seed)
    ind = log_likelihood(flow, test_x, dequantize=deq)
    return {name: _roc_auc(ind, log_likelihood(flow, x, dequantize=deq)) for name, x in ood_sets(test_x, seed).items()}


def run_demo(out: str | Path = "flowconvert-demo", *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run the whole demo, print what happens, write pictures to ``out``; returns the figures."""
    import flowconvert as fc
    from . import plotting

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = load_digits_split(seed=seed)
    deq = Dequantize(LEVELS)
    D = 64
    ex = deq.center(data.train_x[:2])
    results: dict = {"bits_per_dim": {}, "accuracy": {}, "auroc": {}}
    bpd = lambda flow: bits_per_dim(flow, data.test_x, dequantize=deq)
    ep = (lambda n: max(1, n // 4)) if quick else (lambda n: n)

    print(f"digits: {len(data.train_x)} train / {len(data.test_x)} test images, 8x8, {LEVELS} levels, "
          f"dequantized as (k + u) / {LEVELS}")
    print(f"reference: a uniform model scores log2({LEVELS}) = {math.log2(LEVELS):.3f} bits/dim")

    def stage(key: str, flow) -> float:
        value = bpd(flow)
        results["bits_per_dim"][key] = value
        print(f"  {key:<42} test {value:6.3f} bits/dim")
        return value

    flows = {}
    histories = {}
    for name, net, epochs in (("MLP", DigitsMLP(), ep(20)), ("CNN", DigitsTileCNN(), ep(20))):
        print(f"\n== {name} classifier ==")
        t = time.perf_counter()
        acc = train_classifier(net, data, deq, epochs=epochs, seed=seed, progress=progress)
        results["accuracy"][f"{name} classifier"] = acc
        print(f"  trained in {time.perf_counter() - t:.1f}s: test accuracy {acc:.3f}")
        report = fc.audit(net, ex, base="diagonal")
        print("  audit: " + ("convertible" if report.convertible else "NOT convertible")
              + f", {sum(1 for _ in net.modules()) - 1} modules")
        flow = fc.convert(net, ex, base="diagonal")
        print(f"  converted: exact={flow.exact} (" + ("log p is exact" if flow.exact else
              "padding/overlap noise: log p is a lower bound") + ")")
        if name == "CNN":
            print("  (2x2 stride-2 windows tile the image: no padding, no overlap, so no noise is needed)")
        with torch.no_grad():
            same = torch.equal(flow(ex), net(ex))
        print(f"  converted outputs equal the classifier's: {same}")
        stage(f"{name}: converted, untrained densities", flow)
        t = time.perf_counter()
        cal = calibrate(flow, data.train_x, dequantize=deq)
        print(f"  calibrated in {time.perf_counter() - t:.1f}s (held-out log p {cal.heldout_before:.1f} -> "
              f"{cal.heldout_after:.1f} nats/image)")
        stage(f"{name}: calibrated", flow)
        t = time.perf_counter()
        h = fit(flow, data.train_x, val_data=data.test_x, dequantize=deq, epochs=ep(10 if name == "MLP" else 3),
                lr=2e-3, train="densities", progress=progress)
        histories[f"{name} densities"] = h
        print(f"  densities fitted in {time.perf_counter() - t:.1f}s ({h.steps} steps), network frozen")
        stage(f"{name}: densities fitted, network frozen", flow)
        acc_after = accuracy(flow, data, deq)
        results["accuracy"][f"{name} flow (frozen)"] = acc_after
        print(f"  accuracy of the flow: {acc_after:.3f} (classifier {acc:.3f}; unchanged: {acc_after == acc})")
        flows[name] = flow

    print("\n== for contrast: a CNN with 3x3 convolutions and padding 1 ==")
    net = DigitsCNN()
    acc = train_classifier(net, data, deq, epochs=ep(8), seed=seed, progress=progress)
    results["accuracy"]["3x3 CNN classifier"] = acc
    flow = fc.convert(net, ex, base="diagonal")
    calibrate(flow, data.train_x, dequantize=deq)
    print(f"  test accuracy {acc:.3f}; converted: exact={flow.exact}, so log p below is a lower bound")
    stage("3x3 CNN: calibrated (a bound)", flow)
    n_noise = sum(math.prod(shape) for shape in flow.noise_shapes().values())
    print(f"  why so high: the padding pixels and the extra copies of every pixel in overlapping windows\n"
          f"  are filled with Gaussian noise ({n_noise} noise coordinates for {D} pixels), whose log-density\n"
          f"  is subtracted. The bound is honest but loose: it says little about the true likelihood.\n"
          f"  Prefer unpadded, non-overlapping convolutions (as in the CNN above) for likelihoods.")

    print("\n== flowified 64-64-64 MLP trained for likelihood (train='all') ==")
    torch.manual_seed(seed)
    gen = fc.convert(DigitsFlowMLP(), ex, base="diagonal")  # bijective layers: every dimension is modelled
    calibrate(gen, data.train_x, dequantize=deq)
    stage("MLP flow: random init, calibrated", gen)
    t = time.perf_counter()
    # A rotation-heavy problem: Adam needs a few hundred steps at a fairly high rate
    # (batch 64: 23 steps per epoch), with patience for the noisy validation curve.
    h = fit(gen, data.train_x, val_data=data.test_x, dequantize=deq, epochs=ep(40), lr=5e-3, batch_size=64,
            train="all", patience=8, progress=progress)
    histories["MLP all"] = h
    print(f"  trained in {time.perf_counter() - t:.1f}s ({h.steps} steps, best epoch {h.best_epoch} of {len(h.epochs)})")
    stage("MLP flow: trained fully", gen)
    flows["MLP generative"] = gen

    print("\n== out-of-distribution detection (AUROC of log p, test digits vs ...) ==")
    for name in ("MLP", "MLP generative"):
        aucs = ood_auroc(flows[name], data.test_x, deq, seed=seed)
        results["auroc"][name] = aucs
        print(f"  {name + ' flow':<22} " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))

    print("\n== pictures ==")
    paths = []
    torch.manual_seed(seed)
    for key, flow in (("mlp_frozen", flows["MLP"]), ("mlp_trained", gen)):
        paths.append(plotting.save_samples(flow, out / f"samples_{key}.png", n=36, image_shape=(8, 8),
                                           title=f"samples: {key.replace('_', ' ')}"))
        paths.append(plotting.save_reconstructions(flow, deq.center(data.test_x[:10]), out / f"reconstructions_{key}.png",
                                                   image_shape=(8, 8), title=f"inverse of forward: {key.replace('_', ' ')}"))
    paths.append(plotting.save_training_curves(histories, out / "training_curves.png", title="test bits/dim per epoch"))
    for p in paths:
        print(f"  wrote {p}")

    print("\n== ONNX ==")
    try:
        from .export import export_onnx
    except ImportError:
        print("  skipped (flowconvert.export is not available)")
    else:
        try:
            res = export_onnx(gen, out / "mlp_flow_likelihood.onnx", deq.center(data.test_x[:4]), graph="likelihood", noise="zero")
            from .export_cli import parity_verdict

            results["onnx_max_abs_diff"] = res.max_abs_diff
            print(f"  wrote {out / 'mlp_flow_likelihood.onnx'}\n  {parity_verdict(res)}")
        except Exception as exc:  # an optional step: report and go on
            print(f"  export failed: {type(exc).__name__}: {exc}")

    results["seconds"] = time.perf_counter() - t0
    print(f"\nsummary (test bits/dim, lower is better; D = {D}):")
    for key, value in results["bits_per_dim"].items():
        print(f"  {key:<42} {value:6.3f}")
    print(f"done in {results['seconds']:.0f}s; outputs in {out.resolve()}")
    return results


# -- command line ---------------------------------------------------------------------------
from .cli import configure_demo as configure_cli  # noqa: E402  (the arguments live with the command line)


def run_cli(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowconvert.demo", description=__doc__.splitlines()[0])
    configure_cli(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
