"""ONNX export: every graph and noise mode, run in onnxruntime and compared with PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import flowconvert as fc
import zoo as converter_zoo
from flowconvert.export import export_onnx
from flowconvert.flow import FlowModel
from flowconvert.verification import LINEAR_ALGEBRA_OPS, linear_algebra_ops

GRAPHS = ("likelihood", "inverse")
NOISES = ("zero", "input", "random")
BATCHES = (1, 33)


def _mlp(*sizes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 2, stride=2),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


#: name -> (network factory, per-sample input shape): the converter's test zoo (tests/zoo.py:
#: square, reducing and increasing MLPs, CNNs, functional and shape-op models) and a padded,
#: strided CNN of this file's own
ZOO = {
    **{entry.name: (lambda entry=entry: converter_zoo.make(entry), entry.shape[1:]) for entry in converter_zoo.ZOO},
    "cnn": (_cnn, (1, 8, 8)),
}

convert = getattr(fc, "convert", None)
needs_convert = pytest.mark.skipif(convert is None, reason="flowconvert.convert is not available")


@pytest.fixture(scope="module")
def flows():
    if convert is None:
        pytest.skip("flowconvert.convert is not available")
    out = {}
    for i, (name, (make, shape)) in enumerate(ZOO.items()):
        torch.manual_seed(i)
        flow = convert(make().eval(), torch.randn(2, *shape))
        _randomize_densities(flow)
        out[name] = (flow, shape)
    return out


def _randomize_densities(module: nn.Module) -> None:
    """Give conditional densities and noise scales non-default values, as after calibration."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (fc.ConditionalDiagonalNormal, fc.GaussianNoise)):
                for p in m.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(shape, batch, seed=1):
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def _as_tuple(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _noise(shapes, batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn((batch, *s), generator=gen) for k, s in shapes.items()}


def _pytorch(flow, graph, noise, data, eps):
    """Reference outputs of the flow itself, in the order of the graph's outputs."""
    with torch.no_grad():
        if graph == "likelihood":
            if noise == "zero":
                out, lp = flow.forward_with_log_prob(data, deterministic=True)
            else:
                out, lp = flow.forward_with_log_prob(data, deterministic=False, noise=eps)
            return [*_as_tuple(out), lp]
        if noise == "zero":
            return list(_as_tuple(flow.inverse(data, sample=False)))
        return list(_as_tuple(flow.inverse(data, sample=True, noise=eps)))


def _check_against_pytorch(flow, result, graph, noise, data_shape):
    """Run the exported file at batch 1 and 33 and compare with the flow (zero and input modes)."""
    session = _session(result.path)
    for batch in BATCHES:
        x = _inputs(data_shape, batch)
        if graph == "inverse":
            with torch.no_grad():
                x = _as_tuple(flow.forward_with_log_prob(x, deterministic=True)[0])[0]
        shapes = flow.noise_shapes() if graph == "likelihood" else flow.inverse_noise_shapes()
        eps = _noise(shapes, batch) if noise == "input" else {}
        feeds = {result.input_names[0]: x.numpy()}
        feeds.update({name: eps[key].numpy() for name, key in result.noise_inputs.items()})
        got = session.run(None, feeds)
        expected = _pytorch(flow, graph, noise, x, eps)
        atol = [1e-4] * len(expected)
        if graph == "inverse":
            # An inverse amplifies float32 rounding by the network's conditioning (a LeakyReLU slope
            # of 0.1 alone by 10), and then PyTorch itself is not within 1e-4 of the exact answer.
            # Measure PyTorch's own float32 error against a float64 evaluation of the same flow and
            # allow onnxruntime 3 times that where it exceeds 1e-4 / 3; elsewhere 1e-4 stands.
            flow64 = copy.deepcopy(flow).double()
            exact = _pytorch(flow64, graph, noise, x.double(), {k: v.double() for k, v in eps.items()})
            atol = [max(1e-4, 3 * (e.double() - r).abs().max().item()) for e, r in zip(expected, exact)]
        assert len(got) == len(expected) == len(result.output_names)
        for name, g, e, tol in zip(result.output_names, got, expected, atol):
            e = e.numpy()
            assert g.shape == e.shape, (name, batch)
            if name == "log_prob":
                assert np.max(np.abs(g - e) / np.maximum(np.abs(e), 1.0)) <= 1e-4, (name, batch)
            else:
                assert np.max(np.abs(g - e)) <= tol, (name, batch, tol)


# -- every model, graph and noise mode -------------------------------------------------------
@needs_convert
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("model", list(ZOO))
def test_zoo_export_matches_pytorch(flows, model, graph, noise, tmp_path):
    flow, shape = flows[model]
    example = _inputs(shape, 33 if noise != "random" else 8, seed=5)
    result = export_onnx(flow, tmp_path / f"{model}.onnx", example, graph=graph, noise=noise, second_batch=1, draws=64)
    assert result.verified
    assert {c.batch for c in result.parity} == ({33, 1} if noise != "random" else {8})
    if graph == "likelihood":
        assert result.output_names == ["y", "log_prob"]
        assert result.output_shapes["log_prob"] == ("batch",)
    assert result.input_shapes[result.input_names[0]][0] == "batch"
    expected_noise = flow.noise_shapes() if graph == "likelihood" else flow.inverse_noise_shapes()
    if noise == "input":
        assert sorted(result.noise_inputs.values()) == sorted(expected_noise)
    else:
        assert result.noise_inputs == {}
        assert result.input_names == ["x" if graph == "likelihood" else "y"]
    if noise == "random":
        has_random = "RandomNormalLike" in result.op_counts
        assert has_random == bool(expected_noise)
        session = _session(result.path)
        for batch in BATCHES:  # runs at both batch sizes, outputs of the right shapes
            x = _inputs(shape, batch)
            if graph == "inverse":
                with torch.no_grad():
                    x = flow(x)
            outs = session.run(None, {result.input_names[0]: x.numpy()})
            assert all(o.shape[0] == batch for o in outs)
            assert all(np.isfinite(o).all() for o in outs)
    else:
        _check_against_pytorch(flow, result, graph, noise, shape)
    for value in result.max_abs_diff.values():
        assert np.isfinite(value)


@needs_convert
@pytest.mark.parametrize("model", ["reducing_mlp", "cnn"])
def test_likelihood_graph_has_no_linear_algebra(flows, model, tmp_path):
    flow, shape = flows[model]
    result = export_onnx(flow, tmp_path / "m.onnx", _inputs(shape, 4), verify=False)
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert not ops & LINEAR_ALGEBRA_OPS
    assert result.linear_algebra_ops == []
    assert ops & {"Gemm", "MatMul", "Conv"}  # the graph does compute something


@needs_convert
def test_inverse_of_reducing_model_samples_dropped_coordinates(flows, tmp_path):
    flow, shape = flows["reducing_mlp"]
    with torch.no_grad():
        y = flow(_inputs(shape, 33))
    feeds = {"y": y.numpy()}
    random = _session(export_onnx(flow, tmp_path / "r.onnx", _inputs(shape, 4), graph="inverse", noise="random").path)
    a, b = random.run(None, feeds)[0], random.run(None, feeds)[0]
    assert np.abs(a - b).max() > 1e-2
    zero = _session(export_onnx(flow, tmp_path / "z.onnx", _inputs(shape, 4), graph="inverse", noise="zero").path)
    c, d = zero.run(None, feeds)[0], zero.run(None, feeds)[0]
    np.testing.assert_array_equal(c, d)
    # every sample maps forward onto the same output: only the dropped coordinates vary
    with torch.no_grad():
        for x in (a, b, c):
            torch.testing.assert_close(flow(torch.from_numpy(x)), y, atol=1e-4, rtol=1e-4)


# -- single layers ------------------------------------------------------------------------------
def _layers():
    torch.manual_seed(3)
    # the converted zoo covers the other layers; these are the configurations it does not
    layers = {
        "linear_increasing_3d": (fc.FlowLinear.from_module(nn.Linear(3, 6)), (2, 3)),
        "permute": (fc.Permute((0, 2, 1)), (2, 3)),
    }
    if hasattr(fc, "FlowConv"):
        layers["conv_padded"] = (fc.FlowConv.from_module(nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)), (2, 5, 5))
        layers["conv_strided"] = (fc.FlowConv.from_module(nn.Conv2d(2, 3, 2, stride=3), (2, 7, 7)), (2, 7, 7))
    return layers


