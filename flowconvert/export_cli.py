"""The ``flowconvert export`` subcommand: a model or a saved flow to a verified ONNX file.

``flowconvert export TARGET --input-shape 1,64 -o model.onnx`` converts TARGET first;
``flowconvert export flow.safetensors -o model.onnx`` loads a flow saved by ``flowconvert convert``
(:func:`flowconvert.load`; its input shapes are known; ``--batch`` sets the example batch).
Pickled files are refused, never unpickled. Exit status: 0 exported
and verified, 1 the model could not be converted or the export failed a check, 2 bad usage.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> configure(parser)
>>> args = parser.parse_args(["flow.safetensors", "-o", "m.onnx", "--graph", "inverse", "--noise", "input"])
>>> args.graph, args.noise, args.verify
('inverse', 'input', True)
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    from .cli import parse_shape  # the one shape parser of the command line (cli imports this module)

    parser.add_argument("target", metavar="TARGET|FLOW",
                        help="package.module:attr or path/to/file.py:attr, or a flow saved by 'flowconvert convert'")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--graph", choices=["likelihood", "inverse"], default="likelihood",
                        help="likelihood: inputs -> outputs and log_prob; inverse: outputs -> inputs")
    parser.add_argument("--noise", choices=["zero", "input", "random"], default="zero",
                        help="zero: deterministic; input: noise tensors are graph inputs; random: drawn in the graph")
    parser.add_argument("--input-shape", type=parse_shape, action="append", metavar="SHAPE",
                        help="example input shape, batch first (required for a TARGET; repeat for several inputs)")
    parser.add_argument("--batch", type=int, default=4, help="example batch size for a saved flow (default 4)")
    parser.add_argument("--weights", metavar="FILE", help="state dict to load into TARGET")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    parser.add_argument("--base", choices=["standard", "diagonal"], default="standard", help="base density per output")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--report", nargs="?", const=True, default=False, metavar="FILE",
                        help="write the Markdown export report (default: next to the model, .md)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the onnxruntime run and the comparison with PyTorch")


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli import UsageError, _audit, _render, example_inputs
    from .errors import FlowConversionError
    from .export import export_onnx

    if os.path.isfile(args.target):  # a saved flow (a model TARGET names an attribute: file.py:attr)
        from .errors import FileFormatError
        from .io import load

        try:
            flow = load(args.target)
        except FileFormatError as exc:
            raise UsageError(str(exc)) from exc
        if not hasattr(flow, "forward_with_log_prob"):
            raise UsageError(f"{args.target} holds a {type(flow).__name__}, not a flow saved by 'flowconvert convert'")
        flow = flow.to(getattr(torch, args.dtype))
        if args.input_shape:
            inputs = example_inputs(args)
        else:
            gen = torch.Generator().manual_seed(args.seed)
            inputs = tuple(torch.randn((args.batch, *s), generator=gen, dtype=getattr(torch, args.dtype))
                           for s in flow.input_shapes)
    else:
        if not args.input_shape:
            raise UsageError("--input-shape is required when TARGET is a model (e.g. --input-shape 1,64)")
        report, flow = _audit(args)
        if flow is None:
            print(_render(report, "text"))
            return 1
        inputs = example_inputs(args)
    try:
        result = export_onnx(flow, args.output, inputs, graph=args.graph, noise=args.noise, opset=args.opset,
                             verify=args.verify, seed=args.seed, report=args.report)
    except FlowConversionError as exc:
        print(f"flowconvert export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.path} ({result.graph}, noise={result.noise}, opset {result.opset}, "
          f"{sum(result.op_counts.values())} nodes)")
    print("  inputs:  " + ", ".join(f"{n} {tuple(result.input_shapes[n])}" for n in result.input_names))
    print("  outputs: " + ", ".join(f"{n} {tuple(result.output_shapes[n])}" for n in result.output_names))
    if result.parity:
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.max_abs_diff.items())
        what = "max abs diff of means over draws" if result.noise == "random" else "max abs diff"
        print(f"  onnxruntime vs PyTorch, {what}: {diffs}")
    if result.report_path:
        print(f"  report: {result.report_path}")
    return 0
