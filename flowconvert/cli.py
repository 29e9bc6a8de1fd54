"""Command line: ``flowconvert audit|convert|export|demo ...``.

TARGET is ``package.module:attr`` or ``path/to/file.py:attr`` naming an ``nn.Module``
instance, an ``nn.Module`` class, or a zero-argument factory. Exit status: 0 success
(convertible), 1 not convertible or a failed check (the report is printed), 2 bad usage or
input (a message without a traceback; ``--debug`` shows it).

The whole job from the shell, no Python written::

    flowconvert audit   model.py:Net --input-shape 1,64 --weights net.pt
    flowconvert convert model.py:Net --input-shape 1,64 --weights net.pt --calibrate train.npy -o flow.pt
    flowconvert export  flow.pt -o flow.onnx

Arguments are parsed before torch is imported (``--help`` and usage errors are quick).
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
import io
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "main",
    "build_parser",
    "register_command",
    "load_target",
    "load_data",
    "example_inputs",
    "UsageError",
    "COMMANDS",
    "EXIT_STATUS",
]

#: What the exit statuses mean (printed by every ``--help``).
EXIT_STATUS = """exit status:
  0  success (convertible; flow saved; ONNX exported and verified)
  1  not convertible, or a check failed (the report is printed)
  2  bad usage or input (a message on stderr, no traceback; --debug shows it)"""


class UsageError(Exception):
    """Bad usage or input: printed without a traceback, exit status 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int]
) -> None:
    """Add a subcommand: ``configure(parser)`` adds arguments, ``run(args)`` returns the exit status."""
    COMMANDS[name] = Command(name, help, configure, run)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option that has a default worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and action.option_strings
            and action.nargs != 0
        ):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
        return text


# -- shared arguments and helpers ---------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,64"`` -> ``(1, 64)``; the first size is the batch, so one number is refused.

    >>> parse_shape("1,3,32,32")
    (1, 3, 32, 32)
    """
    try:
        shape = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,64 or 1,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,64 (positive sizes, batch first)")
    if len(shape) == 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no batch dimension: shapes are batch first, so a model taking {shape[0]} "
            f"features needs --input-shape 1,{shape[0]}"
        )
    return shape


def add_model_arguments(parser: argparse.ArgumentParser, *, shape_required: bool = True) -> None:
    """TARGET, --input-shape, --weights, --dtype, --seed: what every model-taking command needs."""
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="package.module:attr or path/to/file.py:attr (a module instance, class or zero-arg factory)",
    )
    add_input_arguments(parser, shape_required=shape_required)


def add_input_arguments(parser: argparse.ArgumentParser, *, shape_required: bool = True) -> None:
    parser.add_argument(
        "--input-shape",
        type=parse_shape,
        action="append",
        required=shape_required,
        metavar="SHAPE",
        help="example input shape, batch first, e.g. 1,64 or 1,3,32,32 (repeat for several inputs)"
        + ("" if shape_required else "; required when TARGET is a model"),
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="trained weights: a state dict saved with torch.save(model.state_dict(), FILE) "
        "or a .safetensors file (never unpickled)",
    )
    add_choice(parser, "--dtype", ["float32", "float64"], "dtype of the model, the example inputs and the data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random example inputs, noise and data splits")


def add_choice(parser, flag: str, choices: list[str], help: str, default: str | None = "") -> None:
    """An option taking one of ``choices``; by default the first one (``default=None``: not given)."""
    parser.add_argument(flag, choices=choices, default=choices[0] if default == "" else default, help=help)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """--relu, --negative-slope, --base, --density: how a model is converted (audit takes the same)."""
    add_choice(
        parser,
        "--relu",
        ["refuse", "leaky"],
        "refuse: ReLU blocks the conversion (FC101); leaky: substitute LeakyReLU and report the output deviation",
    )
    parser.add_argument(
        "--negative-slope",
        type=float,
        default=0.01,
        metavar="SLOPE",
        help="slope of the substituted LeakyReLU (with --relu leaky)",
    )
    parser.add_argument(
        "--substitute",
        action="append",
        default=[],
        metavar="FAMILY=NAME",
        help="substitute an activation family, e.g. gelu=leaky or silu=leaky (repeatable; relu6=none keeps "
        "a family --relu leaky covers refused); families and substitutes: docs/supported.md",
    )
    add_choice(
        parser,
        "--density",
        ["gaussian", "mlp", "flow"],
        "density family of the coordinates a layer drops: linear-Gaussian, MLP-conditioned Gaussian, "
        "or a conditional spline flow (zuko)",
    )
    add_choice(
        parser,
        "--base",
        ["gaussian", "diagonal", "full", "standard", "mixture", "flow"],
        "base density of each output: learnable Gaussian (full covariance up to 256 coordinates), "
        "diagonal or full-covariance Gaussian, standard normal, Gaussian mixture, "
        "or a spline flow (default: the --density family's)",
        default=None,
    )


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
        if os.path.splitext(target)[1] in FLOW_SUFFIXES + (".py",) and not os.path.exists(target):
            raise UsageError(f"no such file: {target}")
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


def _torch_load_safely(path: str, what: str):
    """``torch.load(weights_only=True)``, with advice the command line can act on."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"{path} holds pickled Python objects, which flowconvert never loads (unpickling runs arbitrary "
            f"code). Save {what}"
        ) from exc
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def load_weights(model, path: str) -> None:
    """Load a state dict (torch.save of ``model.state_dict()`` or .safetensors) into ``model``."""
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"no such weights file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exc:
            raise UsageError(f"cannot read weights from {path}: {exc}") from exc
    else:
        state = _torch_load_safely(path, "the state dict instead: torch.save(model.state_dict(), path)")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, torch.nn.Module) or not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict: save it with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"weights in {path} do not fit the model: {exc}") from exc


