"""fc.save / fc.load: flows are data (safetensors + JSON), reproduced exactly; pickles never run.

Exactness is bit-for-bit (``torch.equal``) for outputs, deterministic and noise-fixed
log-densities and inverses (conditional means and fixed-noise samples).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import struct

import pytest
import torch
import torch.nn.functional as F
from test_zoo import ZOO as ARCHITECTURES
from torch import nn

import flowconvert as fc
import zoo
from flowconvert.config import RECORDED
from flowconvert.core import FlowLayer
from flowconvert.densities import BaseDensity, ConditionalDensity, GaussianNoise


# -- models using every layer kind --------------------------------------------------------------
class Kinds1(nn.Module):
    """Linear (all three shapes), activations, BatchNorm1d, scalar affine, split/cat, sum, fan-out."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.square = nn.Linear(6, 6)
        self.down = nn.Linear(6, 4)
        self.prelu = nn.PReLU(6)
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.1)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.bn(self.up(x))
        h = torch.tanh(h) * 2.0 + 1.0
        a, b = torch.split(h, [2, 4], dim=1)
        h = torch.cat([torch.sigmoid(a), F.elu(b)], dim=1)
        h = self.prelu(F.softplus(self.square(h)))
        h = h + F.selu(h)
        return self.down(h)


class Kinds2(nn.Module):
    """Conv2d (non-overlapping and padded), grouped conv, max/avg pooling, reshape, permute, identity."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 2, stride=2)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool1d(2)
        self.ident = nn.Identity()

    def forward(self, x):  # (B, 2, 8, 8)
        h = F.leaky_relu(self.c1(x), 0.1)
        h = self.pool(self.g(h))  # (B, 8, 2, 2)
        h = self.ident(h.permute(0, 2, 3, 1)).reshape(h.shape[0], 8, 4)
        return self.avg(h)


class Kinds3(nn.Module):
    """Overlapping/padded pooling (a Tile, then a pool) and global pooling by a mean."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 2, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):  # (B, 2, 8, 8)
        h = self.pool(F.leaky_relu(self.c1(x), 0.1))  # (B, 4, 2, 2)
        return h.mean(dim=(2, 3))


