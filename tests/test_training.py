"""Maximum-likelihood training: frozen network, full training, digits, two processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flowconvert as fc
from chainflow import mlp_chain


def _data(n=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) @ torch.randn(6, 6, generator=g) + 1


def test_densities_mode_keeps_outputs_bit_for_bit():
    x = _data()
    flow = mlp_chain((6, 9, 3, 2), base="diagonal")
    out = flow(x)
    before = fc.log_likelihood(flow, x[1000:]).mean().item()
    history = fc.fit(flow, x[:1000], val_data=x[1000:], epochs=8, lr=1e-2, progress=False)
    assert torch.equal(flow(x), out)
    assert history.best_val_bpd < history.val_bpd[0] or len(history.val_bpd) == 1
    assert fc.log_likelihood(flow, x[1000:]).mean().item() > before + 1.0


def test_all_mode_trains_the_network_and_keeps_the_caches_consistent():
    x = _data()
    flow = mlp_chain((6, 6, 4), base="diagonal")
    out = flow(x)
    history = fc.fit(flow, x[:1000], val_data=x[1000:], epochs=5, lr=1e-2, train="all", progress=False)
    assert not torch.equal(flow(x), out)  # the network itself moved
    assert history.val_bpd[-1] < history.val_bpd[0]
    for layer in flow.layers:
        if isinstance(layer, fc.FlowLinear):
            assert not layer.weight.requires_grad
            # the cached log|det| is that of the trained weight's block; the inverse follows it
            block = layer.block().double()
            assert torch.allclose(layer.logdet().double(), torch.linalg.slogdet(block)[1], atol=1e-5)
            assert torch.allclose(
                layer.block_inverse().double() @ block, torch.eye(block.shape[0], dtype=torch.float64), atol=1e-4
            )
    with torch.no_grad():
        z = flow(x[:20])
        torch.testing.assert_close(flow(flow.inverse(z, sample=False)), z, atol=1e-4, rtol=1e-4)


def test_early_stopping_restores_the_best_epoch():
    x = _data(300)
    flow = mlp_chain((6, 3), base="diagonal")
    # a validation set from another distribution: it stops improving quickly
    val = 5 * torch.randn(200, 6) - 3
    history = fc.fit(flow, x, val_data=val, epochs=60, lr=5e-2, patience=2, progress=False)
    final = fc.bits_per_dim(flow, val)
    assert abs(final - history.best_val_bpd) < 0.05  # stochastic only through nothing: exact model
    assert history.stopped_early or len(history.epochs) == 60


def _digits():
    from sklearn.datasets import load_digits

    k = torch.tensor(load_digits().data, dtype=torch.float32)
    return k[:1400], k[1400:]


def test_fit_lowers_validation_bits_per_dim_on_digits():
    train, val = _digits()
    deq = fc.Dequantize(levels=17)
    torch.manual_seed(0)
    flow = mlp_chain((64, 32, 10), slope=0.3, base="diagonal")
    start = fc.bits_per_dim(flow, val, dequantize=deq)
    history = fc.fit(flow, train, val_data=val, dequantize=deq, epochs=5, lr=2e-2, progress=False)
    end = fc.bits_per_dim(flow, val, dequantize=deq)
    # tolerance: at least 1 bit/dim better after five epochs (from about 6.5 bits/dim)
    assert end < start - 1.0, (start, end, history.val_bpd)
    assert history.val_bpd[-1] < history.val_bpd[0]


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import torch.distributed as dist
    import flowconvert as fc
    from chainflow import mlp_chain

    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 6, generator=g) @ torch.randn(6, 6, generator=g) + 1
    torch.manual_seed(0)
    flow = mlp_chain((6, 6, 3), base="diagonal")
    history = fc.fit(flow, x[:600], val_data=x[600:], epochs=4, lr=1e-2, train="all", progress=False)
    rank = dist.get_rank()
    torch.save({{"state": flow.state_dict(), "val": history.val_bpd, "world": dist.get_world_size(),
                "steps": history.steps}}, {out!r} + f"/rank{{rank}}.pt")
    dist.destroy_process_group()
    """
)


