"""The command line: exit status 0 convertible, 1 not convertible, 2 bad usage or input."""

from __future__ import annotations

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

    good_instance = Good()
    not_a_model = 42
    """
)


@pytest.fixture()
def target(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


SUBPROCESS_RUNS = {
    "convert_good": ["convert", "{t}:Good", "--input-shape", "1,8", "-o", "{d}/flow.safetensors"],
    "audit_bad": ["audit", "{t}:bad", "--input-shape", "1,8", "--format", "json"],
    "wrong_shape": ["audit", "{t}:Good", "--input-shape", "1,7"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every command-line case in parallel subprocesses (interpreter start-up dominates)."""
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(MODELS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "flowconvert", *(a.format(t=d / "models.py", d=d) for a in args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for name, args in SUBPROCESS_RUNS.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
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
    assert cli.main(["convert", f"{target}:Good", "--input-shape", "1,8", "--weights", str(tmp_path / "w.pt"), "-o", str(out)]) == 0
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
