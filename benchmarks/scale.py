"""Conversion at scale: audit and conversion time, peak memory and the finished flow's size on published networks.

For each torchvision architecture (random weights, eval mode, ``relu="leaky"``, one 224x224
example) one fresh process builds the model, then measures

* ``audit`` and ``convert`` wall time (and the process's CPU time, which a loaded machine
  inflates less), and conversion seconds per 2M parameters (target: about 1 s);
* the model's and the finished flow's size (bytes of the distinct tensors each holds) and
  their ratio (target: a small multiple), and ``retained``: every tensor the process still
  references once the model is deleted (equal to the flow's size when nothing else, e.g. a
  copy of the model, is kept alive);
* peak memory during conversion: the process's peak resident set minus its resident set
  before ``convert`` (``resource.getrusage``; torch allocates outside ``tracemalloc``'s view),
  next to the flow's size (target: a small multiple of it);
* with ``--export``: the same for ``fc.export_onnx`` of the likelihood graph (no verification),
  which prepares the flow in place instead of copying it.

Models run one after another (one heavy job at a time), each in its own process so that the
peaks do not mix. torchvision is imported through ``tests/published.py`` (it declares the
compiled-operator schemas the CPU torch lacks); ReLU6 is replaced by ReLU when the installed
flowconvert does not substitute it (reported in the ``note`` column).

    python benchmarks/scale.py [--models resnet50,mobilenet_v2] [--threads 1] [--export]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this directory holds scripts named like packages (onnx.py): keep it off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MODELS = ("mobilenet_v2", "resnet18", "resnet50", "alexnet", "vgg11_bn")
MB = 2**20


def tensor_bytes(module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the process still references."""
    import gc

    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def rss() -> int:
    """The process's current resident set in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, threads: int, export: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    from published import torchvision_model

    import flowconvert as fc

    model = torchvision_model(name)
    x = torch.randn(1, 3, 224, 224)
    note = ""
    report = fc.audit(model, x, relu="leaky")
    if not report.convertible and set(report.counts) <= {"FC106"}:  # ReLU6, before relu="leaky" covered it
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.ReLU6):
                    setattr(parent, child_name, torch.nn.ReLU())
        note = "ReLU6 -> ReLU by hand"
    report, audit_s, audit_cpu = timed(functools.partial(fc.audit, model, x, relu="leaky"))
    if not report.convertible:
        return {"name": name, "note": f"refused: {report.counts}"}
    params = sum(p.numel() for p in model.parameters())
    before = rss()
    flow, convert_s, convert_cpu = timed(functools.partial(fc.convert, model, x, relu="leaky"))
    row = {
        "name": name,
        "params_M": params / 1e6,
        "audit_s": audit_s,
        "audit_cpu_s": audit_cpu,
        "convert_s": convert_s,
        "convert_cpu_s": convert_cpu,
        "model_MB": tensor_bytes(model) / MB,
        "flow_MB": tensor_bytes(flow) / MB,
        "convert_peak_MB": (peak_rss() - before) / MB,
        "note": note,
    }
    del model, report
    row["retained_MB"] = live_tensor_bytes() / MB  # with the model gone: what the flow keeps alive
    if export:
        with tempfile.TemporaryDirectory() as tmp:
            # a first tiny export loads the exporter's libraries: their memory is not the flow's
            tiny = fc.FlowLinear.from_module(torch.nn.Linear(2, 2))
            fc.export_onnx(tiny, Path(tmp) / "tiny.onnx", torch.randn(2, 2), verify=False)
            before = rss()
            _, row["export_s"], _ = timed(lambda: fc.export_onnx(flow, Path(tmp) / "f.onnx", x, verify=False))
            row["export_peak_MB"] = (peak_rss() - before) / MB
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.threads, args.export)))
        return
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads)] + (
            ["--export"] if args.export else []
        )
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"name": name, "note": f"failed: {out.stderr.strip().splitlines()[-1:]}"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = (
        f"{'model':<14}{'params':>8}{'audit':>8}{'convert':>9}{'s/2M':>7}{'cpu s/2M':>9}"
        f"{'model MB':>10}{'flow MB':>9}{'flow/model':>11}{'retained':>9}{'peak MB':>9}{'peak/flow':>10}"
    )
    if args.export:
        head += f"{'export':>8}{'exp peak/flow':>14}"
    print(f"threads={args.threads}; peak = resident-set growth during convert (export) over the state before")
    print(head + "  note")
    for r in rows:
        if "convert_s" not in r:
            print(f"{r['name']:<14}  {r['note']}")
            continue
        per = 2.0 / r["params_M"]
        line = (
            f"{r['name']:<14}{r['params_M']:>7.1f}M{r['audit_s']:>7.2f}s{r['convert_s']:>8.2f}s"
            f"{r['convert_s'] * per:>7.2f}{r['convert_cpu_s'] * per:>9.2f}{r['model_MB']:>10.0f}{r['flow_MB']:>9.0f}"
            f"{r['flow_MB'] / r['model_MB']:>11.2f}{r['retained_MB']:>9.0f}{r['convert_peak_MB']:>9.0f}"
            f"{r['convert_peak_MB'] / r['flow_MB']:>10.2f}"
        )
        if args.export:
            line += f"{r['export_s']:>7.1f}s{r['export_peak_MB'] / r['flow_MB']:>14.2f}"
        print(line + ("  " + r["note"] if r["note"] else ""))


if __name__ == "__main__":
    main()
