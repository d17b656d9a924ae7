"""A LeNet-style net end to end: one step equals PyTorch's, a few steps learn."""
import numpy
import pytest

import gpucnn
from gpucnn import SGD
from gpucnn.app import models
from gpucnn.step import train_step


def _torch_lenet(torch, ours):
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
    state = ours.state_dict()
    net.to(torch.float64 if state["0.weight"].dtype == numpy.float64 else torch.float32)
    net.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return net


@pytest.mark.parametrize("dtype, tol", [(numpy.float64, 1e-10), (numpy.float32, 1e-4)])
def test_one_sgd_step_matches_torch(torch, dtype, tol):
    gpucnn.manual_seed(0)
    net = models.lenet().to(dtype=dtype)
    theirs = _torch_lenet(torch, net)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, 8)
    opt = SGD(net.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)

    loss, _ = train_step(net, opt, x, y)
    tloss = torch.nn.functional.cross_entropy(theirs(torch.tensor(x)), torch.tensor(y))
    tloss.backward()
    topt.step()

    assert abs(float(loss) - tloss.item()) < tol
    for name, theirs_p in theirs.state_dict().items():
        numpy.testing.assert_allclose(net.state_dict()[name], theirs_p.numpy(), rtol=tol,
                                      atol=tol)


def test_loss_goes_down_on_a_fixed_batch():
    gpucnn.manual_seed(1)
    net = models.lenet()
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal((16, 1, 28, 28)).astype(numpy.float32)
    y = rng.integers(0, 10, 16)
    opt = SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss, _ = train_step(net, opt, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], losses
