"""fit, calibrate and bits_per_dim warn when the data look discrete and no dequantization is given."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flowconvert as fc
from flowconvert.dequantization import DiscreteDataWarning, warn_if_discrete


@pytest.fixture()
def flow():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2))
    return fc.convert(net, torch.randn(1, 6), base="diagonal")


LEVELS = torch.randint(0, 17, (200, 6)).float()  # integer levels 0..16, as load_digits gives


@pytest.mark.parametrize("entry", ["fit", "calibrate", "bits_per_dim"])
def test_discrete_data_without_dequantization_warns_once_per_call(flow, entry):
    run = {
        "fit": lambda **kw: fc.fit(flow, LEVELS, epochs=1, progress=False, **kw),
        "calibrate": lambda **kw: fc.calibrate(flow, LEVELS, **kw),
        "bits_per_dim": lambda **kw: fc.bits_per_dim(flow, LEVELS, **kw),
    }[entry]
    with pytest.warns(DiscreteDataWarning, match=rf"given to {entry} looks discrete .*Dequantize\(17\)") as caught:
        run()
    assert len([w for w in caught if w.category is DiscreteDataWarning]) == 1
    assert caught[0].filename == __file__  # points at the caller's line, not at flowconvert
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscreteDataWarning)
        run(dequantize=fc.Dequantize(17))  # dequantized: no warning


@pytest.mark.parametrize(
    "data, discrete",
    [
        (LEVELS, True),
        (LEVELS.long(), True),
        ((LEVELS > 8).float(), True),  # binary
        (TensorDataset(LEVELS, torch.zeros(200)), True),
        (DataLoader(TensorDataset(LEVELS), batch_size=32, shuffle=True), True),  # read from .dataset, not iterated
        (LEVELS / 16, False),  # scaled to [0, 1]: not integers
        (torch.randn(200, 6), False),
        (torch.randint(0, 10_000, (200, 6)).float(), False),  # integers, but too many distinct values
        (torch.tensor([[float("nan"), 1.0]]), False),
        (torch.zeros(10, 6), False),  # a constant
    ],
)
def test_what_looks_discrete(data, discrete):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_discrete(data, None, "fit") is discrete
    assert len(caught) == int(discrete)
    assert warn_if_discrete(data, fc.Dequantize(17), "fit") is False


def test_calibrate_and_fit_record_the_density_state(flow):
    assert flow.density_state == "untrained"
    x = torch.randn(100, 6)
    fc.calibrate(flow, x)
    assert flow.density_state == "calibrated"
    fc.fit(flow, x, epochs=1, progress=False)
    assert flow.density_state == "fitted"
