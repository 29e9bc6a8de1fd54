"""The README's quick start: audit, convert, log_prob, inverse and sample on a real small model.

    python examples/quickstart.py

Trains a small digit classifier (scikit-learn's 8x8 digits ship with the package; nothing
is downloaded), then turns it into a flow.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import flowconvert as fc

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64), pixel values in [0, 1]
labels = torch.tensor(digits.target)

# a classifier, trained for a few seconds
model = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.1), nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), labels).backward()
    opt.step()
model.eval()
print(f"accuracy: {(model(x).argmax(1) == labels).float().mean():.3f}\n")

# 1. read the convertibility report
print(fc.audit(model, x[:1]))

# 2. convert: the same function, plus a likelihood, an inverse and sampling
flow = fc.convert(model, x[:1])
assert torch.equal(flow(x), model(x))  # the original outputs, bit for bit
fc.calibrate(flow, x)  # fit the densities of the dropped coordinates (closed form)
with torch.no_grad():
    print("\nlog p(x) of three digits (nats):", flow.log_prob(x[:3]))
    logits = flow(x[:3])
    print("inverse of the logits:", tuple(flow.inverse(logits, sample=False).shape))
    print("samples:", tuple(flow.sample(5).shape))
print("exact likelihood:", flow.exact)


# 3. a model that cannot be converted: every problem, with its reason and a fix
class Blocked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.norm = nn.Linear(64, 64), nn.ReLU(), nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


print()
print(fc.audit(Blocked(), x[:1]))
