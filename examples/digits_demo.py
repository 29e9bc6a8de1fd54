"""The digits demo as a readable script: classifier -> flow -> likelihood.

    python examples/digits_demo.py

The same steps as ``flowconvert demo`` (see flowconvert/demo.py), for one MLP, written out.
"""

import torch

import flowconvert as fc
from flowconvert.demo import DigitsMLP, load_digits_split, ood_auroc, train_classifier
from flowconvert.plotting import save_reconstructions, save_samples

torch.manual_seed(0)
data = load_digits_split()  # integer levels 0..16, a fixed 80/20 split
deq = fc.Dequantize(levels=17)  # x = (k + u) / 17, the k/K convention

# 1. an ordinary classifier
net = DigitsMLP()
print("classifier accuracy:", train_classifier(net, data, deq))

# 2. audit, then convert: same outputs, plus log p(x), an inverse and sampling
example = deq.center(data.train_x[:2])
print(fc.audit(net, example, base="diagonal"))
flow = fc.convert(net, example, base="diagonal")
assert torch.equal(flow(example), net(example))


def bpd():
    return fc.bits_per_dim(flow, data.test_x, dequantize=deq)


print(f"converted: {bpd():.3f} bits/dim")

# 3. closed-form calibration of the density parts (network untouched, held-out guard)
print(fc.calibrate(flow, data.train_x, dequantize=deq))
print(f"calibrated: {bpd():.3f} bits/dim")

# 4. gradient fit of the densities; the classifier is frozen, its outputs bit-for-bit the same
history = fc.fit(flow, data.train_x, val_data=data.test_x, dequantize=deq, epochs=10, lr=2e-3)
print(f"densities fitted: {bpd():.3f} bits/dim (best epoch {history.best_epoch})")
assert torch.equal(flow(example), net(example))

# 5. likelihood as an out-of-distribution score
print("AUROC:", ood_auroc(flow, data.test_x, deq))

# 6. pictures
save_samples(flow, "digits_samples.png", image_shape=(8, 8))
save_reconstructions(flow, deq.center(data.test_x[:10]), "digits_reconstructions.png", image_shape=(8, 8))
print("wrote digits_samples.png and digits_reconstructions.png")
