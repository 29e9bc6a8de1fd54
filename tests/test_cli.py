"""The command line: exit status 0 convertible, 1 not convertible, 2 bad usage or input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flowconvert as fc
from flowconvert import cli
from source_lines import line_of

ROOT = Path(__file__).resolve().parents[1]

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Good(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 6)
            self.act = nn.LeakyReLU(0.1)
            self.fc2 = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    def bad():
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    class WithReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))  # forward-line

    class WithGELU(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    good_instance = Good()
    not_a_model = 42
    """
)


def _write_files(d: Path) -> None:
    """models.py, weights, data files of every kind, and unsafe files (pickles) next to it."""
    import numpy as np

    (d / "models.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location("_cli_test_models", d / "models.py")
    models = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = models  # so that the whole model can be pickled (to test its refusal)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    net = models.Good()
    torch.save(net.state_dict(), d / "good.pt")
    torch.save(net, d / "whole.pt")  # a pickled module: must be refused, never unpickled
    g = np.random.default_rng(0)
    np.save(d / "x.npy", g.normal(size=(300, 8)).astype(np.float32))
    np.save(d / "levels.npy", g.integers(0, 17, size=(300, 8)))
    np.savez(d / "two.npz", train=g.normal(size=(200, 8)), other=g.normal(size=(5, 2)))
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "wrong.npy", g.normal(size=(50, 7)).astype(np.float32))


