"""Architecture zoo benchmark: conversion time, likelihood cost and ONNX parity, one table.

For each model of the test zoo (``tests/test_zoo.py``): the wall time of ``fc.convert``,
the ratio of the deterministic ``log_prob`` pass to the original model's forward pass at
batch 64 (median of repeated timings, ``torch.no_grad``), the number of flow layers, whether
the likelihood is exact or a bound, the largest output deviation for models converted with
``relu="leaky"``, and the ONNX export of the likelihood graph with its onnxruntime parity
(largest absolute difference over outputs and ``log_prob``).

    python benchmarks/zoo.py [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# this directory holds scripts named like packages (onnx.py): keep it off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_zoo import ZOO, make

import flowconvert as fc


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in ZOO:
        model, shape, relu = make(name)
        example = torch.randn(8, *shape)
        start = time.perf_counter()
        flow = fc.convert(model, example, relu=relu)
        convert_s = time.perf_counter() - start
        x = torch.randn(args.batch, *shape)
        with torch.no_grad():
            t_fwd = timed(lambda: model(x), args.repeats)
            t_lp = timed(lambda: flow.log_prob(x, deterministic=True), args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            result = fc.export_onnx(flow, Path(tmp) / f"{name}.onnx", example[:2])
        dev = flow.report.max_output_deviation
        rows.append(
            (
                name,
                f"{convert_s:.2f}",
                f"{t_lp / t_fwd:.1f}",
                str(len(flow.layers)),
                "exact" if flow.exact else "bound",
                "-" if dev is None else f"{dev:.2g}",
                f"{max(result.max_abs_diff.values()):.1e}",
                "yes" if result.verified else "NO",
            )
        )
    head = (
        "model",
        "convert [s]",
        "log_prob/forward",
        "flow layers",
        "likelihood",
        "ReLU->Leaky deviation",
        "ONNX max abs diff",
        "ONNX parity",
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"batch {args.batch}, {args.threads} threads, median of {args.repeats}, torch {torch.__version__}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
