r"""Saving and loading flows as data: :func:`save` and :func:`load`, never a pickle.

A flow file is one `safetensors <https://github.com/huggingface/safetensors>`_ file: every
tensor of the flow (its state dict, plus the non-persistent buffers, so that outputs are
reproduced bit for bit) and, in the header's metadata, a versioned JSON description:

* for every recorded module of the flow (:mod:`flowconvert.config`: flow layers, density
  families, base densities, noise and the :class:`~flowconvert.flow.FlowModel` itself), its
  class and the arguments of its constructor call, tensors by reference into the file;
* which modules are in training mode, the public plain attributes of each recorded module,
  and the conversion report (as JSON) when the flow has one.

Loading builds each module by calling its constructor again, from an allow-list of
flowconvert classes (plus ``classes=`` given by the caller), replaces the density parts
that were swapped after construction, and loads the tensors with
``load_state_dict(strict=True)``. Nothing is ever unpickled: a pickled file (``torch.save``,
``pickle``) is refused with :class:`~flowconvert.errors.FileFormatError` (``FC502``) before
anything in it is read, and an unknown version is ``FC503``.

>>> import os, tempfile, torch, flowconvert as fc
>>> torch.manual_seed(0) and None
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LeakyReLU(0.1), torch.nn.Linear(4, 2))
>>> flow = fc.convert(net, torch.randn(1, 4))
>>> path = os.path.join(tempfile.mkdtemp(), "flow.safetensors")
>>> fc.save(flow, path)
>>> again = fc.load(path)
>>> x = torch.randn(3, 4)
>>> torch.equal(again(x), flow(x)), torch.equal(again.log_prob(x), flow.log_prob(x))
(True, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import RECORDED, Configurable, class_key
from .errors import FileFormatError

__all__ = ["FORMAT", "VERSION", "load", "save", "sniff"]

#: ``format`` entry of the metadata of every flow file.
FORMAT = "flowconvert.flow"
#: The file format version this flowconvert writes and reads.
VERSION = 1

_STATE, _BUFFER, _INIT = "state/", "buffer/", "init/"
_PLAIN = (bool, int, float, str, type(None))


# -- writing ------------------------------------------------------------------------------------
def save(flow: nn.Module, path: str | os.PathLike) -> None:
    """Write ``flow`` (a converted :class:`~flowconvert.flow.FlowModel` or a single flow layer) to ``path``.

    The file is written to a temporary name next to ``path`` and renamed when complete, so a
    failed save leaves no file behind. Raises :class:`~flowconvert.errors.FileFormatError`
    (``FC505``) when a part of the flow cannot be described as data.
    """
    import safetensors.torch

    if not isinstance(flow, Configurable) or flow.init_config() is None:
        raise FileFormatError(
            f"fc.save writes converted flows and flow layers; got {type(flow).__name__}", code="FC505"
        )
    writer = _Writer(flow)
    description = {
        "root": class_key(type(flow)),
        "modules": writer.modules,
        "training": [name for name, m in flow.named_modules() if m.training],
        "report": _report(flow),
    }
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "torch": torch.__version__,
        "flowconvert": _flowconvert_version(),
        "description": json.dumps(description, allow_nan=False, separators=(",", ":")),
    }
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"cannot save the flow to {path}: it is a directory", code="FC505")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise FileFormatError(f"cannot save the flow to {path}: {exc.strerror or exc}", code="FC505") from exc
    os.close(fd)
    try:
        safetensors.torch.save_file(writer.tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Writer:
    """Collects the tensors and the per-module descriptions of one flow."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.tensors: dict[str, Tensor] = {}
        self._by_shape: dict[tuple, list[str]] = {}
        self._seen: dict[int, str] = {}
        state = root.state_dict()
        for name, t in state.items():
            self._add(_STATE + name, t)
        for name, t in root.named_buffers():
            if name not in state:
                self._add(_BUFFER + name, t)
        self.paths = {id(m): name for name, m in root.named_modules()}
        self.modules: dict[str, dict] = {}
        for name, module in root.named_modules():
            if isinstance(module, Configurable):
                self.modules[name] = self._spec(module, name)
        self._check_parts()

    def _add(self, key: str, t: Tensor) -> None:
        data = t.detach().to("cpu")
        storage = data.untyped_storage()
        whole = data.is_contiguous() and data.storage_offset() == 0 and data.nbytes == storage.nbytes()
        if not whole or storage.data_ptr() in self._seen:  # a view, or memory already written: own copy
            data = data.contiguous().clone()
        elif data.numel():
            self._seen[storage.data_ptr()] = key
        self.tensors[key] = data if data.is_contiguous() else data.contiguous()
        self._by_shape.setdefault((tuple(t.shape), t.dtype), []).append(key)

    def _check_parts(self) -> None:
        from .core import FlowLayer

        for name, module in self.root.named_modules():
            if not isinstance(module, FlowLayer):
                continue
            for part in module.density_parts():
                sub = module.get_submodule(part.name)
                if not isinstance(sub, Configurable):
                    where = f"{name}.{part.name}" if name else part.name
                    raise FileFormatError(
                        f"density part {where!r} is a {type(sub).__module__}.{type(sub).__qualname__}, not a "
                        "flowconvert density family, so its construction cannot be written as data",
                        code="FC505",
                    )

    def _spec(self, module: Configurable, name: str) -> dict:
        config = module.init_config()
        where = name or type(module).__name__
        if config is None:
            raise FileFormatError(
                f"{where} ({class_key(type(module))}) was not made by its constructor, so fc.save cannot describe it",
                code="FC505",
            )
        args, kwargs = config
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _is_plain(v)}
        return {
            "class": class_key(type(module)),
            "args": [self._encode(a, f"{where} argument {i}", f"{name}#{i}") for i, a in enumerate(args)],
            "kwargs": {k: self._encode(v, f"{where} argument {k!r}", f"{name}#{k}") for k, v in kwargs.items()},
            "attrs": {k: _encode_plain(v) for k, v in attrs.items()},
            "signature": signature(module),
        }

    def _encode(self, value: Any, where: str, key: str) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, Tensor):
            return {"__tensor__": self._tensor_key(value, key)}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [self._encode(v, where, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self._encode(v, where, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"__dict__": {k: self._encode(v, where, f"{key}.{k}") for k, v in value.items()}}
        if hasattr(value, "keys") and hasattr(value, "items") and all(isinstance(k, str) for k in value):
            return {"__dict__": {k: self._encode(v, where, f"{key}.{k}") for k, v in value.items()}}
        if isinstance(value, Configurable):
            path = self.paths.get(id(value))
            if path is not None:
                return {"__module__": path}
            return {"__module__": None, "spec": self._spec(value, f"{key}")}
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and _ours(type(value)):
            fields = {
                f.name: self._encode(getattr(value, f.name), where, f"{key}.{f.name}")
                for f in dataclasses.fields(value)
                if f.init
            }
            return {"__dataclass__": class_key(type(value)), "fields": fields}
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
            return self._encode(value.item(), where, key)
        raise FileFormatError(f"{where} is a {type(value).__name__}, which fc.save cannot write as data", code="FC505")

    def _tensor_key(self, t: Tensor, key: str) -> str:
        """A tensor argument: the saved tensor it equals (no second copy), or a new entry."""
        data = t.detach()
        for candidate in self._by_shape.get((tuple(t.shape), t.dtype), ()):
            saved = self.tensors[candidate]
            if torch.equal(saved, data.to("cpu")):
                return candidate
        name = _INIT + key
        self._add(name, data)
        return name


def _ours(cls: type) -> bool:
    return cls.__module__ == "flowconvert" or cls.__module__.startswith("flowconvert.")


def _is_plain(v: Any) -> bool:
    if isinstance(v, float):
        return True
    if isinstance(v, _PLAIN):
        return True
    return isinstance(v, (tuple, list)) and all(_is_plain(x) for x in v)


def _encode_plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return {"__float__": repr(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode_plain(x) for x in v]}
    if isinstance(v, list):
        return [_encode_plain(x) for x in v]
    return v


def signature(module: nn.Module) -> str:
    """The constructor call of ``module`` with tensors reduced to shape and dtype (JSON text).

    Two modules with equal signatures are built alike; their tensors' values come from the state dict.
    """
    config = module.init_config() if isinstance(module, Configurable) else None

    def reduce(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return repr(v)
        if isinstance(v, _PLAIN):
            return v
        if isinstance(v, Tensor):
            return ["tensor", list(v.shape), str(v.dtype)]
        if isinstance(v, (torch.dtype, torch.device)):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [type(v).__name__, [reduce(x) for x in v]]
        if hasattr(v, "items"):
            return ["dict", {str(k): reduce(x) for k, x in v.items()}]
        if isinstance(v, nn.Module):
            return ["module", class_key(type(v))]
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return [
                "dataclass",
                class_key(type(v)),
                {f.name: reduce(getattr(v, f.name)) for f in dataclasses.fields(v)},
            ]
        if hasattr(v, "item") and getattr(v, "shape", None) == ():
            return reduce(v.item())
        return ["object", type(v).__name__]

    return json.dumps([class_key(type(module)), reduce(config)], sort_keys=True)


def _report(flow: nn.Module) -> Any:
    report = getattr(flow, "report", None)
    to_dict = getattr(report, "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        return json.loads(json.dumps(to_dict(), default=str, allow_nan=False))
    except (TypeError, ValueError):
        return None


# -- reading ------------------------------------------------------------------------------------
def sniff(path: str | os.PathLike) -> str:
    """What kind of file ``path`` is, from its first bytes, without interpreting it.

    ``"safetensors"`` (an 8-byte header length followed by a JSON header), ``"zip"`` (the
    ``torch.save`` archive, which holds a pickle), ``"pickle"`` or ``"unknown"``.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 2 <= n <= min(size - 8, 100_000_000):
            try:
                if isinstance(json.loads(f.read(n)), dict):
                    return "safetensors"
            except ValueError:
                pass
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"]", b"}", b"c", b"I", b"S", b"V", b"N"):
        return "pickle"
    return "unknown"


def load(path: str | os.PathLike, *, classes: Iterable[type] = ()) -> nn.Module:
    """Read a flow written by :func:`save`.

    Only flowconvert's recorded classes (and the ``classes`` given, for layers of your own)
    are built; nothing is unpickled. The flow is on the CPU, in the training mode it was
    saved in. A saved conversion report is available as the dict ``flow.saved_report``.

    Raises:
        FileFormatError: ``FC502`` for a pickled file (never opened as a pickle), ``FC501``
            for any other file that is not a flow file, ``FC503`` for an unknown version,
            ``FC504`` when the description or the tensors do not make a flow.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"no such flow file: {path}", code="FC501")
    kind = sniff(path)
    if kind in ("pickle", "zip"):
        raise FileFormatError(
            f"{path} is a pickled file ({'torch.save archive' if kind == 'zip' else 'pickle'}); flowconvert "
            "refuses to unpickle it, because loading a pickle runs whatever code it contains",
            code="FC502",
        )
    if kind != "safetensors":
        raise FileFormatError(f"{path} is not a flow file written by flowconvert.save", code="FC501")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path} is not a readable safetensors file: {exc}", code="FC501") from exc
    if metadata.get("format") != FORMAT:
        raise FileFormatError(
            f"{path} is a safetensors file but not a flow written by flowconvert.save "
            f"(a state dict? pass it with --weights / model.load_state_dict)",
            code="FC501",
        )
    version = metadata.get("version")
    if version != str(VERSION):
        raise FileFormatError(
            f"{path} has flow file format version {version!r}; this flowconvert reads version {VERSION}",
            code="FC503",
        )
    try:
        description = json.loads(metadata["description"])
        return _Reader(description, tensors, classes, path, metadata.get("flowconvert")).flow
    except FileFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise FileFormatError(
            f"{path}: the flow description cannot be used: {type(exc).__name__}: {exc}", code="FC504"
        ) from exc


def _flowconvert_version() -> str:
    from . import __version__

    return __version__


class _Reader:
    def __init__(
        self,
        description: dict,
        tensors: dict[str, Tensor],
        classes: Iterable[type],
        path: Path,
        written_by: str | None = None,
    ):
        self.path, self.written_by = path, written_by
        self.tensors = tensors
        self.extra = {class_key(c): c for c in classes}
        self.specs: dict[str, dict] = description["modules"]
        if "" not in self.specs:
            raise FileFormatError(f"{path}: the description has no root module", code="FC504")
        self.built: dict[str, nn.Module] = {}
        root = self._build_path("")
        replaced = self._replace_swapped(root)
        self._restore(root, description)
        if replaced and callable(getattr(root, "_build_graphs", None)):
            root._build_graphs()  # generated programs hold references to the replaced modules
        root.saved_report = description.get("report")
        self.flow = root

    # -- classes, values, modules -------------------------------------------------------------
    def _class(self, key: str) -> type:
        cls = self.extra.get(key) or RECORDED.get(key)
        if cls is None and (key.startswith("flowconvert.")):
            # a flowconvert module not imported yet (e.g. an optional density family)
            parts = key.split(".")
            for i in range(len(parts) - 1, 1, -1):
                try:
                    importlib.import_module(".".join(parts[:i]))
                    break
                except ImportError:
                    continue
            cls = RECORDED.get(key)
        if cls is None:
            raise FileFormatError(
                f"{self.path} names the class {key!r}, which is not a flowconvert layer or density; only "
                "those (and classes passed as classes=[...]) are built",
                code="FC504",
            )
        return cls

    def _decode(self, v: Any) -> Any:
        if isinstance(v, list):
            return [self._decode(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            key = v["__tensor__"]
            if key not in self.tensors:
                raise FileFormatError(f"{self.path}: tensor {key!r} is missing", code="FC504")
            return self.tensors[key].clone()
        if "__float__" in v:
            return float(v["__float__"])
        if "__dtype__" in v:
            dtype = getattr(torch, v["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise FileFormatError(f"{self.path}: unknown dtype {v['__dtype__']!r}", code="FC504")
            return dtype
        if "__device__" in v:
            return torch.device("cpu")
        if "__tuple__" in v:
            return tuple(self._decode(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {k: self._decode(x) for k, x in v["__dict__"].items()}
        if "__module__" in v:
            return self._build_path(v["__module__"]) if v["__module__"] is not None else self._build(v["spec"], "")
        if "__dataclass__" in v:
            key = v["__dataclass__"]
            cls = self._dataclass(key)
            return cls(**{k: self._decode(x) for k, x in v["fields"].items()})
        raise FileFormatError(f"{self.path}: cannot read the value {json.dumps(v)[:80]}", code="FC504")

    def _dataclass(self, key: str) -> type:
        module, _, name = key.rpartition(".")
        if not (module == "flowconvert" or module.startswith("flowconvert.")):
            raise FileFormatError(f"{self.path} names the data class {key!r}, not one of flowconvert", code="FC504")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise FileFormatError(f"{self.path} names the unknown data class {key!r}", code="FC504") from exc
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise FileFormatError(f"{self.path}: {key!r} is not a data class", code="FC504")
        return cls

    def _build_path(self, path: str) -> nn.Module:
        if path not in self.built:
            if path not in self.specs:
                raise FileFormatError(f"{self.path}: no description of the module {path!r}", code="FC504")
            self.built[path] = self._build(self.specs[path], path)
        return self.built[path]

    def _build(self, spec: dict, path: str) -> nn.Module:
        cls = self._class(spec["class"])
        args = [self._decode(a) for a in spec["args"]]
        kwargs = {k: self._decode(v) for k, v in spec["kwargs"].items()}
        try:
            return cls(*args, **kwargs)
        except FileFormatError:
            raise
        except Exception as exc:
            raise FileFormatError(
                f"{self.path}: building {path or 'the flow'} ({spec['class']}) failed: {type(exc).__name__}: {exc}",
                code="FC504",
            ) from exc

    def _replace_swapped(self, root: nn.Module) -> bool:
        """Rebuild every module whose construction differs from the saved one (swapped density parts)."""
        replaced = False
        for path in sorted(self.specs, key=lambda p: (p.count(".") + bool(p), p)):
            if not path:
                continue
            spec = self.specs[path]
            try:
                current = root.get_submodule(path)
            except AttributeError:
                current = None
            if current is not None and signature(current) == spec["signature"]:
                continue
            parent, _, _ = path.rpartition(".")
            try:
                root.get_submodule(parent) if parent else root
            except AttributeError as exc:
                raise FileFormatError(f"{self.path}: the flow has no module {parent!r}", code="FC504") from exc
            self.built.pop(path, None)
            root.set_submodule(path, self._build_path(path))
            replaced = True
        return replaced

    def _restore(self, root: nn.Module, description: dict) -> None:
        state = {k[len(_STATE) :]: t for k, t in self.tensors.items() if k.startswith(_STATE)}
        buffers = {k[len(_BUFFER) :]: t for k, t in self.tensors.items() if k.startswith(_BUFFER)}
        _match_dtypes(root, {**state, **buffers})
        try:
            root.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            why, now = str(exc), _flowconvert_version()
            if self.written_by is None:
                why += f" (the file records no flowconvert version: it was written before 0.2.0; this is {now})"
            elif self.written_by != now:  # a class may have changed between the two
                why += f" (the file was written by flowconvert {self.written_by}, this is {now})"
            raise FileFormatError(f"{self.path}: the saved tensors do not fit the flow: {why}", code="FC504") from exc
        with torch.no_grad():
            for name, t in buffers.items():
                owner, _, attr = name.rpartition(".")
                module = root.get_submodule(owner) if owner else root
                if attr not in module._buffers:
                    raise FileFormatError(f"{self.path}: the flow has no buffer {name!r}", code="FC504")
                current = module._buffers[attr]
                if current is not None and current.shape == t.shape and current.dtype == t.dtype:
                    current.copy_(t)
                else:
                    setattr(module, attr, t)
        for path, spec in self.specs.items():
            module = root.get_submodule(path) if path else root
            for k, v in spec.get("attrs", {}).items():
                value = self._decode(v)
                if getattr(module, k, _MISSING) != value:
                    setattr(module, k, value)
        training = set(description.get("training", ()))
        for name, module in root.named_modules():
            module.training = name in training


_MISSING = object()


def _match_dtypes(root: nn.Module, saved: dict[str, Tensor]) -> None:
    """Give each module the floating dtype its saved tensors have (``flow.double()`` after conversion)."""
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        own = [*module._parameters.items(), *module._buffers.items()]
        wanted = {
            saved[prefix + k].dtype
            for k, t in own
            if t is not None and prefix + k in saved and saved[prefix + k].is_floating_point()
        }
        current = {t.dtype for _, t in own if t is not None and t.is_floating_point()}
        if len(wanted) == 1 and current and current != wanted:
            dtype = wanted.pop()
            module._apply(lambda t, dtype=dtype: t.to(dtype) if t.is_floating_point() else t, recurse=False)
