"""Long fuzzing run: N random architectures, every SPEC obligation, failure counts per obligation.

    python benchmarks/fuzz.py            # 2000 models, seed 0
    python benchmarks/fuzz.py 500 --seed 7 --onnx-every 50 --show 5

Model ``i`` is ``build(RandomChoices(seed * 1_000_003 + i))`` from ``tests/architectures.py``,
so any failure is reproduced by its index alone (``--only i``). Every model is checked with
``tests/model_obligations.check``; every ``--onnx-every``-th one also exports both graphs to
ONNX (slow: seconds per export), and every ``--train-every``-th one is calibrated and trained
(``fc.fit(train="all")``, a few steps) and checked again. Prints a progress bar, a table of outcomes per obligation
(``ok`` / ``fail`` / ``skip`` = not applicable) and the first ``--show`` failures with their architecture, and exits with status 1
when any obligation failed.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this directory holds benchmarks/onnx.py, which must not shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch
from architectures import RandomChoices, build
from model_obligations import OBLIGATIONS, check
from tqdm import tqdm


def model_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=2000, help="number of models (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--onnx-every", type=int, default=100, help="ONNX parity on every k-th model (0: never)")
    parser.add_argument(
        "--train-every", type=int, default=10, help="calibrate + fit(train='all') checks on every k-th model (0: never)"
    )
    parser.add_argument("--show", type=int, default=10, help="print the first SHOW failures in full")
    parser.add_argument("--only", type=int, default=None, help="check only model INDEX, verbosely")
    parser.add_argument("--start", type=int, default=0, help="index of the first model (default 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    indices = [args.only] if args.only is not None else list(range(args.start, args.start + args.n))
    counts: dict[str, collections.Counter] = {name: collections.Counter() for name in OBLIGATIONS}
    failures: list[tuple[int, str, str, str]] = []
    failed_models = 0
    start = time.perf_counter()
    bar = tqdm(indices, desc="fuzz", unit="model", dynamic_ncols=True, file=sys.stderr)
    for i in bar:
        arch = build(RandomChoices(model_seed(args.seed, i)))
        onnx = args.only is not None or (args.onnx_every > 0 and i % args.onnx_every == 0)
        train = args.only is not None or (args.train_every > 0 and i % args.train_every == 0)
        results = check(arch, onnx=onnx, train=train, seed=i)
        any_fail = False
        for name, out in results.items():
            counts[name][out.status] += 1
            if out.status == "fail":
                any_fail = True
                failures.append((i, name, out.detail, arch.describe()))
        failed_models += any_fail
        bar.set_postfix(failed=failed_models)
        if args.only is not None:
            print(arch.describe())
            print(arch.model)
            for name, out in results.items():
                print(f"  {name:18s} {out}")
    bar.close()
    elapsed = time.perf_counter() - start

    print(f"\n{len(indices)} models (seed {args.seed}) in {elapsed:.0f} s; {failed_models} with a failed obligation")
    print(f"{'obligation':20s}{'ok':>8s}{'fail':>8s}{'skip':>8s}")
    for name in OBLIGATIONS:
        c = counts[name]
        print(f"{name:20s}{c['ok']:8d}{c['fail']:8d}{c['skip']:8d}")
    for i, name, detail, text in failures[: args.show]:
        print(
            f"\n[model {i}] {name}: {detail}\n  {text}\n  reproduce: python benchmarks/fuzz.py --only {i} --seed {args.seed}"
        )
    if len(failures) > args.show:
        print(f"\n... and {len(failures) - args.show} more failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
