"""Shape bijections: L = 0, exact round trips, the original op's output."""

import pytest
import torch

from flowconvert import FlowIdentity, Permute, Reshape
from obligations import autograd_logdet

CASES = [
    (lambda x: torch.flatten(x, 1), Reshape((2, 3, 4), (24,))),
    (lambda x: x.view(x.size(0), -1), Reshape((2, 3, 4), (24,))),
    (lambda x: x.unsqueeze(1), Reshape((2, 3, 4), (1, 2, 3, 4))),
    (lambda x: x.reshape(x.shape[0], 6, 4), Reshape((2, 3, 4), (6, 4))),
    (lambda x: x.permute(0, 3, 1, 2), Permute((0, 3, 1, 2))),
    (lambda x: x.transpose(1, 2), Permute((0, 2, 1, 3))),
    (lambda x: x.contiguous(), FlowIdentity()),
]


@pytest.mark.parametrize("op,layer", CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_bijections(op, layer, batch, dtype):
    x = torch.randn(batch, 2, 3, 4, dtype=dtype)
    y, ll = layer.call_and_ll(x)
    assert torch.equal(y, op(x)) and torch.equal(ll, torch.zeros(batch, dtype=dtype))
    assert torch.equal(layer.inverse(y), x)
    assert torch.equal(layer(layer.inverse(y)), y)


def test_permutation_jacobian_has_zero_logdet():
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(autograd_logdet(Permute((0, 2, 1)), x), torch.zeros(2, dtype=torch.float64))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Reshape((2, 3), (5,))
    with pytest.raises(ValueError):
        Permute((1, 0, 2))
