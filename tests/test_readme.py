"""The README's quick-start output is what examples/quickstart.py prints."""

import copy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_output_in_readme_is_current():
    out = subprocess.run(
        [sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    readme = ROOT.joinpath("README.md").read_text()
    convertible = out.split("flowconvert audit of Sequential")[1].split("\nlog p(x)")[0]
    blocked = out.split("flowconvert audit of Blocked")[1]  # the whole report, Summary included
    assert ("flowconvert audit of Sequential" + convertible).rstrip() in readme
    assert ("flowconvert audit of Blocked" + blocked).rstrip() in readme
    assert "exact likelihood: True" in out


def test_printed_flow_code_starts_with_its_first_line():
    import torch
    from torch import nn

    import flowconvert as fc

    flow = fc.convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh()), torch.randn(1, 4))
    assert flow.code.startswith("def forward(self, ")  # no leading blank lines (README's print(flow.code))


ACCEPTANCE_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A digit classifier with ReLU, as a user would have trained it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
'''


def readme_three_commands() -> list[str]:
    """The README's three commands from a model.py with trained weights to a calibrated ONNX file."""
    readme = ROOT.joinpath("README.md").read_text()
    block = readme.split("in three commands and no Python:")[1].split("```bash\n")[1].split("```")[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and all(c.startswith("flowconvert ") for c in commands), commands
    return commands


def test_readme_three_commands_give_a_calibrated_onnx_file_with_log_p(tmp_path):
    """Acceptance (issue 13): the README's three commands, exactly, through subprocesses."""
    import importlib.util
    import os
    import shlex

    import numpy as np
    import onnxruntime as ort
    import torch
    from sklearn.datasets import load_digits

    import flowconvert as fc
    from flowconvert.cli import load_flow

    # what the user has: model.py, trained weights, training inputs as an array
    (tmp_path / "model.py").write_text(ACCEPTANCE_MODEL)
    spec = importlib.util.spec_from_file_location("_acceptance_model", tmp_path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digits = load_digits()
    x = torch.tensor(digits.data[:600], dtype=torch.float32) / 16
    labels = torch.tensor(digits.target[:600])
    torch.manual_seed(0)
    net = module.Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), labels).backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    np.save(tmp_path / "train.npy", x.numpy())

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for command in readme_three_commands():
        argv = shlex.split(command)
        proc = subprocess.run(
            [sys.executable, "-m", "flowconvert", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert "never calibrated" not in proc.stderr
    assert "onnxruntime vs PyTorch" in proc.stdout and proc.stdout.rstrip().endswith(": ok")

    flow = load_flow(str(tmp_path / "flow.safetensors"))
    assert flow.density_state == "calibrated"
    session = ort.InferenceSession(str(tmp_path / "flow.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y", "log_prob"]
    logits, log_prob = session.run(None, {"x": x[:37].numpy()})  # a batch size the export never saw
    with torch.no_grad():
        want_y, want_ll = flow.forward_with_log_prob(x[:37], deterministic=True)
    np.testing.assert_allclose(logits, want_y.numpy(), atol=1e-4, rtol=1e-4)
    # log p against the float64 flow: onnxruntime is as accurate as PyTorch's own float32 pass, within
    # 4 times its error plus 1e-3 (both are about 1e-2 here: a calibrated full covariance whitens
    # near-deterministic combinations, and float32 rounding before the whitening is amplified by it;
    # the two differ by more than 1e-4 relative on some rows, with two threads)
    with torch.no_grad():
        truth = copy.deepcopy(flow).double().forward_with_log_prob(x[:37].double(), deterministic=True)[1].numpy()
    err32 = np.abs(want_ll.double().numpy() - truth).max()
    np.testing.assert_allclose(log_prob, truth, atol=4 * err32 + 1e-3, rtol=0)
    assert (logits.argmax(1) == net(x[:37]).argmax(1).numpy()).mean() > 0.9  # the classifier, ReLU -> LeakyReLU
    # calibrated: a far better likelihood than the same conversion with untrained densities
    untrained = fc.convert(net, x[:1], relu="leaky", base="diagonal")
    with torch.no_grad():
        assert log_prob.mean() > untrained.log_prob(x[:37], deterministic=True).mean().item() + 10


def test_readme_test_command_is_the_one_ci_runs():
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    command = [line.strip() for line in ci if line.strip().startswith("python -m pytest")][-1]
    readme = ROOT.joinpath("README.md").read_text()
    assert f'pip install -e ".[dev]" && {command}\n' in readme