class Kinds4(nn.Module):
    """Substitutions under relu="leaky": ReLU6, Hardsigmoid and a clamp become leaky clamps."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        h = self.relu6(3 * self.lin(x))
        return torch.clamp(F.hardsigmoid(h - 3), 0.2, 0.8)


KINDS = {
    "kinds1": (Kinds1, (5, 4)),
    "kinds2": (Kinds2, (3, 2, 8, 8)),
    "kinds3": (Kinds3, (3, 2, 8, 8)),
    "kinds4": (Kinds4, (5, 4), "leaky"),
}


def _convert(factory, shape, relu=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = factory().to(dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    return fc.convert(model, x, relu=relu), x


def _all_models():
    for entry in zoo.ZOO:
        yield entry.name, lambda e=entry: _convert(e.make, e.shape)
    for name in ARCHITECTURES:
        factory, shape, relu = ARCHITECTURES[name]
        yield name, lambda f=factory, s=shape, r=relu: _convert(f, (2, *s), r)
    for name, (factory, shape, *relu) in KINDS.items():
        yield name, lambda f=factory, s=shape, r=relu: _convert(f, s, *r)


MODELS = dict(_all_models())


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)


def assert_reproduces(flow, loaded, x):
    """Outputs, log-densities (deterministic and fixed-noise) and inverses are bit-identical."""
    gen = torch.Generator().manual_seed(1)
    xs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        _assert_same(flow(*xs), loaded(*xs))
        _assert_same(flow.log_prob(*xs, deterministic=True), loaded.log_prob(*xs, deterministic=True))
        noise = {
            k: torch.randn((len(xs[0]), *s), generator=gen, dtype=xs[0].dtype) for k, s in flow.noise_shapes().items()
        }
        _assert_same(flow.log_prob(*xs, noise=noise), loaded.log_prob(*xs, noise=noise))
        z = flow(*xs)
        _assert_same(flow.inverse(z, sample=False), loaded.inverse(z, sample=False))
        shapes = flow.inverse_noise_shapes()
        inv = {k: torch.randn((len(xs[0]), *s), generator=gen, dtype=xs[0].dtype) for k, s in shapes.items()}
        _assert_same(flow.inverse(z, sample=True, noise=inv), loaded.inverse(z, sample=True, noise=inv))
    assert loaded.exact == flow.exact
    assert loaded.noise_shapes() == flow.noise_shapes()
    assert loaded.inverse_noise_shapes() == flow.inverse_noise_shapes()
    assert str(loaded.code) == str(flow.code)
    # every module has the same class, the same public plain attributes and the same mode
    mods = dict(loaded.named_modules())
    for name, m in flow.named_modules():
        assert type(mods[name]) is type(m), name
        assert mods[name].training == m.training, name
        for k, v in vars(m).items():
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple)) and k != "substitution":
                assert getattr(mods[name], k) == v, (name, k)
    state, again = flow.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys()
    for k in state:
        assert state[k].dtype == again[k].dtype and torch.equal(state[k], again[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_exact(name, tmp_path):
    flow, x = MODELS[name]()
    path = tmp_path / "flow.safetensors"
    fc.save(flow, path)
    assert_reproduces(flow, fc.load(path), x)


@pytest.mark.parametrize("name", ["reducing_mlp", "padded_cnn", "mobilenet", "kinds1", "kinds2"])
def test_round_trip_after_calibrate_and_fit_all(name, tmp_path):
    torch.manual_seed(3)
    flow, x = MODELS[name]()
    data = x.repeat(8, *([1] * (x.dim() - 1))) + 0.1 * torch.randn(8 * len(x), *x.shape[1:])
    fc.calibrate(flow, data)
    fc.fit(flow, data, epochs=1, train="all", batch_size=16, lr=1e-3)
    path = tmp_path / "flow.safetensors"
    fc.save(flow, path)
    assert_reproduces(flow, fc.load(path), x)


def test_float64_flow_and_converted_dtype(tmp_path):
    flow, x = _convert(zoo.PaddedCNN, (3, 2, 6, 6), dtype=torch.float64)
    fc.save(flow, tmp_path / "a")
    assert_reproduces(flow, fc.load(tmp_path / "a"), x)
    flow32, x32 = _convert(zoo.ReducingMLP, (4, 12))
    flow64 = flow32.double()  # converted after construction: saved dtype wins on load
    fc.save(flow64, tmp_path / "b")
    assert_reproduces(flow64, fc.load(tmp_path / "b"), x32.double())


def test_train_mode_and_report_are_kept(tmp_path):
    flow, _ = MODELS["square_mlp"]()
    flow.train()
    fc.save(flow, tmp_path / "f")
    loaded = fc.load(tmp_path / "f")
    assert all(m.training for m in loaded.modules())
    assert loaded.saved_report == json.loads(json.dumps(flow.report.to_dict(), default=str))
    assert loaded.saved_report["convertible"] is True


def test_a_single_layer_round_trips(tmp_path):
    torch.manual_seed(0)
    layer = fc.FlowLinear.from_module(nn.Linear(5, 3))
    fc.save(layer, tmp_path / "layer")
    again = fc.load(tmp_path / "layer")
    x = torch.randn(4, 5)
    assert torch.equal(layer.call_and_ll(x)[1], again.call_and_ll(x)[1])


# -- every layer kind and every density family ----------------------------------------------------
def _concrete(base):
    for key, cls in sorted(RECORDED.items()):
        if (
            key.startswith("flowconvert.")
            and issubclass(cls, base)
            and not cls.__name__.startswith("_")
            and cls not in (FlowLayer, ConditionalDensity, BaseDensity)
            and not inspect.isabstract(cls)
        ):
            if any(
                "raise NotImplementedError" in inspect.getsource(f) for f in vars(cls).values() if inspect.isfunction(f)
            ):
                continue  # an interface or an abstract base
            yield cls


def _classes_in(flows):
    return {type(m) for flow in flows for m in flow.modules()}


def test_every_layer_kind_and_density_is_covered_by_a_round_trip():
    """A new layer kind or density must appear in a model of this file (MODELS, or _swapped_families)."""
    seen = _classes_in(MODELS[name]()[0] for name in MODELS) | _classes_in(f for f, _ in _swapped_families())
    for base in (FlowLayer, ConditionalDensity, BaseDensity, GaussianNoise):
        missing = [c.__qualname__ for c in _concrete(base) if c not in seen]
        assert not missing, f"add a model using {missing} to tests/test_io.py (KINDS or _swapped_families)"


def _family_factories():
    """Every conditional family that can stand in a funnel's slot: ``(features, context) -> density``."""
    for cls in _concrete(ConditionalDensity):
        params = list(inspect.signature(cls.__init__).parameters)[1:3]
        if params in (["features", "context_features"], ["features", "context"]):
            yield cls, (lambda f, c, cls=cls: cls(f, c))


