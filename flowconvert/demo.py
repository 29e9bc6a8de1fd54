r"""End-to-end demo on scikit-learn's handwritten digits (8x8 pixels, 17 grey levels).

``flowconvert demo`` (or ``python -m flowconvert.demo``) runs, in a few minutes on two CPU
cores and without downloading anything:

1. split the digits into train / validation / test (the validation split is carved from the
   training split; it chooses early stopping and nothing else looks at the test split until
   the end, where every model is scored on it once);
2. train a small MLP and a small CNN classifier (LeakyReLU; the CNN's 2x2 stride-2 windows
   tile the image, so its flow is exact);
3. convert each *frozen* classifier into a flow under each density family
   (``density="gaussian"``, ``"mlp"``, ``"flow"``; :mod:`flowconvert.families`),
   :func:`~flowconvert.calibrate` the density parts in closed form and
   :func:`~flowconvert.fit` them with the network frozen (accuracy unchanged);
4. train a whole flowified MLP (bijective 64-64-64, :class:`DigitsFlowMLP`, started at the
   identity, with a spline-flow base) for likelihood;
5. print one table of test bits/dim (dequantized with the k/K convention, so the
   :math:`-D\log 17` term is included and the figures compare with discrete models: a uniform
   model scores :math:`\log_2 17 = 4.09`, an independent per-pixel categorical model is shown
   too) with wall times;
6. sample at temperature 1 and at the default temperature, report how many pixel values
   leave the data range and how confidently a separately trained scikit-learn classifier
   recognises the samples compared with real test digits;
7. score out-of-distribution inputs (uniform noise, flipped, upside-down and shifted digits) by
   log-likelihood and print the AUROC next to the classifier's own max-softmax baseline;
8. write sample and reconstruction pictures and training curves; export one flow to ONNX.

Outputs go to ``./flowconvert-demo`` (``--out`` to change); ``--quick`` is a smoke run.
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

__all__ = [
    "run_demo",
    "load_digits_split",
    "carve_validation",
    "DigitsMLP",
    "DigitsFlowMLP",
    "DigitsTileCNN",
    "DigitsCNN",
    "train_classifier",
    "ood_auroc",
    "softmax_auroc",
    "categorical_bits_per_dim",
    "sample_quality",
    "convert_and_fit",
    "baseline_rows",
    "DEFAULT_TEMPERATURE",
    "IW_SAMPLES",
    "iw_bits_per_dim",
]

LEVELS = 17
#: Temperature of the demo's and benchmark's default samples (every standard-normal draw scaled by it).
DEFAULT_TEMPERATURE = 0.7
#: Dequantization draws of the importance-weighted test bound (the table's last column).
IW_SAMPLES = 128


@dataclass
class Digits:
    train_x: torch.Tensor  # integer levels 0..16, (n, 64) float
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None  # carved from the training split (see carve_validation)
    val_y: torch.Tensor | None = None


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


def carve_validation(data: Digits, fraction: float = 0.2, seed: int = 0) -> Digits:
    """Move a random ``fraction`` of the training split into a validation split (test untouched)."""
    perm = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed + 1))
    n_val = int(round(fraction * len(perm)))
    va, tr = perm[:n_val], perm[n_val:]
    return Digits(data.train_x[tr], data.train_y[tr], data.test_x, data.test_y, data.train_x[va], data.train_y[va])


def categorical_bits_per_dim(train_x: torch.Tensor, x: torch.Tensor, alpha: float = 0.5) -> float:
    """Independent per-pixel categorical model (add-``alpha`` smoothing) fitted on ``train_x``: bits/dim on ``x``."""
    k_train, k = train_x.long(), x.long()
    D = k.shape[1]
    counts = torch.stack([torch.bincount(k_train[:, j], minlength=LEVELS) for j in range(D)]).double() + alpha
    logp = (counts / counts.sum(1, keepdim=True)).log()
    return -logp[torch.arange(D), k].sum(1).mean().item() / (D * math.log(2))


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

    ``identity=True`` starts every layer as the identity (weight ``I``, bias 0; LeakyReLU is the
    identity on the non-negative dequantized pixels), so the flow starts as its base density on
    the pixels themselves: a random linear layer mixes the pixels, and the flat boxes of the
    dequantized levels, which a spline base models well pixel by pixel, become a zonotope.
    """

    def __init__(self, depth: int = 3, slope: float = 0.5, identity: bool = False):
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(64, 64))
            if identity:
                with torch.no_grad():
                    layers[-1].weight.copy_(torch.eye(64))
                    layers[-1].bias.zero_()
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


