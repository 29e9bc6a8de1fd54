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
    assert all(math.isfinite(test) for _, _, test, _ in results["rows"])
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
