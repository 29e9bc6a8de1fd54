"""Maximum-likelihood training: frozen network, full training, digits, two processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
