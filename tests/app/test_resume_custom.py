"""Resuming a run of a model built in Python says what eval says: rebuild the model
and pass it; the README's way of doing so works."""
import gpucnn
from gpucnn import train
from gpucnn.app.cli import main


def _net():
    gpucnn.manual_seed(0)
    return gpucnn.Sequential(gpucnn.Conv2D(1, 4, 3, padding=1), gpucnn.ReLU(),
                             gpucnn.MaxPool2D(2), gpucnn.Flatten(), gpucnn.Linear(4 * 4 * 4, 10))


def test_resume_of_a_python_model_needs_the_model(tmp_path, capsys):
    out = tmp_path / "mine"
    train.train(train.Config(epochs=1, limit=64, out=str(out), progress=False, device="cpu"),
                model=_net(), log=lambda *a: None)
    path = out / "checkpoint.npz"
    capsys.readouterr()
    assert main(["train", "--resume", str(path), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a model passed in from Python" in err, err
    assert "model=net" in err and "another model" not in err
    # the README's continuation: the config with resume, and the model again
    history, _ = train.train(train.Config(epochs=2, resume=str(path), progress=False),
                             model=_net(), log=lambda *a: None)
    assert [row["epoch"] for row in history] == [1, 2]
