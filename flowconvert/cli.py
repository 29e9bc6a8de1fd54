"""Command line: ``flowconvert audit|convert TARGET --input-shape 1,64 ...``.

TARGET is ``package.module:attr`` or ``path/to/file.py:attr`` naming an ``nn.Module``
instance, an ``nn.Module`` class, or a zero-argument factory. Exit status: 0 convertible,
1 not convertible (the report is printed), 2 bad usage or input.

Subcommands are registered with :func:`register_command`; each has a ``configure(parser)``
that adds its arguments and a ``run(args) -> int`` that returns the exit status:

>>> parser = build_parser()
>>> args = parser.parse_args(["audit", "pkg.mod:net", "--input-shape", "1,4"])
>>> args.command, args.input_shape
('audit', [(1, 4)])
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "register_command", "load_target", "example_inputs", "UsageError", "COMMANDS"]


class UsageError(Exception):
    """Bad usage or input: printed without a traceback, exit status 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Add a subcommand: ``configure(parser)`` adds arguments, ``run(args)`` returns the exit status."""
    COMMANDS[name] = Command(name, help, configure, run)


# -- shared arguments and helpers ---------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,64 or 1,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,64 (positive sizes, batch first)")
    return shape


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """TARGET, --input-shape, --weights, --dtype, --seed: what every model-taking command needs."""
    parser.add_argument("target", metavar="TARGET",
                        help="package.module:attr or path/to/file.py:attr (a module instance, class or zero-arg factory)")
    parser.add_argument("--input-shape", type=parse_shape, action="append", required=True, metavar="SHAPE",
                        help="example input shape, batch first, e.g. 1,64 (repeat for several inputs)")
    parser.add_argument("--weights", metavar="FILE", help="state dict to load (torch.load(weights_only=True))")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype of the example inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")


def _import_file(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    name = "_flowconvert_target_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    directory = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(directory)
    return module


def load_target(target: str):
    """Resolve TARGET to an ``nn.Module`` instance (instantiating classes and calling factories)."""
    from torch import nn

    source, sep, attr = target.rpartition(":")
    if not sep or not source or not attr:
        raise UsageError(f"TARGET must look like package.module:attr or path/to/file.py:attr, got {target!r}")
    if source.endswith(".py") or os.sep in source or "/" in source:
        module = _import_file(source)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise UsageError(f"cannot import {source!r}: {exc}") from exc
        finally:
            sys.path.remove(os.getcwd())
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{source} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError as exc:
            raise UsageError(f"{attr} must be a module instance, a class or a zero-argument factory: {exc}") from exc
        if isinstance(made, nn.Module):
            return made
        raise UsageError(f"{attr}() returned {type(made).__name__}, not an nn.Module")
    raise UsageError(f"{attr} is a {type(obj).__name__}, not an nn.Module, class or factory")


def load_weights(model, path: str) -> None:
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"no such weights file: {path}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"weights in {path} do not fit the model: {exc}") from exc


def example_inputs(args: argparse.Namespace) -> tuple:
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for shape in args.input_shape)


def load_model(args: argparse.Namespace):
    """The model named by ``args.target`` (with ``--weights`` loaded and dtype applied)."""
    import torch

    model = load_target(args.target)
    if args.weights:
        load_weights(model, args.weights)
    return model.to(getattr(torch, args.dtype))


def _audit(args: argparse.Namespace):
    from .conversion import audit_and_convert
    from .tracing import ExampleInputError

    model = load_model(args)
    try:
        return audit_and_convert(model, example_inputs(args), base=getattr(args, "base", "standard"))
    except ExampleInputError as exc:
        raise UsageError(str(exc)) from exc


def _render(report, fmt: str) -> str:
    return {"text": str, "markdown": lambda r: r.to_markdown(), "json": lambda r: r.to_json()}[fmt](report)


# -- audit ----------------------------------------------------------------------------------
def _configure_audit(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--format", choices=["text", "markdown", "json"], default="text")


def _run_audit(args: argparse.Namespace) -> int:
    report, _ = _audit(args)
    print(_render(report, args.format))
    return 0 if report.convertible else 1


# -- convert --------------------------------------------------------------------------------
def _configure_convert(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="where to save the flow (flowconvert.save: safetensors + JSON, no pickle)")
    parser.add_argument("--base", choices=["standard", "diagonal"], default="standard", help="base density per output")
    parser.add_argument("--format", choices=["text", "markdown", "json"], default="text")


def _run_convert(args: argparse.Namespace) -> int:
    from .errors import FileFormatError
    from .io import save

    report, flow = _audit(args)
    print(_render(report, args.format))
    if flow is None:
        return 1
    try:
        save(flow, args.output)
    except FileFormatError as exc:
        raise UsageError(str(exc)) from exc
    print(f"saved the flow to {args.output} (load with flowconvert.load(path))", file=sys.stderr)
    return 0


register_command("audit", "report which nodes of a model can become a flow, and why not", _configure_audit, _run_audit)
register_command("convert", "convert a model into a flow and save it (flowconvert.save)", _configure_convert, _run_convert)

from .demo import configure_cli as _configure_demo, run_cli as _run_demo  # noqa: E402

register_command("demo", "run the digits demo: classifiers -> flows -> bits/dim, OOD, pictures, ONNX", _configure_demo, _run_demo)


# -- export (flowconvert/export_cli.py) --------------------------------------------------------
from . import export_cli as _export_cli  # noqa: E402  (no torch import until it runs)

register_command("export", "export a model or a saved flow to ONNX, verified in onnxruntime",
                 _export_cli.configure, _export_cli.run)


# -- entry point ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowconvert", description="Turn trained PyTorch networks into normalizing flows.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        command.configure(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 or 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    try:
        return int(args._run(args))
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"flowconvert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the model's own code may raise anything
        if args.debug:
            raise
        print(f"flowconvert {args.command}: error: {type(exc).__name__}: {exc} (use --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
