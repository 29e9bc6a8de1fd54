"""The demo's smoke run (``flowconvert demo --quick``): every stage runs, the test split is scored
once per model after validation chose everything, and the pictures say what they clip."""

import math

import torch

from flowconvert import demo


def test_validation_is_carved_from_train_and_test_is_untouched():
    data = demo.load_digits_split(seed=0)
    split = demo.carve_validation(data, seed=0)
    assert len(split.train_x) + len(split.val_x) == len(data.train_x)
    assert torch.equal(split.test_x, data.test_x)
    rows = lambda t: {tuple(r.tolist()) for r in t}
    assert rows(split.val_x) | rows(split.train_x) == rows(data.train_x)
    assert abs(demo.categorical_bits_per_dim(split.train_x, split.test_x) - 2.4) < 0.3


def test_quick_demo_runs_every_stage(tmp_path):
    results = demo.run_demo(tmp_path, quick=True, progress=False)
    names = [r[0] for r in results["rows"]]
    assert names[:2] == ["uniform over the 17 levels", "per-pixel categorical"]
    for family in ("gaussian", "mlp", "flow"):
        assert any(f"density={family!r}" in n for n in names), names
    assert all(math.isfinite(row[2]) for row in results["rows"])
    # the importance-weighted bound of every continuous model: finite, and no looser than one draw
    assert results["iw_bits_per_dim"].keys() == results["bits_per_dim"].keys()
    for key, iw in results["iw_bits_per_dim"].items():
        assert math.isfinite(iw) and iw <= results["bits_per_dim"][key] + 0.02, (key, iw)
    assert results["accuracy"]["MLP classifier"] > 0.5
    assert any("max-softmax" in k for k in results["auroc"])
    assert all(0.0 <= q["in_range"] <= 1.0 for q in results["samples"].values())
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert (
        "samples_mlp_frozen_T1.png" in pictures and f"samples_mlp_frozen_T{demo.DEFAULT_TEMPERATURE:g}.png" in pictures
    )


def test_the_flow_mlp_can_start_as_the_identity():
    """DigitsFlowMLP(identity=True) is the identity on non-negative inputs (the dequantized pixels),
    with log|det| 0: its flow starts as its base density on the pixels themselves."""
    import flowconvert as fc
    from flowconvert.demo import DigitsFlowMLP

    x = torch.rand(5, 64)
    net = DigitsFlowMLP(identity=True)
    assert torch.equal(net(x), x)
    flow = fc.convert(net, x[:2], base="standard")
    z, ll = flow.forward_with_log_prob(x, deterministic=True)
    assert torch.equal(z, x)
    torch.testing.assert_close(ll, fc.StandardNormal((64,)).log_prob(x), atol=1e-5, rtol=0)
    assert not torch.equal(DigitsFlowMLP()(x), x)


def test_the_importance_weighted_bound_is_tighter_and_the_table_shows_it():
    """log (1/K) sum_k p((x + u_k)/L) >= E_u log p((x + u)/L) (Jensen), so its bits/dim is lower:
    a calibrated flow of an untrained MLP, 200 test digits, K = 32 draws against one."""
    import flowconvert as fc

    data = demo.load_digits_split(seed=0)
    deq = fc.Dequantize(demo.LEVELS)
    torch.manual_seed(0)
    flow = fc.convert(demo.DigitsMLP(), deq.center(data.train_x[:2]))
    fc.calibrate(flow, data.train_x, dequantize=deq)
    torch.manual_seed(1)
    one = fc.bits_per_dim(flow, data.test_x[:200], dequantize=deq)
    iw = demo.iw_bits_per_dim(flow, data.test_x[:200], deq, samples=32)
    assert iw < one - 0.01, (iw, one)
    assert demo.iw_bits_per_dim(flow, data.test_x[:200], deq, samples=32) == iw  # seeded: reproducible
    table = demo.format_table([("uniform", 4.09, 4.09, 0.0), ("flow", one, one, 1.0, iw)])
    assert f"test, IW {demo.IW_SAMPLES}" in table
    assert table.splitlines()[2].rstrip(" |").endswith("4.090") and f"{iw:.3f}" in table.splitlines()[3]