# -- data files ---------------------------------------------------------------------------------
DATA_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


def _split_key(spec: str) -> tuple[str, str | None]:
    """``"train.npz:x"`` -> ``("train.npz", "x")``; a plain path has no key."""
    path, sep, key = spec.rpartition(":")
    if sep and path.endswith(DATA_SUFFIXES) and key and not os.path.exists(spec):
        return path, key
    return spec, None


def _pick(arrays: dict, path: str, key: str | None):
    if key is not None:
        if key not in arrays:
            raise UsageError(f"{path} has no array {key!r} (it has {', '.join(sorted(arrays)) or 'none'})")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if "x" in arrays:
        return arrays["x"]
    raise UsageError(f"{path} holds several arrays ({', '.join(sorted(arrays))}): name one as {path}:NAME")


def load_data(spec: str, dtype: str = "float32"):
    """A data tensor (examples first) from ``.npy``/``.npz``/``.safetensors``/``.pt``, loaded safely.

    ``FILE:NAME`` picks one array of an ``.npz``, ``.safetensors`` or ``.pt`` dict (by default the
    only one, or the one named ``x``). Nothing is unpickled: ``np.load(allow_pickle=False)``,
    safetensors, ``torch.load(weights_only=True)``.
    """
    import numpy as np
    import torch

    path, key = _split_key(spec)
    if not os.path.isfile(path):
        raise UsageError(f"no such data file: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(
                f"{path} holds Python objects, which flowconvert never unpickles: save a numeric array "
                f"(np.save(path, x.astype('float32')))"
            ) from exc
        except Exception as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        if isinstance(loaded, np.ndarray):
            array = loaded
        else:
            with loaded:
                try:
                    array = _pick({k: loaded[k] for k in loaded.files}, path, key)
                except ValueError as exc:
                    raise UsageError(f"{path} holds Python objects, which flowconvert never unpickles") from exc
        if array.dtype.kind not in "biuf":
            raise UsageError(f"{path} holds {array.dtype} values, not numbers")
        data = torch.from_numpy(np.ascontiguousarray(array))
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = _pick(load_file(path), path, key)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
    elif suffix in (".pt", ".pth"):
        loaded = _torch_load_safely(path, "a tensor instead (torch.save(x, path)), or np.save an array")
        if isinstance(loaded, (tuple, list)) and loaded and isinstance(loaded[0], torch.Tensor):
            loaded = loaded[0]  # (inputs, labels)
        if isinstance(loaded, dict):
            loaded = _pick(loaded, path, key)
        if not isinstance(loaded, torch.Tensor):
            raise UsageError(f"{path} holds a {type(loaded).__name__}, not a tensor")
        data = loaded
    else:
        raise UsageError(f"{path}: data must be a {', '.join(DATA_SUFFIXES)} file")
    if data.dim() < 1 or data.shape[0] == 0:
        raise UsageError(f"{path} holds no examples (shape {tuple(data.shape)})")
    if data.dtype == torch.bool or data.is_complex():
        raise UsageError(f"{path} holds {data.dtype} values, not real numbers")
    return data.to(getattr(torch, dtype))


