"""Import cost of flowconvert next to ``import torch``, measured side by side in one run.

Each case is a fresh interpreter (``python -c ...`` or the command line), timed wall-clock,
interleaved round by round so that machine load affects every case alike; the median over
the rounds is reported with its ratio to ``import torch``. Targets (issue: light imports):
``import flowconvert`` and ``from flowconvert import convert`` at most 1.3x ``import torch``,
``flowconvert --help`` faster than ``import torch``.

    python benchmarks/imports.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import flowconvert": [sys.executable, "-c", "import flowconvert"],
    "from flowconvert import convert": [sys.executable, "-c", "from flowconvert import convert"],
    "import flowconvert (every public name)": [
        sys.executable,
        "-c",
        "import flowconvert as fc; [getattr(fc, n) for n in fc.__all__]",
    ],
    "flowconvert --help": [sys.executable, "-m", "flowconvert", "--help"],
}


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for cmd in CASES.values():  # warm the file cache once
        _time(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, cmd in CASES.items():
            times[name].append(_time(cmd, env))
    torch_time = statistics.median(times["import torch"])
    print(f"{'case':<42}{'median s':>10}{'x torch':>9}   (rounds: {args.rounds})")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:<42}{median:>10.3f}{median / torch_time:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
