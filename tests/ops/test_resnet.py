"""The built-in resnet against the same network in torch, its recipe, and exact
resume with a schedule, augmentation and Dropout."""
import os
import signal

import numpy
import pytest

import gpucnn
from conftest import close
from gpucnn.tools import bench
from gpucnn.app import checkpoint, models, train
from gpucnn import functional as F
from gpucnn.app.cli import main
from gpucnn.nn import Dropout, Module, Sequential


def test_resnet_matches_torch_forward_backward(torch, rng):
    gpucnn.manual_seed(0)
    ours = models.resnet().to(dtype="float64")
    theirs = bench.torch_resnet(torch).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        tx = torch.tensor(x, requires_grad=True)
        theirs.zero_grad()
        tl = torch.nn.functional.cross_entropy(theirs(tx), torch.tensor(y), label_smoothing=0.1)
        tl.backward()
        ours.zero_grad()
        loss, dz = F.softmax_cross_entropy(ours(x), y, label_smoothing=0.1)
        dx = ours.backward(dz)
        close(loss, tl.item(), numpy.float64)
        close(dx, tx.grad.numpy(), numpy.float64)
        grads = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            close(p.grad, grads[name].grad.numpy(), numpy.float64, scale=10)
    for name, v in theirs.state_dict().items():
        close(ours.state_dict()[name], v.numpy(), numpy.float64)


def test_resnet_init_is_torchvisions():
    gpucnn.manual_seed(0)
    net = models.resnet()
    stem = net[0].weight.data
    assert net[0].bias is None and abs(stem.std() / (2 / (16 * 9)) ** 0.5 - 1) < 0.15
    assert numpy.array_equal(net[1].weight.data, numpy.ones(16))
    assert numpy.array_equal(net[1].bias.data, numpy.zeros(16))
    assert sum(p.data.size for p in net.parameters()) == 77850 - 96


def test_recipe_defaults_and_overrides():
    c = train.Config(dataset="fashion-mnist", model="resnet").filled()
    assert (c.epochs, c.batch_size, c.optimizer, c.lr, c.momentum, c.nesterov, c.weight_decay,
            c.schedule, c.augment, c.label_smoothing) == (10, 128, "sgd", 0.1, 0.9, True, 5e-4,
                                                          "cosine", "crop+flip", 0.0)
    assert train.Config(dataset="mnist", model="resnet").filled().augment == "crop"
    c = train.Config(dataset="fashion-mnist", model="resnet", augment="none", lr=0.05,
                     schedule="step").filled()
    assert (c.augment, c.lr, c.schedule) == ("none", 0.05, "step")
    lenet = train.Config(dataset="fashion-mnist").filled()
    assert (lenet.schedule, lenet.augment, lenet.weight_decay, lenet.nesterov) == (
        "none", "none", 0.0, False)
    with pytest.raises(ValueError, match="augment must be one of"):
        train.Config(augment="rotate").filled()
    with pytest.raises(ValueError, match="nesterov applies to --optimizer sgd"):
        train.Config(nesterov=True, optimizer="adam").filled()


def test_help_shows_the_recipe_and_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--schedule", "--augment", "--label-smoothing", "--warmup", "--nesterov",
                 "resnet", "cosine to 0 per batch"):
        assert flag in text


QUICK = dict(dataset="digits", limit=96, batch_size=32, progress=False, schedule="cosine",
             augment="crop+flip", label_smoothing=0.1, optimizer="sgd", lr=0.05, nesterov=True,
             weight_decay=1e-3, warmup=2)


class _Interrupt(Module):
    def __init__(self, at):
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:  # Ctrl-C, as the terminal sends it
                os.kill(os.getpid(), signal.SIGINT)
        return x

    def backward(self, dy, need_input_grad=True):
        return dy


def _net(at=None):
    gpucnn.manual_seed(0)
    net = models.resnet(in_channels=1)
    layers = net.layers[:-1] + [Dropout(0.3), net.layers[-1]]
    return Sequential(*layers, *([_Interrupt(at)] if at else []))


def _state(path):
    return checkpoint.read(path)[1]


def test_resume_is_bit_exact_with_schedule_augment_and_dropout(tmp_path, ctrl_c):
    quiet = lambda *a: None  # noqa: E731
    train.train(train.Config(epochs=3, out=str(tmp_path / "straight"), **QUICK), model=_net(),
                log=quiet)
    cut = tmp_path / "cut2"
    with pytest.raises(KeyboardInterrupt):
        train.train(train.Config(epochs=3, out=str(cut), **QUICK), model=_net(3 + 2),
                    log=quiet)  # epoch 2, step 2, after the Dropout drew its mask
    meta = checkpoint.read(cut / "checkpoint.npz")[0]
    assert (meta["epoch"], meta["step"]) == (1, 2)  # step 2 finished, then training stopped
    assert meta["schedule"]["last_step"] == 5 and meta["augment"]["calls"] == 5
    assert meta["model_rng"]["7"]["calls"] == 5
    train.train(train.Config(epochs=3, out=str(cut), resume=str(cut / "checkpoint.npz"),
                             **QUICK), model=_net(), log=quiet)
    a, b = _state(tmp_path / "straight/checkpoint.npz"), _state(cut / "checkpoint.npz")
    assert "1.running_var" in a and "5.0.shortcut.1.running_mean" in a
    for k in a:
        assert numpy.array_equal(a[k], b[k]), k
    straight = checkpoint.read(tmp_path / "straight/checkpoint.npz")[0]
    assert straight["schedule"]["last_step"] == 9 and straight["model_rng"]["7"]["calls"] == 9
