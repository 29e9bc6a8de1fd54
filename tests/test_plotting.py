"""The pictures are written as PNG files."""

import torch

import flowconvert as fc
from chainflow import mlp_chain
from flowconvert.plotting import save_reconstructions, save_samples, save_training_curves

PNG = b"\x89PNG"


def test_sample_reconstruction_and_curve_pictures(tmp_path):
    flow = mlp_chain((16, 8, 4))
    x = torch.rand(5, 16)
    paths = [
        save_samples(flow, tmp_path / "s.png", n=9, image_shape=(4, 4)),
        save_reconstructions(flow, x, tmp_path / "r.png", image_shape=(4, 4)),
        save_training_curves({"a": fc.History(epochs=[1, 2], train_bpd=[3.0, 2.0], val_bpd=[3.1, 2.5])}, tmp_path / "c.png"),
    ]
    for p in paths:
        assert open(p, "rb").read(4) == PNG