def _swapped_families():
    """Flows whose conditional parts were replaced by each family (and by a diagonal base density)."""
    out = []
    for _cls, factory in _family_factories():
        flow, x = _convert(zoo.ReducingMLP, (4, 12), seed=1)
        for layer in flow.layers.values():
            for part in layer.density_parts():
                if part.kind == "conditional":
                    layer.set_submodule(part.name, factory(part.features, part.context).to(x.dtype))
        out.append((flow, x))
    flow, x = _convert(zoo.PaddedCNN, (3, 2, 6, 6))
    for key in list(flow.bases):
        flow.bases[key] = fc.DiagonalNormal(flow.bases[key].event_shape)
    flow._build_graphs()
    out.append((flow, x))
    for base in ("standard", "gaussian", "flow"):  # every base family (the default is "mixture")
        torch.manual_seed(2)
        x = torch.randn(4, 12)
        out.append((fc.convert(zoo.ReducingMLP().eval(), x, base=base), x))
    return out


def test_every_family_round_trips_when_swapped_in(tmp_path):
    for i, (flow, x) in enumerate(_swapped_families()):
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.01 * torch.randn_like(p)) if p.is_floating_point() else None
        flow._build_graphs() if hasattr(flow, "_build_graphs") else None
        fc.save(flow, tmp_path / f"f{i}")
        assert_reproduces(flow, fc.load(tmp_path / f"f{i}"), x)


def test_a_part_that_is_not_a_flowconvert_family_is_refused_at_save(tmp_path):
    flow, _ = MODELS["reducing_mlp"]()
    layer = next(m for m in flow.layers.values() if m.density_parts())

    class Foreign(nn.Module):  # not a ConditionalDensity: cannot be described as data
        pass

    layer.set_submodule(layer.density_parts()[0].name, Foreign())
    with pytest.raises(fc.FileFormatError) as err:
        fc.save(flow, tmp_path / "x")
    assert err.value.code == "FC505" and "Foreign" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


# -- refusals: pickles never run, unknown versions, foreign files ----------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def _pickles(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload(str(marker))}, evil)  # a torch.save zip archive
    legacy = tmp_path / "evil.pkl"
    with open(legacy, "wb") as f:
        pickle.dump(_Payload(str(marker)), f, protocol=2)
    proto0 = tmp_path / "evil0.pkl"
    with open(proto0, "wb") as f:
        pickle.dump(_Payload(str(marker)), f, protocol=0)
    return marker, [evil, legacy, proto0]


def test_a_crafted_pickle_never_runs_in_load(tmp_path):
    marker, files = _pickles(tmp_path)
    for path in files:
        with pytest.raises(fc.FileFormatError) as err:
            fc.load(path)
        assert err.value.code == "FC502", path
        assert "unpickle" in str(err.value) and "hint" in str(err.value)
    assert not marker.exists()