@pytest.fixture()
def target(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


SUBPROCESS_RUNS = {
    "convert_good": ["convert", "{t}:Good", "--input-shape", "1,8", "-o", "{d}/flow.safetensors"],
    "audit_bad": ["audit", "{t}:bad", "--input-shape", "1,8", "--format", "json"],
    "wrong_shape": ["audit", "{t}:Good", "--input-shape", "1,7"],
    "no_batch_dim": ["audit", "{t}:Good", "--input-shape", "8"],
    "export_no_such_file": ["export", "nosuch.pt", "-o", "{d}/m.onnx"],
    "convert_no_dir": ["convert", "{t}:Good", "--input-shape", "1,8", "-o", "{d}/nodir/flow.pt"],
    "whole_model_weights": ["audit", "{t}:Good", "--input-shape", "1,8", "--weights", "{d}/whole.pt"],
    "version": ["--version"],
    "help": ["--help"],
    # the whole job: ReLU policy, closed-form calibration and a fit of integer data with dequantization
    "convert_job": [
        "convert",
        "{t}:WithReLU",
        "--input-shape",
        "1,8",
        "--relu",
        "leaky",
        "--base",
        "diagonal",
        "--calibrate",
        "{d}/levels.npy",
        "--fit",
        "{d}/levels.npy",
        "--levels",
        "17",
        "--epochs",
        "2",
        "--no-progress",
        "-o",
        "{d}/job.pt",
    ],
    "convert_discrete": [
        "convert",
        "{t}:Good",
        "--input-shape",
        "1,8",
        "--calibrate",
        "{d}/levels.npy",
        "-o",
        "{d}/discrete.pt",
    ],
    "convert_untrained": ["convert", "{t}:Good", "--input-shape", "1,8", "-o", "{d}/untrained.pt"],
    "relu_refused": ["audit", "{t}:WithReLU", "--input-shape", "1,8"],
    "relu_leaky": ["audit", "{t}:WithReLU", "--input-shape", "1,8", "--relu", "leaky"],
}

#: runs that read a file written by another run: started once the first batch is done
SECOND_RUNS = {
    "export_calibrated": ["export", "{d}/job.pt", "-o", "{d}/job.onnx"],
    "export_untrained": ["export", "{d}/untrained.pt", "-o", "{d}/untrained.onnx", "--format", "json"],
    "export_random": ["export", "{d}/job.pt", "-o", "{d}/inverse.onnx", "--graph", "inverse", "--noise", "random"],
}


def _start(args, d, env):
    return subprocess.Popen(
        [sys.executable, "-m", "flowconvert", *(a.format(t=d / "models.py", d=d) for a in args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=d,
    )


def _wait(procs) -> dict:
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every command-line case in subprocesses, a few at a time (interpreter start-up dominates)."""
    d = tmp_path_factory.mktemp("cli")
    _write_files(d)
    env = _env()
    results: dict = {}
    names = list(SUBPROCESS_RUNS)
    for i in range(0, len(names), 4):  # 2 cores: no more than four interpreters at once
        results.update(_wait({n: _start(SUBPROCESS_RUNS[n], d, env) for n in names[i : i + 4]}))
    results.update(_wait({n: _start(a, d, env) for n, a in SECOND_RUNS.items()}))
    return d, results


def test_exit_0_convert_writes_a_loadable_flow(runs):
    d, results = runs
    proc = results["convert_good"]
    assert proc.returncode == 0, proc.stderr
    assert "convertible" in proc.stdout
    flow = fc.load(d / "flow.safetensors")
    assert flow(torch.randn(2, 8)).shape == (2, 3) and flow.log_prob(torch.randn(2, 8)).shape == (2,)


def test_exit_1_prints_the_report(runs):
    proc = runs[1]["audit_bad"]
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["convertible"] is False and data["problem_counts"] == {"FC101": 1}


def test_exit_2_without_traceback(runs):
    proc = runs[1]["wrong_shape"]  # wrong feature size
    assert proc.returncode == 2
    assert "FC309" in proc.stderr and "Traceback" not in proc.stderr


# In-process checks of the same entry point (fast; no interpreter start-up).
def test_targets_instances_classes_factories_and_modules(target, tmp_path, capsys, monkeypatch):
    for attr, status in (("Good", 0), ("good_instance", 0), ("bad", 1)):
        assert cli.main(["audit", f"{target}:{attr}", "--input-shape", "1,8"]) == status
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["audit", "models:Good", "--input-shape", "1,8", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("## flowconvert audit of Good")


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit", "{t}:missing", "--input-shape", "1,8"], "no attribute"),
        (["audit", "{t}:not_a_model", "--input-shape", "1,8"], "not an nn.Module"),
        (["audit", "no_such_module_xyz:Good", "--input-shape", "1,8"], "cannot import"),
        (["audit", "{t}", "--input-shape", "1,8"], "TARGET must look like"),
        (["audit", "{t}:Good", "--input-shape", "1,8", "--weights", "{d}/nope.pt"], "no such weights file"),
    ],
)
def test_bad_input_is_exit_2_with_a_clear_message(target, tmp_path, capsys, args, message):
    args = [a.format(t=target, d=tmp_path) for a in args]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("shape", [["--input-shape", "1,x8"], ["--input-shape", "0,8"], []])
def test_bad_or_missing_shape_is_a_usage_error(target, capsys, shape):
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", f"{target}:Good", *shape])
    assert info.value.code == 2 and "--input-shape" in capsys.readouterr().err


def test_weights_are_loaded(target, tmp_path, capsys):
    sys.path.insert(0, str(tmp_path))
    try:
        import models  # the target file
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(3)
    good = models.Good()
    torch.save(good.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "flow.safetensors"
    assert (
        cli.main(
            ["convert", f"{target}:Good", "--input-shape", "1,8", "--weights", str(tmp_path / "w.pt"), "-o", str(out)]
        )
        == 0
    )
    flow = fc.load(out)
    x = torch.randn(4, 8)
    assert torch.equal(flow(x), good(x))
    torch.save({"fc1.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    assert cli.main(["audit", f"{target}:Good", "--input-shape", "1,8", "--weights", str(tmp_path / "wrong.pt")]) == 2
    assert "do not fit" in capsys.readouterr().err


def test_subcommands_are_registered_in_one_table():
    assert {"audit", "convert"} <= set(cli.COMMANDS)
    parser = cli.build_parser()
    assert parser.parse_args(["convert", "m:x", "--input-shape", "1,2", "-o", "f.pt"]).output == "f.pt"


# -- the defects of the first hour, each through a subprocess -------------------------------------
def test_missing_batch_dimension_is_a_usage_error(runs):
    proc = runs[1]["no_batch_dim"]
    assert proc.returncode == 2
    assert "no batch dimension" in proc.stderr and "--input-shape 1,8" in proc.stderr
    assert "FC113" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_export_of_a_missing_file_says_no_such_file(runs):
    proc = runs[1]["export_no_such_file"]
    assert proc.returncode == 2
    assert "no such file: nosuch.pt" in proc.stderr
    assert "--input-shape is required" not in proc.stderr and "TARGET must look like" not in proc.stderr


def test_convert_to_a_missing_directory_fails_before_the_report(runs):
    d, results = runs
    proc = results["convert_no_dir"]
    assert proc.returncode == 2
    assert "no such directory" in proc.stderr and "RuntimeError" not in proc.stderr
    assert proc.stdout == ""  # nothing printed, nothing half-done
    assert not (d / "nodir").exists()


def test_a_pickled_whole_model_is_refused_with_advice_the_user_can_follow(runs):
    proc = runs[1]["whole_model_weights"]
    assert proc.returncode == 2
    assert "torch.save(model.state_dict(), path)" in proc.stderr
    assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_exit_statuses_in_help(runs, capsys):
    results = runs[1]
    import flowconvert

    assert results["version"].returncode == 0
    assert results["version"].stdout.strip() == f"flowconvert {flowconvert.__version__}"
    proc = results["help"]
    assert proc.returncode == 0
    for line in ("exit status:", "0  success", "1  not convertible, or a check failed", "2  bad usage or input"):
        assert line in proc.stdout, line
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and "2  bad usage or input" in out and "(default: 10)" in out  # --epochs


def test_every_option_has_help_and_says_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"audit", "convert", "export", "demo"}
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (name, action.option_strings)
            shown = formatter._get_help_string(action)
            if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
                assert "default" in shown, (name, action.option_strings, shown)


def test_help_is_parsed_without_importing_torch():
    """The command line's own modules parse arguments (and print --help) before torch is imported."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch imported while parsing arguments")
        sys.meta_path.insert(0, Block())
        package = types.ModuleType("flowconvert")  # the package's modules, without its __init__
        package.__path__ = [{str(ROOT / "flowconvert")!r}]
        sys.modules["flowconvert"] = package
        from flowconvert import cli
        for argv in (["--help"], ["convert", "--help"], ["export", "--help"], ["audit", "--help"], ["demo", "--help"]):
            try:
                cli.build_parser().parse_args(argv)
            except SystemExit as exit:
                assert exit.code == 0
        print("parsed", "torch" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("parsed False")


def test_a_closed_pipe_ends_quietly_with_the_commands_own_status(tmp_path):
    """``flowconvert convert ... | head``: the reader leaves before the report is written."""
    (tmp_path / "models.py").write_text(MODELS)
    proc = _start(SUBPROCESS_RUNS["convert_good"], tmp_path, _env())
    proc.stdout.close()  # the reader is gone: every write to stdout fails with EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err
    assert (tmp_path / "flow.safetensors").is_file()  # the work was still done


def test_relu_is_refused_with_a_hint_to_the_policy_and_substituted_on_request(runs):
    refused, leaky = runs[1]["relu_refused"], runs[1]["relu_leaky"]
    assert refused.returncode == 1 and 'relu="leaky"' in refused.stdout and "--relu leaky" in refused.stdout
    assert leaky.returncode == 0 and "ReLU replaced by LeakyReLU" in leaky.stdout
    assert "max output deviation" in leaky.stdout


def test_substitute_names_a_family_and_its_substitute(target, capsys):
    """--substitute FAMILY=NAME is fc.convert's substitute={...}: GELU is refused unless named, then
    substituted with its deviation reported; none keeps a family refused; bad spellings are exit 2."""
    shape = ["--input-shape", "1,8"]
    assert cli.main(["audit", f"{target}:WithGELU", *shape]) == 1
    assert "FC102" in capsys.readouterr().out
    assert cli.main(["audit", f"{target}:WithGELU", *shape, "--substitute", "gelu=leaky"]) == 0
    assert "deviation" in capsys.readouterr().out
    assert cli.main(["audit", f"{target}:WithReLU", *shape, "--relu", "leaky", "--substitute", "relu=none"]) == 1
    assert "FC101" in capsys.readouterr().out
    for bad, message in (("gelu", "FAMILY=NAME"), ("nope=leaky", "unknown activation family"), ("gelu=x", "one of")):
        assert cli.main(["audit", f"{target}:WithGELU", *shape, "--substitute", bad]) == 2
        assert message in capsys.readouterr().err


def test_conversion_error_names_each_location_once(tmp_path):
    import flowconvert as fc

    (tmp_path / "m.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location("_cli_test_located", tmp_path / "m.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    with pytest.raises(fc.ConversionError) as info:
        fc.convert(models.WithReLU(), torch.randn(1, 8))
    text = str(info.value)
    location = info.value.location
    assert location and location.endswith(f"m.py:{line_of(str(tmp_path / 'm.py'), 'forward-line')}")
    assert text.count(location) == 1, text
    assert text.count("[FC101]") == 1 and 'relu="leaky"' in text


# -- the whole job from the command line -------------------------------------------------------
def test_convert_calibrates_and_fits_from_data_files(runs):
    d, results = runs
    proc = results["convert_job"]
    assert proc.returncode == 0, proc.stderr
    assert "calibrated on" in proc.stderr and "fitted densities for" in proc.stderr
    assert "looks discrete" not in proc.stderr  # --levels was given
    flow = fc.load(d / "job.pt")
    assert flow.density_state == "fitted"
    untrained = fc.load(d / "untrained.pt")
    assert untrained.density_state == "untrained"
    assert "densities are untrained" in results["convert_untrained"].stderr


def test_discrete_data_without_levels_warns(runs):
    proc = runs[1]["convert_discrete"]
    assert proc.returncode == 0, proc.stderr
    assert "flowconvert convert: warning: the data given to calibrate looks discrete" in proc.stderr
    assert "--levels 17" in proc.stderr and "cli.py" not in proc.stderr  # a message, not a source line


@pytest.mark.parametrize(
    "option, message",
    [
        (["--calibrate", "objects.npy"], "never unpickles"),
        (["--calibrate", "whole.pt"], "never loads"),
        (["--fit", "wrong.npy"], "reshape the array to (50, 8)"),
        (["--calibrate", "two.npz"], "name one as"),
        (["--calibrate", "x.npy", "--levels", "17"], "must hold integers 0..16"),
        (["--calibrate", "missing.npy"], "no such data file"),
    ],
)
def test_bad_data_files_are_usage_errors(runs, capsys, option, message):
    d = runs[0]
    option = [str(d / o) if "." in o else o for o in option]
    assert cli.main(["convert", f"{d / 'models.py'}:Good", "--input-shape", "1,8", *option, "-o", str(d / "u.pt")]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""  # checked before the report is printed
    assert not (d / "u.pt").exists()


def test_export_warns_about_untrained_densities_and_prints_a_verdict(runs):
    results = runs[1]
    calibrated, untrained = results["export_calibrated"], results["export_untrained"]
    assert calibrated.returncode == 0 and untrained.returncode == 0, calibrated.stderr + untrained.stderr
    assert "never calibrated or fitted" in untrained.stderr
    assert "never calibrated or fitted" not in calibrated.stderr
    verdict = next(line for line in calibrated.stdout.splitlines() if "onnxruntime vs PyTorch" in line)
    assert "tolerance 0.0001 + 0.0001|torch|" in verdict and verdict.endswith(": ok")
    random = results["export_random"]
    assert random.returncode == 0, random.stderr
    verdict = next(line for line in random.stdout.splitlines() if "onnxruntime vs PyTorch" in line)
    assert "means over" in verdict and "6 standard errors" in verdict and verdict.endswith(": ok")


def test_export_format_json(runs):
    proc = runs[1]["export_untrained"]
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["verified"] is True and set(data["outputs"]) == {"y", "log_prob"}
    assert data["atol"] == 1e-4 and all(c["passed"] for c in data["parity"])


def test_data_files_load_safely_in_every_format(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    x = torch.randn(5, 3)
    np.save(tmp_path / "a.npy", x.numpy())
    np.savez(tmp_path / "b.npz", x=x.numpy(), y=np.arange(5))
    save_file({"data": x}, tmp_path / "c.safetensors")
    torch.save((x, torch.arange(5)), tmp_path / "d.pt")
    torch.save({"inputs": x, "labels": torch.arange(5)}, tmp_path / "e.pt")
    for spec in ("a.npy", "b.npz", "b.npz:x", "c.safetensors", "d.pt", "e.pt:inputs"):
        got = cli.load_data(str(tmp_path / spec), "float64")
        assert got.dtype == torch.float64 and torch.allclose(got, x.double()), spec
    with pytest.raises(cli.UsageError, match="has no array 'z'"):
        cli.load_data(str(tmp_path / "b.npz:z"))
    with pytest.raises(cli.UsageError, match="must be a"):
        (tmp_path / "f.csv").write_text("1,2\n")
        cli.load_data(str(tmp_path / "f.csv"))


def test_demo_classifier_training_shows_a_progress_bar(capsys):
    from flowconvert.demo import DigitsMLP, load_digits_split, train_classifier
    from flowconvert.dequantization import Dequantize

    data = load_digits_split()
    torch.manual_seed(0)
    train_classifier(DigitsMLP(), data, Dequantize(17), epochs=1, progress=True)
    assert "training DigitsMLP" in capsys.readouterr().err
    train_classifier(DigitsMLP(), data, Dequantize(17), epochs=1, progress=False)
    assert "training DigitsMLP" not in capsys.readouterr().err


def test_density_family_and_base_options_reach_the_flow(target, tmp_path, capsys):
    from flowconvert.families import GaussianMixture, MLPConditionalNormal

    out = tmp_path / "mlp.safetensors"
    args = [
        "convert",
        f"{target}:Good",
        "--input-shape",
        "1,8",
        "--density",
        "mlp",
        "--base",
        "mixture",
        "-o",
        str(out),
    ]
    assert cli.main(args) == 0
    assert "mlp family, mixture base" in capsys.readouterr().out
    flow = fc.load(out)
    assert any(isinstance(m, MLPConditionalNormal) for m in flow.modules())
    assert all(isinstance(b, GaussianMixture) for b in flow.bases.values())
    # audit decides without building a layer; a family's base does not change its verdict
    assert cli.main(["audit", f"{target}:Good", "--input-shape", "1,8", "--base", "flow"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["convert", f"{target}:Good", "--input-shape", "1,8", "--density", "nope", "-o", str(out)])
