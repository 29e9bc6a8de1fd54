"""Likelihood pass in onnxruntime versus PyTorch eager, same converted model, same machine.

Models: the MLP 784-512-256-128-64-32-8 (LeakyReLU) and a CNN of about 1M parameters on
1x28x28 inputs (taken from ``benchmarks/model.py`` when it defines them). For each, the
deterministic likelihood graph is exported (``noise="zero"``, verified), then both runtimes
compute outputs and ``log_prob`` at batch 1 and 128; the ratios are measured in this run.

    python benchmarks/onnx.py [--repeats 50] [--threads N]
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path and the file would shadow
# the onnx package itself: replace that entry by the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import tempfile
import time

import numpy as np
import torch
from torch import nn

import flowconvert as fc


def mlp() -> nn.Module:
    sizes = (784, 512, 256, 128, 64, 32, 8)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.01))
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    """About 1M parameters: 1x28x28 -> 32x14x14 -> 64x7x7 -> 256 -> 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, stride=2),
        nn.LeakyReLU(0.01),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.LeakyReLU(0.01),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.LeakyReLU(0.01),
        nn.Linear(256, 10),
    )


def _models():
    try:  # the converter benchmark's definitions, when present
        from benchmarks import model as shared  # type: ignore

        make_mlp = getattr(shared, "mlp", None) or getattr(shared, "make_mlp", None) or mlp
        make_cnn = getattr(shared, "CNN", None) or getattr(shared, "cnn", None) or cnn
    except ImportError:
        make_mlp, make_cnn = mlp, cnn
    return {"MLP 784-512-256-128-64-32-8": (make_mlp, (784,)), "CNN 1x28x28": (make_cnn, (1, 28, 28))}


def _time(fn, repeats: int) -> float:
    """Median seconds per call, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<28} {'params':>8} {'batch':>5} {'torch ms':>9} {'ort ms':>8} {'torch/ort':>9}")
    tmp = tempfile.mkdtemp()
    for i, (name, (make, shape)) in enumerate(_models().items()):
        torch.manual_seed(0)
        net = make().eval()
        params = sum(p.numel() for p in net.parameters())
        flow = fc.convert(net, torch.randn(2, *shape)).eval()
        path = os.path.join(tmp, f"model{i}.onnx")
        result = fc.export_onnx(flow, path, torch.randn(4, *shape))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for batch in (1, 128):
            x = torch.randn(batch, *shape)
            feeds = {result.input_names[0]: x.numpy()}

            def eager():
                with torch.no_grad():
                    flow.forward_with_log_prob(x, deterministic=True)

            t_torch = _time(eager, args.repeats)
            t_ort = _time(lambda: session.run(None, feeds), args.repeats)
            print(
                f"{name:<28} {params:>8} {batch:>5} {1e3 * t_torch:>9.3f} {1e3 * t_ort:>8.3f} {t_torch / t_ort:>8.2f}x"
            )


if __name__ == "__main__":
    main()