# -- the model and its conversion ----------------------------------------------------------------
#: file endings of a saved flow
FLOW_SUFFIXES = (".pt", ".pth", ".safetensors", ".fcflow")


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


def conversion_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``fc.convert`` given by the policy options."""
    options: dict[str, Any] = {"density": getattr(args, "density", "gaussian")}
    if getattr(args, "base", None) is not None:
        options["base"] = args.base
    substitute = parse_substitutions(getattr(args, "substitute", []))
    if getattr(args, "relu", "refuse") == "leaky" or substitute:
        options["negative_slope"] = args.negative_slope
    if getattr(args, "relu", "refuse") == "leaky":
        options["relu"] = "leaky"
    if substitute:
        options["substitute"] = substitute
    return options


def parse_substitutions(items: list[str]) -> dict[str, str | None]:
    """``["gelu=leaky", "relu6=none"]`` -> ``{"gelu": "leaky", "relu6": None}``, checked against the registry."""
    from .registry import resolve_substitutions

    out: dict[str, str | None] = {}
    for item in items:
        family, sep, name = item.partition("=")
        if not sep or not family or not name:
            raise UsageError(f"--substitute expects FAMILY=NAME (e.g. gelu=leaky), got {item!r}")
        out[family.strip().lower()] = None if name.strip().lower() == "none" else name.strip()
    try:
        resolve_substitutions(None, out)
    except ValueError as exc:
        raise UsageError(f"--substitute: {exc}") from exc
    return out


def _audit(args: argparse.Namespace, build: bool = True):
    """(report, flow): ``fc.convert`` with the policy options (flow None when refused), or only
    ``fc.audit`` (no layer built) when ``build`` is False."""
    from .conversion import audit, audit_and_convert, convert
    from .errors import ConversionError
    from .tracing import ExampleInputError

    model = load_model(args)
    options = conversion_options(args)
    try:
        if not build:
            options.pop("density")
            if options.get("base") not in (None, "standard", "diagonal"):
                options.pop("base")  # a family's base: the audit's verdict does not depend on it
            if "relu" in options or "substitute" in options:  # a substitution's deviation needs a built flow
                return audit_and_convert(model, example_inputs(args), **options)[0], None
            return audit(model, example_inputs(args), **options), None
        flow = convert(model, example_inputs(args), **options)
        return flow.report, flow
    except ExampleInputError as exc:
        raise UsageError(str(exc)) from exc
    except ConversionError as exc:
        return exc.report, None


def _render(report, fmt: str) -> str:
    return {"text": str, "markdown": lambda r: r.to_markdown(), "json": lambda r: r.to_json()}[fmt](report)


def save_flow(flow, path: str) -> None:
    """Write ``flow`` to ``path`` with :func:`flowconvert.save` (safetensors + JSON, no pickle)."""
    from .errors import FileFormatError
    from .io import save

    try:
        save(flow, path)
    except FileFormatError as exc:
        raise UsageError(str(exc)) from exc


def load_flow(path: str):
    """Read a flow written by :func:`save_flow` with :func:`flowconvert.load` (never unpickles)."""
    from .errors import FileFormatError
    from .io import load

    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    try:
        return load(path)
    except FileFormatError as exc:
        raise UsageError(str(exc)) from exc


def check_output_path(path: str) -> None:
    """Fail before any work when ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write {path}: no such directory {os.path.dirname(path) or '.'}")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path}: it is a directory")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write {path}: the directory is not writable")


