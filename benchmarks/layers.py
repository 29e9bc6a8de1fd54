"""Cost of the likelihood pass of flowified layers relative to the original layer.

For each layer, at batch 128 on CPU with a fixed number of threads, prints

    time(call_and_ll under torch.inference_mode) / time(original layer)

in deterministic mode (no noise) and in stochastic mode (noise drawn inside the timed
region), next to its *floor*: the multiply-adds the mathematics needs divided by the
original layer's. Each repeat times the original, the deterministic pass, the stochastic
pass and the original again (each over enough calls to last about 20 ms); a ratio is taken
within a repeat (against the faster of the two original timings) and the median over
repeats is printed, so background load affects numerator and denominator alike.

Then, per layer of a few published sizes, the conversion time (``FlowLinear`` /
``FlowConv`` construction: one LU of ``W^T`` to choose the kept block, one LU of the
block), the values the flow layer holds relative to the weight, and the process's peak
resident memory growth during the construction.

    python benchmarks/layers.py [--threads 2] [--repeats 30] [--batch 128] [--clock wall|cpu] [--no-convert]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import nn

from flowconvert import FlowConv, FlowLinear


def cases():
    """(name, original module, flow layer, input, floor deterministic, floor stochastic)."""
    torch.manual_seed(0)
    out = []
    for n, m in [(784, 512), (512, 512), (64, 256)]:
        lin = nn.Linear(n, m)
        flow = FlowLinear.from_module(lin)
        if m < n:  # funnel: W x plus A y, (n - m) x m
            floor = floor_s = (n * m + (n - m) * m) / (n * m)
        elif m == n:
            floor = floor_s = 1.0
        else:  # augment: deterministic is the original; stochastic adds u to m - n outputs
            floor = floor_s = 1.0  # the noise is added to m - n outputs: elementwise work only
        out.append((f"Linear {n}->{m} ({flow.kind})", lin, flow, (n,), floor, floor_s))
    c_in, c_out, k, hw = 32, 32, 3, 16
    conv = nn.Conv2d(c_in, c_out, k, padding=1)
    flow = FlowConv.from_module(conv, (c_in, hw, hw))
    ck = c_in * k * k
    # per location: the kernel plus A y (the arithmetic floor of x_S - A y; the implementation
    # uses one convolution with M = (E_S - A W) / sigma instead, C_in k^2 / C_out = 9x, because
    # the gather of x_S is memory-bound on CPU)
    floor = (ck * c_out + (ck - c_out) * c_out) / (ck * c_out)
    out.append(
        (
            f"Conv2d {c_in}->{c_out} {k}x{k} pad 1, {hw}x{hw} ({flow.kernel.kind})",
            conv,
            flow,
            (c_in, hw, hw),
            floor,
            floor,
        )
    )
    return out


CLOCK = time.perf_counter


def timed(fn, calls: int) -> float:
    start = CLOCK()
    for _ in range(calls):
        fn()
    return (CLOCK() - start) / calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or this process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument("--no-convert", action="store_true", help="skip the conversion table")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)

    print(
        f"likelihood pass / original layer, batch {args.batch}, {args.threads} threads, CPU, "
        f"{args.clock} clock, median of {args.repeats} interleaved repeats"
    )
    header = f"{'layer':<44} {'orig ms':>8} {'determ.':>8} {'floor':>6} {'stoch.':>8} {'floor':>6}"
    print(header)
    print("-" * len(header))
    for name, orig, flow, shape, floor_d, floor_s in cases():
        orig.eval(), flow.eval()
        x = torch.randn(args.batch, *shape)
        with torch.inference_mode():
            run_orig = lambda: orig(x)
            run_det = lambda: flow.call_and_ll(x)
            run_sto = lambda: flow.call_and_ll(x, flow.draw_noise(x))
            for _ in range(args.warmup):
                run_orig(), run_det(), run_sto()
            # enough calls per measurement that each lasts about 20 ms
            calls = max(1, round(0.02 / timed(run_orig, 3)))
            t_o, r_d, r_s = [], [], []
            for _ in range(args.repeats):  # interleaved; ratios are taken within a repeat
                o = timed(run_orig, calls)
                d = timed(run_det, calls)
                s = timed(run_sto, calls)
                o = min(o, timed(run_orig, calls))  # the original before and after
                t_o.append(o), r_d.append(d / o), r_s.append(s / o)
        med = statistics.median
        print(f"{name:<44} {med(t_o) * 1e3:8.3f} {med(r_d):8.2f} {floor_d:6.2f} {med(r_s):8.2f} {floor_s:6.2f}")
    if not args.no_convert:
        convert_table()


def conversion_cases():
    """(name, builder of the original, builder of the flow layer from it) at published sizes."""
    return [
        ("Linear 8192->1024", lambda: nn.Linear(8192, 1024), FlowLinear.from_module),
        ("Linear 9216->4096 (AlexNet fc6)", lambda: nn.Linear(9216, 4096), FlowLinear.from_module),
        ("Linear 4096->4096 (AlexNet fc7)", lambda: nn.Linear(4096, 4096), FlowLinear.from_module),
        (
            "Conv2d 256->256 3x3, 14x14",
            lambda: nn.Conv2d(256, 256, 3, padding=1),
            lambda m: FlowConv.from_module(m, (256, 14, 14)),
        ),
    ]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert_table() -> None:
    print()
    print("conversion of single layers (float32 weights)")
    header = f"{'layer':<36} {'weights':>11} {'convert s':>10} {'held / weight':>14} {'peak RSS growth MB':>19}"
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for name, make, convert in conversion_cases():
        module = make()
        numel = module.weight.numel()
        before = rss_mb()
        start = time.perf_counter()
        flow = convert(module)
        elapsed = time.perf_counter() - start
        held = sum(t.numel() for t in [*flow.parameters(), *flow.buffers()])
        print(f"{name:<36} {numel:>11,} {elapsed:10.2f} {held / numel:14.2f} {rss_mb() - before:19.0f}")
        del flow


if __name__ == "__main__":
    main()
