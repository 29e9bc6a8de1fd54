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
        save_training_curves(
            {"a": fc.History(epochs=[1, 2], train_bpd=[3.0, 2.0], val_bpd=[3.1, 2.5])}, tmp_path / "c.png"
        ),
    ]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(4) == PNG


def test_pictures_say_how_many_values_were_clipped(tmp_path, monkeypatch):
    import flowconvert.plotting as plotting

    titles = []
    real = plotting._pyplot

    def spy():
        plt = real()
        orig = plt.Figure.suptitle

        def suptitle(self, t, *a, **k):
            titles.append(t)
            return orig(self, t, *a, **k)

        monkeypatch.setattr(plt.Figure, "suptitle", suptitle)
        return plt

    monkeypatch.setattr(plotting, "_pyplot", spy)
    x = torch.full((4, 16), 0.5)
    x[0, :3] = 2.0
    x[1, 0] = -1.0
    plotting.save_image_grid([x], tmp_path / "g.png", image_shape=(4, 4), title="t")
    assert titles and "4 of 64 values outside [0, 1]" in titles[-1], titles
    plotting.save_image_grid([torch.rand(2, 16)], tmp_path / "h.png", image_shape=(4, 4), title="clean")
    assert titles[-1] == "clean"