# -- audit ----------------------------------------------------------------------------------
def _configure_audit(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_policy_arguments(parser)
    add_choice(parser, "--format", ["text", "markdown", "json"], "report format")


def _run_audit(args: argparse.Namespace) -> int:
    report, _ = _audit(args, build=False)
    print(_render(report, args.format))
    return 0 if report.convertible else 1


# -- convert --------------------------------------------------------------------------------
def _configure_convert(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FLOW", help="where to save the flow")
    add_policy_arguments(parser)
    group = parser.add_argument_group("densities (without these the densities stay untrained and log p is meaningless)")
    group.add_argument(
        "--calibrate",
        metavar="DATA",
        help="fit the densities in closed form on DATA (.npy, .npz, .safetensors or .pt; "
        "FILE:NAME picks one array), network untouched",
    )
    group.add_argument("--fit", metavar="DATA", help="then train the densities by maximum likelihood on DATA")
    group.add_argument("--epochs", type=int, default=10, help="epochs of --fit")
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate of --fit")
    add_choice(
        group,
        "--train",
        ["densities", "all"],
        "what --fit trains: densities (network frozen, outputs unchanged) or all",
    )
    group.add_argument(
        "--val",
        metavar="DATA",
        help="validation data of --fit (early stopping); by default --val-fraction of the --fit data",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of the --fit data held out for early stopping when --val is not given",
    )
    group.add_argument(
        "--levels",
        type=int,
        metavar="K",
        help="DATA holds integer levels 0..K-1 (K=256 for 8-bit images): dequantize as (k + u) / K",
    )
    add_choice(parser, "--format", ["text", "markdown", "json"], "report format")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for --fit")


def _data_for(spec: str, args: argparse.Namespace):
    """DATA as a tensor checked against the per-example input shape (and --levels)."""
    data = load_data(spec, args.dtype)
    if len(args.input_shape) != 1:
        raise UsageError("--calibrate/--fit take one data file, but the model has several inputs")
    want = tuple(args.input_shape[0][1:])
    if tuple(data.shape[1:]) != want:
        raise UsageError(
            f"{spec} has examples of shape {tuple(data.shape[1:])} ({data.shape[0]} of them); the model takes "
            f"{want} (per example, from --input-shape): reshape the array to ({data.shape[0]}, {', '.join(map(str, want))})"
        )
    if args.levels is not None:
        if args.levels < 2:
            raise UsageError("--levels must be at least 2")
        bad = (data != data.round()) | (data < 0) | (data > args.levels - 1)
        if bool(bad.any()):
            raise UsageError(
                f"--levels {args.levels}: {spec} must hold integers 0..{args.levels - 1}, "
                f"found {data[bad].flatten()[0].item():g}"
            )
    return data


def _run_convert(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    for spec in (args.calibrate, args.fit, args.val):
        if spec is not None and not os.path.isfile(_split_key(spec)[0]):
            raise UsageError(f"no such data file: {_split_key(spec)[0]}")
    if args.val is not None and args.fit is None:
        raise UsageError("--val is the validation data of --fit")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError("--val-fraction must be in [0, 1)")
    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    # every file is read and checked before any work is done or printed
    data = {
        key: _data_for(spec, args)
        for key, spec in (("calibrate", args.calibrate), ("fit", args.fit), ("val", args.val))
        if spec is not None
    }
    report, flow = _audit(args)
    print(_render(report, args.format))
    if flow is None:
        return 1
    import torch

    from .dequantization import Dequantize

    deq = Dequantize(args.levels) if args.levels is not None else None
    if args.calibrate is not None:
        from .calibration import calibrate

        print(calibrate(flow, data["calibrate"], dequantize=deq, seed=args.seed), file=sys.stderr)
        flow.density_state = "calibrated"
    if args.fit is not None:
        from .training import fit

        train, val = data["fit"], data.get("val")
        if val is None and args.val_fraction > 0 and len(train) >= 2:  # early stopping on a split of the fit data
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
            n_val = max(1, int(round(args.val_fraction * len(train))))
            train, val = train[order[n_val:]], train[order[:n_val]]
        history = fit(
            flow,
            train,
            epochs=args.epochs,
            lr=args.lr,
            train=args.train,
            val_data=val,
            dequantize=deq,
            progress=not args.no_progress,
            seed=args.seed,
        )
        best = f", best epoch {history.best_epoch} (0: the starting point)" if history.best_epoch is not None else ""
        last = history.val_bpd[-1] if history.val_bpd else history.train_bpd[-1] if history.train_bpd else float("nan")
        print(
            f"fitted {args.train} for {len(history.epochs)} epochs ({history.steps} steps){best}; "
            f"{'validation' if history.val_bpd else 'training'} bits/dim {last:.4f}",
            file=sys.stderr,
        )
        flow.density_state = "fitted"
    if args.calibrate is None and args.fit is None:
        print(
            "flowconvert convert: warning: the densities are untrained (no --calibrate or --fit), so log p is "
            "not a meaningful likelihood yet",
            file=sys.stderr,
        )
    save_flow(flow, args.output)
    print(f"saved the flow to {args.output}", file=sys.stderr)
    return 0


register_command("audit", "report which nodes of a model can become a flow, and why not", _configure_audit, _run_audit)
register_command(
    "convert",
    "convert a model into a flow, calibrate or fit its densities, and save it",
    _configure_convert,
    _run_convert,
)


# -- demo (flowconvert/demo.py; imported only when it runs) ----------------------------------
def configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="flowconvert-demo", metavar="DIR", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tenth of the epochs (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, training and sampling")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_cli

    return run_cli(args)


register_command(
    "demo",
    "run the digits demo: classifiers -> flows -> bits/dim, OOD, pictures, ONNX (minutes)",
    configure_demo,
    _run_demo,
)


# -- export (flowconvert/export_cli.py) --------------------------------------------------------
from . import export_cli as _export_cli  # noqa: E402  (no torch import until it runs)

register_command(
    "export", "export a model or a saved flow to ONNX, verified in onnxruntime", _export_cli.configure, _export_cli.run
)


# -- entry point ----------------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flowconvert")
    except Exception:  # noqa: BLE001 - not installed: the source tree's version
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowconvert",
        description="Turn trained PyTorch networks into normalizing flows.",
        epilog=EXIT_STATUS,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flowconvert {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        child = sub.add_parser(
            command.name, help=command.help, description=command.help, epilog=EXIT_STATUS, formatter_class=HelpFormatter
        )
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        command.configure(child)
        child.set_defaults(_run=command.run)
    return parser


class _PipeSafeStream(io.TextIOBase):
    """stdout that goes quiet when the reader leaves (``flowconvert audit ... | head``).

    The command still finishes (a ``convert`` still saves its flow) and exits with its own status.
    """

    def __init__(self, stream):
        self._stream = stream
        self._broken = False

    def _quiet(self) -> None:
        self._broken = True
        try:  # later writes and the interpreter's final flush go nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                self._stream.write(text)
            except BrokenPipeError:
                self._quiet()
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._quiet()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 or 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    stdout, formatwarning = sys.stdout, warnings.formatwarning
    sys.stdout = _PipeSafeStream(stdout)
    # library warnings (discrete data, ...) read as messages of the command, not as Python source lines
    warnings.formatwarning = lambda message, category, *rest: f"flowconvert {args.command}: warning: {message}\n"
    try:
        return int(args._run(args))
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"flowconvert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowconvert {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"flowconvert {args.command}: error: {type(exc).__name__}: {exc} (use --debug for the traceback)",
            file=sys.stderr,
        )
        return 2
    finally:
        sys.stdout.flush()
        sys.stdout, warnings.formatwarning = stdout, formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