def test_fit_under_torchrun_two_processes(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == 4 * 3  # 300 rows per rank, batches of 128
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert r0["val"] == r1["val"]  # validation averaged over ranks
    assert r0["val"][-1] < r0["val"][0]


def test_natural_scales_are_the_units_of_the_linear_gaussian():
    from flowconvert.densities import ConditionalDiagonalNormal, ConditionalFullNormal

    for cls in (ConditionalDiagonalNormal, ConditionalFullNormal):
        q = cls(2, 3)
        var = torch.tensor([4e-4, 9.0], dtype=torch.float64)
        q.write_linear(torch.zeros(2, 3), torch.zeros(2), var, torch.zeros(3), torch.tensor([100.0, 1.0, 0.01]))
        s = q.natural_scales()
        sigma = var.sqrt().float()
        torch.testing.assert_close(s["weight"], sigma[:, None] / torch.tensor([10.0, 1.0, 0.1])[None, :])
        torch.testing.assert_close(s["bias"], sigma)
    torch.testing.assert_close(s["tril"], (1 / sigma)[None, :].expand(2, 2))


def test_natural_step_multiplies_each_adam_update_by_its_unit():
    from flowconvert.training import natural_step

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    with torch.no_grad():
        b.copy_(a)
    scale = torch.rand(3, 4)
    plain, scaled = torch.optim.Adam([a], lr=0.1), torch.optim.Adam([b], lr=0.1)
    a0 = a.detach().clone()
    for p in (a, b):  # the same gradient for both
        (p * torch.arange(12.0).reshape(3, 4)).sum().backward()
    plain.step()
    natural_step(scaled, [(b, scale)])
    torch.testing.assert_close(b.detach(), a0 + scale * (a.detach() - a0), rtol=0, atol=1e-7)


def test_fit_in_natural_units_keeps_a_calibrated_density(monkeypatch):
    """Digit pixels: border pixels are nearly constant (residual scale ~0.005) while the kept
    outputs have scale ~1 over 48 coordinates. Adam moves every raw parameter by about lr per
    step, so a regression row moves the mean by several residual standard deviations and one
    epoch from the calibrated optimum is clearly worse; steps in natural units stay at it."""
    import copy

    from flowconvert import training
    from flowconvert.demo import LEVELS, DigitsMLP, carve_validation, load_digits_split

    torch.manual_seed(0)
    data = carve_validation(load_digits_split(seed=0), seed=0)
    deq = fc.Dequantize(LEVELS)
    flow = fc.convert(DigitsMLP(), deq.center(data.train_x[:2]))
    fc.calibrate(flow, data.train_x, val_data=data.val_x, dequantize=deq)
    start = fc.bits_per_dim(flow, data.val_x, dequantize=deq)
    raw = copy.deepcopy(flow)
    kw = dict(val_data=data.val_x, dequantize=deq, epochs=1, lr=3e-3, progress=False)
    natural = fc.fit(flow, data.train_x, **kw).val_bpd[0] - start
    monkeypatch.setattr(training, "natural_scales", lambda flow, params: [])
    plain = fc.fit(raw, data.train_x, **kw).val_bpd[0] - start
    assert abs(natural) < 0.01 and plain > 0.02 and plain > 4 * abs(natural), (start, natural, plain)


def test_network_lr_sets_the_network_s_own_step():
    """fit(train="all", network_lr=...) gives the network's parameters their own Adam learning rate:
    with network_lr = 1e-3 * lr the network moves about a thousandth as far as with lr; the density
    parameters move as far either way (same data, seed and steps). Without train="all" it is refused."""
    from flowconvert.training import network_parameter_set

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g) @ torch.randn(6, 6, generator=g) + 1

    def moves(network_lr):
        torch.manual_seed(0)
        flow = mlp_chain((6, 6, 3), base="diagonal")
        net = network_parameter_set(flow)
        start = {n: p.detach().clone() for n, p in flow.named_parameters()}
        fc.fit(flow, x, epochs=2, lr=1e-2, network_lr=network_lr, train="all", batch_size=64, progress=False)
        moved = {n: (p.detach() - start[n]).abs().max().item() for n, p in flow.named_parameters()}
        ids = {n: id(p) in net for n, p in flow.named_parameters()}
        return max(v for n, v in moved.items() if ids[n]), max(v for n, v in moved.items() if not ids[n])

    net_full, dens_full = moves(None)
    net_slow, dens_slow = moves(1e-5)
    assert net_full > 1e-3 and net_slow < 2e-3 * net_full
    assert dens_slow > 0.2 * dens_full
    with pytest.raises(fc.InputError, match="network_lr"):
        fc.fit(mlp_chain((6, 6, 3)), x, network_lr=1e-4, progress=False)