def test_unknown_version_and_foreign_files_are_clear_errors(tmp_path):
    import safetensors.torch

    flow, _ = MODELS["square_mlp"]()
    path = tmp_path / "f"
    fc.save(flow, path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        rest = f.read()
    header["__metadata__"]["version"] = "99"
    raw = json.dumps(header).encode()
    (tmp_path / "v99").write_bytes(struct.pack("<Q", len(raw)) + raw + rest)
    with pytest.raises(fc.FileFormatError) as err:
        fc.load(tmp_path / "v99")
    assert err.value.code == "FC503" and "'99'" in str(err.value)

    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "state")
    with pytest.raises(fc.FileFormatError) as err:
        fc.load(tmp_path / "state")
    assert err.value.code == "FC501"
    (tmp_path / "text").write_text("hello")
    with pytest.raises(fc.FileFormatError) as err:
        fc.load(tmp_path / "text")
    assert err.value.code == "FC501"
    with pytest.raises(fc.FileFormatError):
        fc.load(tmp_path / "missing")


def test_tensors_that_do_not_fit_name_the_version_that_wrote_them(tmp_path):
    import safetensors.torch

    flow, _ = MODELS["square_mlp"]()
    fc.save(flow, tmp_path / "f")
    with safetensors.safe_open(tmp_path / "f", "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert metadata["flowconvert"] == fc.__version__
    tensors.pop(next(k for k in sorted(tensors) if k.startswith("state/")))  # as if a layer had gained one since
    for written, says in (("0.0.1", "written by flowconvert 0.0.1"), (None, "records no flowconvert version")):
        meta = (
            dict(metadata, flowconvert=written)
            if written
            else {k: v for k, v in metadata.items() if k != "flowconvert"}
        )
        safetensors.torch.save_file(tensors, tmp_path / "old", metadata=meta)
        with pytest.raises(fc.FileFormatError) as err:
            fc.load(tmp_path / "old")
        assert err.value.code == "FC504" and says in str(err.value) and fc.__version__ in str(err.value)


def test_a_class_outside_the_allow_list_is_never_built(tmp_path):
    flow, _ = MODELS["square_mlp"]()
    path = tmp_path / "f"
    fc.save(flow, path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        rest = f.read()
    desc = json.loads(header["__metadata__"]["description"])
    desc["modules"][next(k for k in desc["modules"] if k)]["class"] = "os.system"
    header["__metadata__"]["description"] = json.dumps(desc)
    raw = json.dumps(header).encode()
    (tmp_path / "g").write_bytes(struct.pack("<Q", len(raw)) + raw + rest)
    with pytest.raises(fc.FileFormatError) as err:
        fc.load(tmp_path / "g")
    assert err.value.code == "FC504" and "os.system" in str(err.value)


def test_failed_save_leaves_no_file(tmp_path):
    with pytest.raises(fc.FileFormatError):
        fc.save(nn.Linear(2, 2), tmp_path / "x")
    assert not list(tmp_path.iterdir())
    assert os.path.isdir(tmp_path)


# -- the command line writes and reads the format, and refuses pickles ------------------------------
MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 5)
        self.act = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
"""


def test_cli_convert_writes_the_format_and_export_reads_it(tmp_path, capsys):
    from flowconvert import cli

    (tmp_path / "net.py").write_text(MODEL_FILE)
    saved = tmp_path / "flow.safetensors"
    assert cli.main(["convert", f"{tmp_path / 'net.py'}:Net", "--input-shape", "1,5", "-o", str(saved)]) == 0
    assert fc.io.sniff(saved) == "safetensors"
    flow = fc.load(saved)
    assert flow.input_shapes == [(5,)]
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(saved), "-o", str(out), "--batch", "3"]) == 0, capsys.readouterr().err
    assert out.exists()


def test_cli_never_runs_a_crafted_pickle(tmp_path, capsys):
    from flowconvert import cli

    (tmp_path / "net.py").write_text(MODEL_FILE)
    marker, files = _pickles(tmp_path)
    target = f"{tmp_path / 'net.py'}:Net"
    for path in files:
        assert cli.main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
        err = capsys.readouterr().err
        assert "FC502" in err and "unpickle" in err
        for command in (
            ["audit", target],
            ["convert", target, "-o", str(tmp_path / "o")],
            ["export", target, "-o", str(tmp_path / "m.onnx")],
        ):
            assert cli.main([*command, "--input-shape", "1,5", "--weights", str(path)]) == 2
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "o").exists()
