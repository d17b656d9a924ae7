"""Residual blocks: forward and backward against torch, nested names, tree walks, errors."""
import numpy
import pytest

import gpucnn
from conftest import close
from gpucnn import functional as F
from gpucnn.nn import (BatchNorm2D, Conv2D, Dropout, Identity, Linear, ReLU, Residual,
                       Sequential)


def _ours_and_torch(torch, shortcut):
    gpucnn.manual_seed(3)
    body = Sequential(Conv2D(3, 4, 3, stride=2, padding=1, bias=False), BatchNorm2D(4), ReLU(),
                      Conv2D(4, 4, 3, padding=1), BatchNorm2D(4))
    short = Sequential(Conv2D(3, 4, 1, stride=2), BatchNorm2D(4)) if shortcut else None
    ours = Sequential(Residual(body, short), ReLU()).to(dtype="float64")
    tn = torch.nn

    class Block(tn.Module):
        def __init__(self):
            super().__init__()
            self.body = tn.Sequential(tn.Conv2d(3, 4, 3, 2, 1, bias=False), tn.BatchNorm2d(4),
                                      tn.ReLU(), tn.Conv2d(4, 4, 3, padding=1),
                                      tn.BatchNorm2d(4))
            self.shortcut = (tn.Sequential(tn.Conv2d(3, 4, 1, 2), tn.BatchNorm2d(4))
                             if shortcut else tn.Identity())

        def forward(self, x):
            return self.body(x) + self.shortcut(x)
    theirs = tn.Sequential(Block(), tn.ReLU()).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    return ours, theirs


@pytest.mark.parametrize("shortcut", [True, False])
def test_matches_torch(torch, rng, shortcut):
    ours, theirs = _ours_and_torch(torch, shortcut)
    shape = (2, 3, 7, 6) if shortcut else (2, 4, 6, 6)
    if not shortcut:  # identity shortcut: the body keeps the shape
        ours[0].body.layers[0] = Conv2D(4, 4, 3, padding=1, bias=False).to(dtype="float64")
        theirs[0].body[0] = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
        theirs[0].body[0].weight.data[...] = torch.tensor(ours[0].body[0].weight.data)
    x, dy = rng.standard_normal(shape), None
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    y = ours(x)
    dx = ours.backward(dy)
    close(y, ty.detach().numpy(), numpy.float64)
    close(dx, tx.grad.numpy(), numpy.float64)
    grads = {n: p.grad for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        close(p.grad, grads[name].numpy(), numpy.float64)
    ours(x)
    assert ours.backward(dy, need_input_grad=False) is None
    with pytest.raises(RuntimeError, match="called a second time"):
        ours.backward(dy)


def test_tree_walks(torch):
    ours, _ = _ours_and_torch(torch, True)
    names = [n for n, _ in ours.named_parameters()]
    assert names[:2] == ["0.body.0.weight", "0.body.1.weight"] and "0.shortcut.0.bias" in names
    assert "0.shortcut.1.running_var" in ours.state_dict()
    ours.eval()
    assert all(not m.training for _, m in ours.named_modules())
    ours.train()
    assert all(m.training for _, m in ours.named_modules())
    ours.to(dtype="float32")
    assert all(v.dtype in (numpy.float32, numpy.int64) for v in ours.state_dict().values())
    text = repr(ours)
    assert "(0): Residual(\n    (body): Sequential(\n      (0): Conv2D(3, 4" in text
    assert "(shortcut): Sequential(" in text and text.endswith("(1): ReLU()\n)")
    state = {k: v.copy() for k, v in ours.state_dict().items()}
    again = _ours_and_torch(torch, True)[0].to(dtype="float32")
    again.load_state_dict(state)
    for k, v in again.state_dict().items():
        assert numpy.array_equal(v, state[k])


def test_shape_mismatch_names_both_shapes():
    block = Residual(Conv2D(3, 4, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match=r"body's output has shape \(1, 4, 3, 3\) but the "
                                         r"shortcut's has \(1, 3, 5, 5\)"):
        block(numpy.zeros((1, 3, 5, 5), numpy.float32))
    with pytest.raises(TypeError, match="Residual body must be a Module, got function"):
        Residual(lambda x: x)


def test_identity_and_rng_state_walk():
    x = numpy.arange(6.0, dtype=numpy.float32).reshape(2, 3)
    assert Identity()(x) is x and Identity().backward(x) is x
    net = Sequential(Residual(Sequential(Linear(3, 3), Dropout(0.5))), Dropout(0.2))
    state = net.random_state()
    assert set(state) == {"0.body.1", "1"} and state["1"]["calls"] == 0
    net(x)
    assert net.random_state()["1"]["calls"] == 1
    net.load_random_state(state)
    assert net.random_state() == state
    with pytest.raises(ValueError, match="random state is for modules"):
        net.load_random_state({"1": state["1"]})


def test_dropout_masks_repeat_after_restoring_the_state():
    gpucnn.manual_seed(0)
    drop = Dropout(0.5)
    x = numpy.ones((4, 8))
    drop(x)
    state = drop.get_rng_state()
    a = drop(x)
    drop.set_rng_state(state)
    assert numpy.array_equal(drop(x), a)
    assert not numpy.array_equal(drop(x), a)  # the next call draws a new mask
    loss, dz = F.softmax_cross_entropy(x[:, :5], numpy.zeros(4, int))  # smoke: shapes fit
    assert dz.shape == (4, 5)
