"""The README's quick-start output is what examples/quickstart.py prints."""

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