def train_classifier(
    net: nn.Module,
    data: Digits,
    deq: Dequantize,
    *,
    epochs: int = 15,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> float:
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


@torch.no_grad()
def softmax_auroc(net: nn.Module, test_x: torch.Tensor, deq: Dequantize, seed: int = 0) -> dict[str, float]:
    """The classifier's own baseline: AUROC of its maximum softmax probability (Hendrycks & Gimpel 2017)."""
    score = lambda k: torch.softmax(net(deq.center(k)), 1).max(1).values
    ind = score(test_x)
    return {name: _roc_auc(ind, score(x)) for name, x in ood_sets(test_x, seed).items()}


def _recogniser(data: Digits, deq: Dequantize):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(deq.center(data.train_x).numpy(), data.train_y.numpy())
    return clf


@torch.no_grad()
def sample_quality(
    flow, data: Digits, deq: Dequantize, temperature: float, n: int = 500, recogniser=None, seed: int = 0
) -> dict[str, float]:
    """Samples at ``temperature``: the fraction of pixel values in ``[-0.05, 1.05]`` (the data lie in
    ``[0, 1)``), their range, and the mean max-probability a scikit-learn logistic regression trained
    on the training digits gives them (samples clipped to ``[0, 1]``), relative to real test digits."""
    clf = recogniser if recogniser is not None else _recogniser(data, deq)
    torch.manual_seed(seed)
    x = flow.sample(n, temperature=temperature)
    x = x[0] if isinstance(x, (tuple, list)) else x
    x = x.reshape(n, -1)
    finite = torch.isfinite(x)
    inside = ((x >= -0.05) & (x <= 1.05) & finite).double().mean().item()
    conf = clf.predict_proba(x.nan_to_num(0.0).clamp(0, 1).numpy()).max(1).mean()
    real = clf.predict_proba(deq.center(data.test_x).numpy()).max(1).mean()
    return {
        "in_range": inside,
        "min": x[finite].min().item(),
        "max": x[finite].max().item(),
        "confidence": float(conf),
        "real_confidence": float(real),
        "confidence_ratio": float(conf / real),
    }


def baseline_rows(data: Digits) -> list[tuple[str, float, float, float]]:
    """``(name, validation, test bits/dim, seconds)`` of the uniform and per-pixel categorical models."""
    t = time.perf_counter()
    categorical = (
        categorical_bits_per_dim(data.train_x, data.val_x),
        categorical_bits_per_dim(data.train_x, data.test_x),
    )
    return [
        ("uniform over the 17 levels", math.log2(LEVELS), math.log2(LEVELS), 0.0),
        ("per-pixel categorical", *categorical, time.perf_counter() - t),
    ]


def convert_and_fit(
    net: nn.Module,
    data: Digits,
    deq: Dequantize,
    density,
    *,
    epochs: int,
    lr: float = 3e-3,
    patience: int = 10,
    batch_size: int = 128,
    max_steps: int | None = None,
    progress: bool = False,
    train: str = "densities",
    base=None,
    network_lr: float | None = None,
):
    """Convert ``net`` with the family ``density`` (and ``base``, default the family's), calibrate
    (guard on validation) and fit its densities (``train="all"``: the network too, at
    ``network_lr``) with early stopping on validation. Returns ``(flow, history, seconds)``."""
    import flowconvert as fc

    t = time.perf_counter()
    flow = fc.convert(net, deq.center(data.train_x[:2]), density=density, base=base)
    calibrate(flow, data.train_x, val_data=data.val_x, dequantize=deq)
    history = fit(
        flow,
        data.train_x,
        val_data=data.val_x,
        dequantize=deq,
        epochs=epochs,
        lr=lr,
        patience=patience,
        batch_size=batch_size,
        max_steps=max_steps,
        train=train,
        network_lr=network_lr,
        progress=progress,
    )
    return flow, history, time.perf_counter() - t


def run_demo(
    out: str | Path = "flowconvert-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    densities=("gaussian", "mlp", "flow"),
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict:
    """Run the whole demo, print what happens, write pictures to ``out``; returns the figures."""
    from . import plotting

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = carve_validation(load_digits_split(seed=seed), seed=seed)
    deq = Dequantize(LEVELS)
    D = 64
    rows: list[tuple[str, float, float, float]] = []  # (model, validation, test bits/dim, seconds)
    results: dict = {
        "bits_per_dim": {},
        "iw_bits_per_dim": {},
        "accuracy": {},
        "auroc": {},
        "samples": {},
        "rows": rows,
    }
    scale = 0.1 if quick else 1.0
    ep = lambda n: max(1, int(n * scale))
    bpd = lambda flow, x: bits_per_dim(flow, x, dequantize=deq)

    print(
        f"digits: {len(data.train_x)} train / {len(data.val_x)} validation (carved from train) / "
        f"{len(data.test_x)} test images, 8x8, {LEVELS} levels, dequantized as (k + u) / {LEVELS}"
    )
    rows += baseline_rows(data)

    flows, nets, histories = {}, {}, {}
    for name, net, epochs in (("MLP", DigitsMLP(), 20), ("CNN", DigitsTileCNN(), 20)):
        t = time.perf_counter()
        acc = train_classifier(net, data, deq, epochs=ep(epochs), seed=seed, progress=progress)
        nets[name] = net
        results["accuracy"][f"{name} classifier"] = acc
        print(f"\n== {name} classifier: trained in {time.perf_counter() - t:.1f}s, test accuracy {acc:.3f} ==")
        for density in densities:
            flow, h, secs = convert_and_fit(
                net, data, deq, density, epochs=ep(40 if density != "flow" else 20), progress=progress
            )
            key = f"{name} classifier, frozen, density={density!r}"
            rows.append((key, h.best_val_bpd, float("nan"), secs))
            flows[key], histories[f"{name} {density}"] = flow, h
            same = accuracy(flow, data, deq) == acc
            print(
                f"  density={density!r:<11} validation {h.best_val_bpd:6.3f} bits/dim after {h.steps} steps "
                f"({secs:.0f}s); accuracy unchanged: {same}"
            )

    print("\n== flowified 64-64-64 MLP trained for likelihood (train='all'), spline-flow base ==")
    torch.manual_seed(seed)
    gen, h, secs = convert_and_fit(
        DigitsFlowMLP(identity=True),  # starts as the base on the pixels; see DigitsFlowMLP
        data,
        deq,
        "flow",
        epochs=ep(40),
        lr=1e-3,
        network_lr=3e-5,
        batch_size=64,
        train="all",
        patience=8,
        progress=progress,
    )
    histories["MLP flow, trained fully"] = h
    rows.append(("flowified 64-64-64 MLP, trained fully", h.best_val_bpd, float("nan"), secs))
    flows["flowified 64-64-64 MLP, trained fully"] = gen
    print(
        f"  {h.steps} steps, best epoch {h.best_epoch} of {len(h.epochs)}: validation {h.best_val_bpd:.3f} ({secs:.0f}s)"
    )

    # the test split, once per model, after every choice was made on validation
    for i, (key, val, _, secs) in enumerate(rows):
        if key in flows:
            rows[i] = (key, val, bpd(flows[key], data.test_x), secs, iw_bits_per_dim(flows[key], data.test_x, deq))
            results["bits_per_dim"][key] = rows[i][2]
            results["iw_bits_per_dim"][key] = rows[i][4]
    print(
        f"\n== test bits/dim (lower is better; D = {D}; 'test, IW {IW_SAMPLES}': the importance-weighted bound "
        f"over {IW_SAMPLES} dequantization draws per image, a tighter bound on the same model) =="
    )
    print(format_table(rows))

    frozen = [k for k in flows if "frozen" in k and k.startswith("MLP")]
    best = min(frozen, key=lambda k: dict((r[0], r[1]) for r in rows)[k])
    recogniser = _recogniser(data, deq)
    print("\n== samples (temperature scales every standard-normal draw; data lie in [0, 1)) ==")
    for key in (best, "flowified 64-64-64 MLP, trained fully"):
        for T in (1.0, temperature):
            q = sample_quality(flows[key], data, deq, T, recogniser=recogniser, seed=seed)
            results["samples"][f"{key} @ T={T:g}"] = q
            print(
                f"  {key:<48} T={T:<4g} {100 * q['in_range']:5.1f}% of pixel values in [-0.05, 1.05] "
                f"(range {q['min']:.2f}..{q['max']:.2f}); recognised {q['confidence']:.2f} vs real digits "
                f"{q['real_confidence']:.2f} (ratio {q['confidence_ratio']:.2f})"
            )

    print("\n== out-of-distribution detection: AUROC, test digits vs ... ==")
    for name in ("MLP", "CNN"):
        base = softmax_auroc(nets[name], data.test_x, deq, seed=seed)
        results["auroc"][f"{name} max-softmax"] = base
        print(
            f"  {name + ' classifier, max softmax':<44} "
            + ", ".join(f"{k} {v:.3f}" for k, v in base.items())
            + f"; mean {sum(base.values()) / len(base):.3f}"
        )
        for key in (k for k in flows if k.startswith(name) and "frozen" in k):
            aucs = ood_auroc(flows[key], data.test_x, deq, seed=seed)
            results["auroc"][key] = aucs
            print(
                f"  {'log p, ' + key.split(', ')[-1]:<44} "
                + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items())
                + f"; mean {sum(aucs.values()) / len(aucs):.3f}"
            )

    print("\n== pictures ==")
    paths = []
    for tag, key in (("mlp_frozen", best), ("mlp_trained", "flowified 64-64-64 MLP, trained fully")):
        for T in (1.0, temperature):
            torch.manual_seed(seed)
            paths.append(
                plotting.save_samples(
                    flows[key],
                    out / f"samples_{tag}_T{T:g}.png",
                    n=36,
                    image_shape=(8, 8),
                    temperature=T,
                    title=f"samples: {tag.replace('_', ' ')}, T={T:g}",
                )
            )
            paths.append(
                plotting.save_reconstructions(
                    flows[key],
                    deq.center(data.test_x[:10]),
                    out / f"reconstructions_{tag}_T{T:g}.png",
                    image_shape=(8, 8),
                    temperature=T,
                    title=f"inverse of forward: {tag.replace('_', ' ')}, T={T:g}",
                )
            )
    paths.append(
        plotting.save_training_curves(histories, out / "training_curves.png", title="validation bits/dim per epoch")
    )
    for p in paths:
        print(f"  wrote {p}")

    print("\n== ONNX ==")
    try:
        from .export import export_onnx

        # log p of a spline-flow family is a sum of some hundred float32 terms of either sign, so the
        # exported graph's rounding is about 1e-4 of log p (a float64 export agrees to 1e-6, the ops
        # onnxruntime runs in float32 included): the tolerance is 1e-3, absolute and relative
        tolerance = {"atol": 1e-3, "rtol": 1e-3}
        res = export_onnx(
            flows[best],
            out / "mlp_flow_likelihood.onnx",
            deq.center(data.test_x[:4]),
            graph="likelihood",
            noise="zero",
            **tolerance,
        )
        from .export_cli import parity_verdict

        results["onnx_max_abs_diff"] = res.max_abs_diff
        print(f"  wrote {out / 'mlp_flow_likelihood.onnx'} ({best})\n  {parity_verdict(res, **tolerance)}")
    except Exception as exc:  # noqa: BLE001 - an optional step: report and go on
        print(f"  export failed: {type(exc).__name__}: {exc}")

    results["seconds"] = time.perf_counter() - t0
    print(f"\ndone in {results['seconds']:.0f}s; outputs in {out.resolve()}")
    return results


def format_table(rows) -> str:
    """The table ``run_demo`` and ``benchmarks/digits.py`` print: model, validation, test bits/dim,
    seconds, and (rows of five) the test bits/dim of the importance-weighted bound."""
    iw = any(len(r) > 4 for r in rows)
    head = f"| {'model':<52} | {'validation':>10} | {'test':>7} | {'seconds':>7} |"
    rule = f"|{'-' * 54}|{'-' * 12}|{'-' * 9}|{'-' * 9}|"
    if iw:
        head, rule = head + f" {f'test, IW {IW_SAMPLES}':>13} |", rule + f"{'-' * 15}|"
    lines = [head, rule]
    for name, val, test, secs, *rest in rows:
        line = f"| {name:<52} | {val:10.3f} | {test:7.3f} | {secs:7.1f} |"
        lines.append(line + (f" {rest[0] if rest else test:13.3f} |" if iw else ""))
    return "\n".join(lines)


def iw_bits_per_dim(flow, x: torch.Tensor, deq: Dequantize, samples: int = IW_SAMPLES, seed: int = 0) -> float:
    r"""Test bits/dim of the importance-weighted bound with ``samples`` dequantization draws per image:
    :math:`\log\frac1K\sum_k p((x + u_k)/L)`, a tighter bound on the same model's discrete
    log-likelihood than one draw (and the stochastic layers' noise drawn with each)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return bits_per_dim(flow, x, dequantize=deq, num_samples=samples)


# -- command line ---------------------------------------------------------------------------
from .cli import configure_demo as configure_cli  # noqa: E402  (the arguments live with the command line)


def run_cli(args: argparse.Namespace) -> int:
    run_demo(
        args.out,
        quick=args.quick,
        seed=args.seed,
        progress=not args.no_progress,
        temperature=getattr(args, "temperature", DEFAULT_TEMPERATURE),
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowconvert.demo", description=__doc__.splitlines()[0])
    configure_cli(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