def test_each_part_of_a_frozen_flow_keeps_its_own_best_epoch():
    """Network frozen, no noise: log p is a sum of independent terms (one per outermost layer and
    base), so each keeps the epoch its own held-out term was best; the result is at least as good
    held out as every epoch's parameters, and exactly the sum of the parts' bests."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LeakyReLU(0.3), torch.nn.Linear(4, 2))
    x = _data(1600, 0)
    flow = fc.convert(net, x[:2], density="mlp")  # overfits: its parts peak at different epochs
    train, val = x[:200], x[1000:]
    fc.calibrate(flow, train)
    out = flow(val)
    history = fc.fit(flow, train, val_data=val, epochs=40, lr=1e-2, patience=40, progress=False)
    assert torch.equal(flow(val), out)
    final = fc.bits_per_dim(flow, val)  # exact and noise-free: no randomness in this figure
    assert final <= min(history.val_bpd) + 1e-9
    assert abs(final - history.best_val_bpd) < 1e-9
    # here the parts peak at different epochs (the first layer's density at the start, the base late),
    # and their combination beats every single epoch
    epochs = history.part_best_epochs
    assert set(epochs) == {"layers._0", "layers._2", "bases._2"} and len(set(epochs.values())) > 1, epochs
    assert final < min(history.val_bpd) - 1e-3


def test_parts_are_not_chosen_one_by_one_when_the_network_trains():
    x = _data(400)
    flow = mlp_chain((6, 3), base="diagonal")
    history = fc.fit(flow, x[:300], val_data=x[300:], epochs=3, lr=1e-2, train="all", progress=False)
    assert history.part_best_epochs == {}


def test_a_staged_density_is_fitted_after_what_it_refines():
    """The ``"flow"`` family's splines (conditionals and base) stay at the identity until the
    heteroscedastic Gaussians and the mixture prior they refine have reached their best held-out
    epoch, then train too: the first stage is exactly a fit with the splines held, and the second
    ends no worse held out."""
    from flowconvert.densities import BaseDensity, ConditionalDensity

    x = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LeakyReLU(0.2), torch.nn.Linear(4, 2))

    def fitted(hold_spline: bool):
        torch.manual_seed(1)  # the same conditioners' initialisation both times
        flow = fc.convert(model, x[:2], density="flow")
        fc.calibrate(flow, x[:800], val_data=x[800:])
        parts = [m for m in flow.modules() if isinstance(m, (ConditionalDensity, BaseDensity))]
        splines = [p for m in parts for p in m.staged_parameters()]
        assert {type(m).__name__ for m in parts if m.staged_parameters()} == {"FlowConditional", "FlowBase"}
        for p in splines:
            p.requires_grad_(not hold_spline)
        before = [p.detach().clone() for p in splines]
        history = fc.fit(flow, x[:800], val_data=x[800:], epochs=6, lr=1e-2, patience=3, progress=False)
        return history, any(not torch.equal(p, b) for p, b in zip(splines, before))

    first, first_moved = fitted(hold_spline=True)
    staged, staged_moved = fitted(hold_spline=False)
    assert not first_moved and staged_moved
    assert staged.val_bpd[: len(first.val_bpd)] == first.val_bpd
    assert len(staged.epochs) > len(first.epochs) and staged.epochs == sorted(set(staged.epochs))
    assert staged.best_val_bpd <= first.best_val_bpd


def test_two_stages_make_one_history_whose_epoch_zero_is_where_the_first_ended():
    from flowconvert.training import History, _chain

    first = History(epochs=[1, 2, 3], steps=30, best_epoch=2, part_best_epochs={"a": 1}, best_val_bpd=3.0)
    then = History(epochs=[1, 2], steps=20, best_epoch=0, part_best_epochs={"a": 0, "b": 2}, best_val_bpd=2.9)
    both = _chain(first, then)
    assert both.epochs == [1, 2, 3, 4, 5] and both.steps == 50 and both.best_val_bpd == 2.9
    # the second stage's start is the first's best: epoch 2 overall, and part a's own epoch 1
    assert both.best_epoch == 2 and both.part_best_epochs == {"a": 1, "b": 5}
    assert _chain(History(), then) is then