LAYERS = _layers()


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_export_with_noise_inputs(name, graph, tmp_path):
    layer, shape = LAYERS[name]
    _randomize_densities(layer)
    result = export_onnx(layer, tmp_path / f"{name}.onnx", _inputs(shape, 4), graph=graph, noise="input")
    assert result.verified and not result.linear_algebra_ops
    flow = FlowModel.from_layer(layer, shape)
    _check_against_pytorch(flow, result, graph, "input", shape)


def test_cache_staleness_check_is_not_traced():
    """After an in-place update the cache key is stale; once prepared, tracing must only read the caches."""
    torch.manual_seed(0)
    layer = fc.FlowLinear.from_module(nn.Linear(6, 3))
    with torch.no_grad():
        layer.dropped.weight.normal_()  # bumps the parameter's version
    layer.requires_grad_(False)
    layer.prepare_for_export()

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer.call_and_ll(x)

    with torch.no_grad():
        program = torch.export.export(Call(), (_inputs((6,), 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("cat" in t or "matmul" in t or "exp" in t for t in targets), targets


def test_report_and_result_fields(tmp_path):
    layer = fc.FlowLinear.from_module(nn.Linear(4, 2))
    result = export_onnx(layer, tmp_path / "m.onnx", _inputs((4,), 3), report=True)
    assert result.report_path == tmp_path / "m.md"
    text = result.report_path.read_text()
    for needle in ("likelihood", "`x`", "`y`", "`log_prob`", "(batch, 4)", f"opset {result.opset}", "Gemm", "Parity"):
        assert needle in text
    assert set(result.max_abs_diff) == {"y", "log_prob"}
    assert result.opset >= 18
    custom = export_onnx(layer, tmp_path / "n.onnx", _inputs((4,), 3), report=tmp_path / "sub" / "r.md", verify=False)
    assert custom.report_path.exists() and "Not verified" in custom.report_path.read_text()


class _DriftsAfterExportPrep(fc.FlowLayer):
    """Computes something else once prepared for export: the parity check must catch it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.zeros(()))

    def prepare_for_export(self) -> None:
        self.shift.fill_(0.5)

    def call_and_ll(self, x, noise=None):
        return x + self.shift, x.new_zeros(x.shape[0])

    def inverse(self, y, sample=False, noise=None):
        return y - self.shift


def test_parity_failure_names_the_output(tmp_path):
    with pytest.raises(fc.ExportError) as info:
        export_onnx(_DriftsAfterExportPrep(), tmp_path / "bad.onnx", _inputs((3,), 4))
    err = info.value
    assert err.code == "FC404"
    assert "output 'y'" in str(err) and "max abs diff 0.5" in str(err)
    assert not err.result.verified


class _UsesDeterminant(fc.FlowLayer):
    """A determinant of a data-dependent matrix cannot be precomputed: it must be refused."""

    def call_and_ll(self, x, noise=None):
        m = x.reshape(x.shape[0], 2, 2) + torch.eye(2)
        return x, torch.linalg.det(m).abs().log()

    def inverse(self, y, sample=False, noise=None):
        return y


def test_linear_algebra_in_graph_is_refused(tmp_path):
    with pytest.raises(fc.ExportError) as info:
        export_onnx(_UsesDeterminant(), tmp_path / "det.onnx", _inputs((4,), 4) * 0.1)
    assert info.value.code == "FC402"
    assert "Det" in str(info.value)


def test_scan_finds_linear_algebra_ops():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Det", ["a"], ["b"]), helper.make_node("Inverse", ["a"], ["c"], domain="com.microsoft")]
    value = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
    g = helper.make_graph(nodes, "g", [value("a", [2, 2])], [value("b", []), value("c", [2, 2])])
    assert linear_algebra_ops(helper.make_model(g)) == ["Det", "Inverse"]


def test_bad_arguments(tmp_path):
    layer = fc.FlowLeakyReLU(0.1)
    with pytest.raises(ValueError):
        export_onnx(layer, tmp_path / "a.onnx", _inputs((3,), 2), graph="backward")
    with pytest.raises(ValueError):
        export_onnx(layer, tmp_path / "a.onnx", _inputs((3,), 2), noise="gaussian")
    with pytest.raises(TypeError):
        export_onnx(nn.Linear(3, 3), tmp_path / "a.onnx", _inputs((3,), 2))


def test_cli_export(tmp_path, capsys):
    cli = pytest.importorskip("flowconvert.cli")
    if "export" not in cli.COMMANDS:
        pytest.skip("the export subcommand is not registered")
    out = tmp_path / "m.onnx"
    target = f"{__file__}:_cli_model"
    status = cli.main(["export", target, "--input-shape", "3,5", "-o", str(out), "--graph", "inverse", "--report"])
    assert status == 0, capsys.readouterr().err
    assert out.exists() and out.with_suffix(".md").exists()
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out


def _cli_model() -> nn.Module:
    torch.manual_seed(0)
    return _mlp(5, 3)


def test_export_prepares_the_flow_in_place_and_restores_it(tmp_path, monkeypatch):
    """No copy of the flow: the flow's own layers are prepared (and traced), and afterwards their
    buffers, caches, modes and requires_grad flags are as before (the flow computes the same)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.LeakyReLU(), nn.Flatten(), nn.Linear(64, 5))
    x = _inputs((4, 4, 4), 3)
    flow = fc.convert(model, x)
    flow.train()
    layers = [m for m in flow.modules() if isinstance(m, fc.FlowLinear)]
    layers[0].weight.requires_grad_(True)
    prepared = []
    original = fc.FlowLinear.prepare_for_export
    monkeypatch.setattr(fc.FlowLinear, "prepare_for_export", lambda self: (prepared.append(self), original(self))[1])
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    buffers = {id(m): set(m._buffers) for m in flow.modules()}
    with torch.no_grad():
        before = flow.eval().log_prob(x, deterministic=True)
    flow.train()
    result = export_onnx(flow, tmp_path / "f.onnx", x)
    assert result.verified
    assert {id(m) for m in prepared} == {id(m) for m in layers}  # the flow's own layers, not copies
    assert flow.training and all(m.training for m in flow.modules())
    assert layers[0].weight.requires_grad and not layers[1].weight.requires_grad
    assert {id(m): set(m._buffers) for m in flow.modules()} == buffers  # the export constants are gone
    assert not any(m._frozen for m in layers)
    after = flow.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    layers[0].weight.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(flow.eval().log_prob(x, deterministic=True), before, atol=0, rtol=0)
