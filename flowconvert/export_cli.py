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
import json
import os
import sys

__all__ = ["configure", "run", "parity_verdict", "untrained_warning"]


def configure(parser: argparse.ArgumentParser) -> None:
    from .cli import FLOW_SUFFIXES, add_choice, add_input_arguments, add_policy_arguments

    parser.add_argument(
        "target",
        metavar="FLOW|TARGET",
        help=f"a flow saved by 'flowconvert convert' ({', '.join(FLOW_SUFFIXES)}), or a model: "
        "package.module:attr or path/to/file.py:attr",
    )
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    add_choice(
        parser,
        "--graph",
        ["likelihood", "inverse"],
        "likelihood: inputs -> outputs and log_prob; inverse: outputs -> inputs",
    )
    add_choice(
        parser,
        "--noise",
        ["zero", "input", "random"],
        "zero: deterministic; input: noise tensors are graph inputs; random: drawn in the graph",
    )
    parser.add_argument("--batch", type=int, default=4, help="example batch size for a saved flow")
    add_input_arguments(parser, shape_required=False)
    add_policy_arguments(parser)
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="parity tolerance: |onnx - torch| <= atol + rtol |torch|"
    )
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative part of the parity tolerance")
    parser.add_argument(
        "--report",
        nargs="?",
        const=True,
        default=False,
        metavar="FILE",
        help="write the Markdown export report (default FILE: next to the model, .md)",
    )
    add_choice(
        parser,
        "--format",
        ["text", "markdown", "json"],
        "what to print: a summary, the Markdown export report, or JSON",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the onnxruntime run and the comparison with PyTorch",
    )


def parity_verdict(result, atol: float = 1e-4, rtol: float = 1e-4) -> str:
    """One line: the parity figures of an :class:`~flowconvert.export.ExportResult`, the tolerance and ok / NOT OK.

    Exact checks compare the same inputs and noise elementwise (``|diff| <= atol + rtol |torch|``);
    for ``noise="random"`` the means over draws must agree within 6 standard errors plus that.
    """
    if not result.parity:
        return "onnxruntime vs PyTorch: not checked (--no-verify)"
    ok = all(c.passed for c in result.parity)
    worst: dict[str, object] = {}
    for c in result.parity:
        if c.statistic in ("values", "mean") and (
            c.output not in worst or c.max_abs_diff > worst[c.output].max_abs_diff
        ):
            worst[c.output] = c
    figures = ", ".join(f"{name} {c.max_abs_diff:.2g} (allowed {c.allowed:.2g})" for name, c in worst.items())
    if result.noise == "random":
        draws = max(c.draws for c in result.parity)
        what = f"max abs diff of means over {draws} draws"
        tolerance = f"tolerance 6 standard errors + {atol:g} + {rtol:g}|mean|, means and spreads"
    else:
        what = "max abs diff"
        tolerance = f"tolerance {atol:g} + {rtol:g}|torch|, two batch sizes"
    return f"onnxruntime vs PyTorch, {what}: {figures}; {tolerance}: {'ok' if ok else 'NOT OK'}"


def untrained_warning(flow, name: str) -> str | None:
    """The warning for a flow whose densities were never calibrated or fitted (else None)."""
    state = getattr(flow, "density_state", "untrained")  # flows saved before the attribute existed
    if state != "untrained":
        return None
    return (
        f"flowconvert export: warning: the densities of {name} were never calibrated or fitted, so its log_prob is not a "
        f"meaningful likelihood; convert with --calibrate DATA (and/or --fit DATA) first"
    )


def _summary(result, args) -> str:
    lines = [
        f"wrote {result.path} ({result.graph}, noise={result.noise}, opset {result.opset}, "
        f"{sum(result.op_counts.values())} nodes)",
        "  inputs:  " + ", ".join(f"{n} {tuple(result.input_shapes[n])}" for n in result.input_names),
        "  outputs: " + ", ".join(f"{n} {tuple(result.output_shapes[n])}" for n in result.output_names),
        "  " + parity_verdict(result, args.atol, args.rtol),
    ]
    if result.report_path:
        lines.append(f"  report: {result.report_path}")
    return "\n".join(lines)


def _as_json(result, args) -> str:
    data = {
        "path": str(result.path),
        "graph": result.graph,
        "noise": result.noise,
        "opset": result.opset,
        "inputs": {n: list(result.input_shapes[n]) for n in result.input_names},
        "outputs": {n: list(result.output_shapes[n]) for n in result.output_names},
        "nodes": sum(result.op_counts.values()),
        "exact": result.exact,
        "max_abs_diff": result.max_abs_diff,
        "verified": result.verified,
        "atol": args.atol,
        "rtol": args.rtol,
        "parity": [dict(c.__dict__) for c in result.parity],
        "report": str(result.report_path) if result.report_path else None,
    }
    return json.dumps(data, indent=2, default=str)


def _print_result(result, args) -> None:
    if args.format == "json":
        print(_as_json(result, args))
    elif args.format == "markdown":
        print(result.report())
    else:
        print(_summary(result, args))


def run(args: argparse.Namespace) -> int:
    from .cli import FLOW_SUFFIXES, UsageError, check_output_path, load_flow

    is_flow_file = args.target.endswith(FLOW_SUFFIXES) or (os.path.isfile(args.target) and ":" not in args.target)
    if is_flow_file and not os.path.isfile(args.target):
        raise UsageError(f"no such file: {args.target}")
    if not is_flow_file and ":" not in args.target:
        raise UsageError(
            f"no such file: {args.target} (TARGET is a saved flow, or a model as package.module:attr "
            f"or path/to/file.py:attr)"
        )
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    check_output_path(args.output)

    import torch

    from .cli import _audit, _render, example_inputs
    from .errors import FlowConversionError
    from .export import export_onnx

    if is_flow_file:
        flow = load_flow(args.target).to(getattr(torch, args.dtype))
        if args.input_shape:
            inputs = example_inputs(args)
        else:
            gen = torch.Generator().manual_seed(args.seed)
            inputs = tuple(
                torch.randn((args.batch, *s), generator=gen, dtype=getattr(torch, args.dtype))
                for s in flow.input_shapes
            )
        name = args.target
    else:
        if not args.input_shape:
            raise UsageError("--input-shape is required when TARGET is a model (e.g. --input-shape 1,64)")
        report, flow = _audit(args)
        if flow is None:
            print(_render(report, "text"))
            return 1
        inputs = example_inputs(args)
        name = f"{args.target} (converted just now)"
    warning = untrained_warning(flow, name) if args.graph == "likelihood" else None
    if warning:
        print(warning, file=sys.stderr)
    try:
        result = export_onnx(
            flow,
            args.output,
            inputs,
            graph=args.graph,
            noise=args.noise,
            opset=args.opset,
            verify=args.verify,
            seed=args.seed,
            report=args.report,
            atol=args.atol,
            rtol=args.rtol,
        )
    except FlowConversionError as exc:
        result = getattr(exc, "result", None)
        if result is not None:  # written, but a check failed: the figures and the verdict
            _print_result(result, args)
        print(f"flowconvert export: {exc}", file=sys.stderr)
        return 1
    _print_result(result, args)
    return 0
