"""Published-architecture benchmark: audit, conversion, memory, likelihood cost against its floor, ONNX parity.

For each architecture (torchvision / pytorchcv definitions, random weights, eval mode,
``relu="leaky"``), in its own subprocess so that peak memory is measured per model:

* parameters of the model; audit time; conversion time (and seconds per 2M parameters);
* peak memory during conversion (resident-set growth, sampled, over the fresh process before
  converting) and the finished flow's own size (its parameters and buffers not shared with the model);
* ``log_prob`` time over the model's forward time, deterministic and stochastic (batch
  ``--batch``, ``torch.no_grad``; each ratio is the median over ``--repeats`` rounds that time
  three forwards and three likelihood passes back to back), and the multiply-add *floor* of
  the likelihood pass over the forward's multiply-adds: a funnel convolution/linear map with
  ``n`` inputs per location needs the stacked ``[W; M]`` (``n x n`` per location, SPEC 2),
  every other layer its forward. ``vs floor`` is the time ratio over the MAC ratio
  (target <= 1.5);
* the largest output deviation of the substitutions, finiteness of ``log_prob`` and ``inverse``,
  and the inverse's growth ``max |inverse(flow(x))| / max |x|`` (each LeakyReLU substitute of
  slope s can multiply it by 1/s: deep nets reach 1e20 and beyond, inf when float32 overflows;
  then ``growth in float64`` is the same inverse of the flow converted to float64);
* ONNX parity of the likelihood graph (``--onnx``: names, default resnet18, vgg11_bn, resnet20),
  after closed-form calibration for the deterministic pass on ``--calibrate`` generated inputs
  (uncalibrated densities give finite but absurd figures; 0 skips calibration);
* the refused architectures (ViT, MobileNetV3, EfficientNet) with their problem counts.

    python benchmarks/zoo.py [--models resnet18,nin] [--batch 8] [--repeats 15] [--threads 2] [--negative-slope 0.01]

``--negative-slope`` sets the substitutes' slope: a larger one deviates more from the ReLU network and
amplifies less in the inverse (1/s per substitute on the way back).

All fifteen architectures take about 20 minutes on two cores (about 12 with ``--repeats 5``).

Targets (issue 10): conversion ~1 s per 2M parameters, audit < 3 s, log_prob within 1.5x of
its floor. A row with ``error`` names the failing stage and the exception.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
# this directory holds scripts named like packages (onnx.py): keep it off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

#: name -> (source, constructor name, input shape, constructor kwargs)
ARCHITECTURES = {
    "resnet18": ("torchvision", "resnet18", (3, 64, 64), {}),
    "resnet50": ("torchvision", "resnet50", (3, 64, 64), {}),
    "vgg11_bn": ("torchvision", "vgg11_bn", (3, 64, 64), {}),
    "alexnet": ("torchvision", "alexnet", (3, 96, 96), {}),
    "squeezenet1_1": ("torchvision", "squeezenet1_1", (3, 64, 64), {}),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", (3, 64, 64), {}),
    "resnet20": ("pytorchcv", "resnet20_cifar10", (3, 32, 32), {}),
    "nin": ("pytorchcv", "nin_cifar10", (3, 32, 32), {}),
    "googlenet": ("torchvision", "googlenet", (3, 64, 64), {"aux_logits": False, "init_weights": True}),
    "densenet121": ("torchvision", "densenet121", (3, 64, 64), {}),
    "shufflenet_v2_x0_5": ("torchvision", "shufflenet_v2_x0_5", (3, 64, 64), {}),
    "wrn16_10": ("pytorchcv", "wrn16_10_cifar10", (3, 32, 32), {}),
    "vit_b_16": ("torchvision", "vit_b_16", (3, 224, 224), {}),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", (3, 64, 64), {}),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", (3, 64, 64), {}),
}
DEFAULT_ONNX = ("resnet18", "vgg11_bn", "resnet20")


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    from published import pytorchcv_model, torchvision_model

    source, ctor, shape, kwargs = ARCHITECTURES[name]
    model = torchvision_model(ctor, **kwargs) if source == "torchvision" else pytorchcv_model(ctor)
    return model, shape


def forward_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(multiply-adds of the forward, of the likelihood floor) per sample, from conv/linear hooks."""
    totals = [0, 0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            g = module.groups
            n = module.in_channels // g * module.kernel_size[0] * module.kernel_size[1]
            m = module.out_channels // g
            locations = output.shape[-1] * output.shape[-2]
        elif isinstance(module, nn.Linear):
            n, m, g = module.in_features, module.out_features, 1
            locations = output[0].numel() // m
        else:
            return
        fwd = g * m * n * locations
        totals[0] += fwd
        totals[1] += g * n * n * locations if m < n else fwd  # a funnel's stacked [W; M]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return totals[0], totals[1]


def _per_call(fn, calls: int) -> float:
    """Median seconds of ``calls`` consecutive calls (the first of them warms the caches)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratios(reference, candidates, repeats: int, calls: int = 3) -> list[float]:
    """Median over ``repeats`` rounds of each candidate's time over the reference's in the same round.

    A round times ``calls`` consecutive calls of the reference and then of each candidate
    (median per call), so a slow stretch of a shared machine slows both sides of a ratio
    instead of one of them, while each side still runs warm."""
    for fn in (reference, *candidates):
        fn()
    ratios = [[] for _ in candidates]
    for _ in range(repeats):
        t_ref = _per_call(reference, calls)
        for fn, out in zip(candidates, ratios):
            out.append(_per_call(fn, calls) / t_ref)
    return [statistics.median(r) for r in ratios]


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakRSS:
    """Peak resident-set growth (MB) over the ``with`` block, sampled every 5 ms by a thread."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.growth = self.peak - self.start


def run_one(name: str, batch: int, repeats: int, onnx: bool, calibrate: int, negative_slope: float = 0.01) -> dict:
    import flowconvert as fc

    row: dict = {"model": name}
    stage = "build"
    try:
        model, shape = build(name)
        row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        example = torch.randn(2, *shape)
        x = torch.randn(batch, *shape)
        row["fwd_macs_G"], floor = (v / 1e9 for v in forward_macs(model, x))
        row["floor_x"] = floor / row["fwd_macs_G"]
        # conversion first, in a fresh process: the resident-set growth is then its own peak memory
        stage = "convert"
        start = time.perf_counter()
        with PeakRSS() as mem:
            try:
                flow = fc.convert(model, example, relu="leaky", negative_slope=negative_slope)
            except fc.ConversionError:
                flow = None
        convert_s, convert_peak = time.perf_counter() - start, mem.growth
        stage = "audit"
        start = time.perf_counter()
        with PeakRSS() as mem:
            report = fc.audit(model, example, relu="leaky", negative_slope=negative_slope)
        row["audit_s"] = time.perf_counter() - start
        row["audit_peak_MB"] = mem.growth
        if flow is None or not report.convertible:
            row["refused"] = report.counts
            row["follow_ons"] = len(report.follow_ons)
            row["located"] = all(p.location for _, p in report.problems)
            return row
        row["convert_s"], row["peak_MB"] = convert_s, convert_peak
        shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        tensors = {t.untyped_storage().data_ptr(): t for t in [*flow.parameters(), *flow.buffers()]}
        row["flow_MB"] = sum(t.untyped_storage().nbytes() for p, t in tensors.items() if p not in shared) / 2**20
        row["model_MB"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
        if calibrate:
            stage = "calibrate"
            start = time.perf_counter()
            # for the deterministic pass: the ONNX likelihood graph's zero noise, the det. timing
            fc.calibrate(flow, torch.randn(calibrate, *shape), deterministic=True)
            row["calibrate_s"] = time.perf_counter() - start
        stage = "likelihood"
        with torch.no_grad():
            row["deviation"] = flow.report.max_output_deviation
            got = flow(x)
            row["deviation_batch"] = (got - model(x)).abs().max().item()
            row["det_x"], row["sto_x"] = paired_ratios(
                lambda: model(x), (lambda: flow.log_prob(x, deterministic=True), lambda: flow.log_prob(x)), repeats
            )
            lp = flow.log_prob(x, deterministic=True)
            row["logprob_finite"] = bool(torch.isfinite(lp).all() and torch.isfinite(flow.log_prob(x)).all())
            back = flow.inverse(got)
            row["inverse_finite"] = bool(
                torch.isfinite(back).all() and torch.isfinite(flow.inverse(got, sample=True)).all()
            )
            # how far the deterministic inverse leaves the inputs' scale (inf: not finite in float32)
            row["inverse_growth"] = (
                (back.abs().max() / x.abs().max()).item() if torch.isfinite(back).all() else float("inf")
            )
        row["vs_floor"] = row["det_x"] / row["floor_x"]
        if onnx:
            stage = "onnx"
            with tempfile.TemporaryDirectory() as tmp:
                result = fc.export_onnx(flow, Path(tmp) / f"{name}.onnx", example)
            row["onnx_diff"] = max(result.max_abs_diff.values())
            row["onnx_ok"] = bool(result.verified)
        if not row["inverse_finite"]:  # float32 overflowed: the same inverse in float64 (the flow is not used after)
            stage = "inverse in float64"
            with torch.no_grad():
                flow64, x64 = flow.double(), x.double()
                back = flow64.inverse(flow64(x64))
            row["inverse_growth_64"] = (back.abs().max() / x64.abs().max()).item()
    except Exception as exc:
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return row


def note(row: dict) -> str:
    """The last column: the failure, or the refusal's problem counts by code."""
    if "error" in row:
        return row["error"]
    if "refused" in row:
        codes = ", ".join(f"{c} x{k}" for c, k in row["refused"].items())
        located = "every problem at the model's file:line" if row.get("located") else "some problems without file:line"
        return f"refused: {codes} ({row['follow_ons']} follow-ons collapsed; {located})"
    return ""


def fmt(v, spec: str) -> str:
    return (
        "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ARCHITECTURES))
    parser.add_argument("--onnx", default=",".join(DEFAULT_ONNX), help="models whose ONNX parity is checked")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--calibrate", type=int, default=64, help="generated inputs to calibrate on (0: none)")
    parser.add_argument(
        "--negative-slope", type=float, default=0.01, help="slope of the LeakyReLU substitutes (convert's default 0.01)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        onnx = args.one in args.onnx.split(",")
        print(json.dumps(run_one(args.one, args.batch, args.repeats, onnx, args.calibrate, args.negative_slope)))
        return
    rows = []
    for name in args.models.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            "--onnx",
            args.onnx,
            "--calibrate",
            str(args.calibrate),
            "--negative-slope",
            str(args.negative_slope),
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            row = (
                json.loads(lines[-1])
                if lines
                else {"model": name, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:160]}
            )
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timeout after {args.timeout:.0f} s"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    head = (
        "model",
        "params [M]",
        "audit [s]",
        "convert [s]",
        "s per 2M params",
        "peak conv. [MB]",
        "flow own [MB]",
        "flow own/model size",
        "calibrate [s]",
        "log_prob/fwd det",
        "log_prob/fwd stoch",
        "floor (MACs x fwd)",
        "det vs floor",
        "deviation",
        "log_prob finite",
        "inverse finite",
        "inverse growth",
        "growth in float64",
        "ONNX max diff",
        "ONNX parity",
        "note",
    )
    table = []
    for r in rows:
        per2m = r["convert_s"] / (r["params_M"] / 2) if "convert_s" in r and r.get("params_M") else None
        ratio = r["flow_MB"] / r["model_MB"] if "flow_MB" in r else None
        table.append(
            (
                r["model"],
                fmt(r.get("params_M"), ".2f"),
                fmt(r.get("audit_s"), ".2f"),
                fmt(r.get("convert_s"), ".2f"),
                fmt(per2m, ".2f"),
                fmt(r.get("peak_MB"), ".0f"),
                fmt(r.get("flow_MB"), ".0f"),
                fmt(ratio, ".1f"),
                fmt(r.get("calibrate_s"), ".1f"),
                fmt(r.get("det_x"), ".2f"),
                fmt(r.get("sto_x"), ".2f"),
                fmt(r.get("floor_x"), ".2f"),
                fmt(r.get("vs_floor"), ".2f"),
                fmt(r.get("deviation"), ".2g"),
                fmt(r.get("logprob_finite"), ""),
                fmt(r.get("inverse_finite"), ""),
                fmt(r.get("inverse_growth"), ".1e"),
                fmt(r.get("inverse_growth_64"), ".1e"),
                fmt(r.get("onnx_diff"), ".1e"),
                fmt(r.get("onnx_ok"), ""),
                note(r),
            )
        )
    widths = [max(len(t[i]) for t in [head, *table]) for i in range(len(head))]
    print(
        f"batch {args.batch}, {args.threads} threads, median of {args.repeats} paired rounds, torch {torch.__version__}, relu='leaky', "
        f"negative_slope={args.negative_slope:g}"
    )
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(t, widths)) + " |")


if __name__ == "__main__":
    main()
