"""Convert your own trained model into a flow, in a few lines.

    python examples/convert_your_model.py

Works for networks built from supported layers (Linear, Conv1d/2d, invertible activations
such as LeakyReLU/ELU/Tanh, reshapes, ...). ``fc.audit`` says, node by node, what blocks a
conversion and why (for example ReLU is not injective: use LeakyReLU).
"""

import torch
from torch import nn

import flowconvert as fc

# your trained model (here: random weights) and one example input batch
model = nn.Sequential(nn.Linear(10, 16), nn.LeakyReLU(0.1), nn.Linear(16, 4)).eval()
example = torch.randn(2, 10)

report = fc.audit(model, example)
print(report)  # convertible? exact or a bound? which nodes are a problem?

flow = fc.convert(model, example, base="diagonal")
x = torch.randn(256, 10) * 2 + 1  # stand-in for your data

assert torch.equal(flow(x), model(x))  # the original function, unchanged
fc.calibrate(flow, x)  # fit the density parts in closed form
fc.fit(flow, x, epochs=5, progress=False)  # optional: gradient fit, network frozen
with torch.no_grad():
    print("log p(x):", flow.log_prob(x[:3]))  # nats per example
print("bits/dim:", fc.bits_per_dim(flow, x))
z = flow(x[:3])
print("inverse, conditional means:", flow.inverse(z, sample=False).shape)
print("samples:", flow.sample(4).shape)
