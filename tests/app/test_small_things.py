"""Small things a new user meets: tune's device line, help on every option, eval's --data-dir on a
bundled dataset, whole-epoch ticks on a one-epoch plot."""
import argparse

import pytest

from gpucnn import backend
from gpucnn.app import cli, plots, train
from gpucnn.app.cli import main


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("gpucnn: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.skipif(backend.cuda_available(), reason="tune runs where there is a GPU")
def test_tune_without_arguments_says_the_device_is_its_default(capsys):
    assert main(["tune"]) == 2
    err = _one_line(capsys)
    assert "(argument)" not in err and "its default" in err, err


def test_tune_on_the_cpu_is_refused_by_name(capsys):
    assert main(["tune", "--device", "cpu"]) == 2
    assert "--device cpu" in _one_line(capsys)


def test_every_option_of_every_command_has_help():
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in subparsers.choices.items() for action in sub._actions
               if not action.help]
    assert missing == []


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    train.train(train.Config(epochs=1, limit=64, out=str(out), progress=False, device="cpu"),
                log=lambda *a: None)
    return out


def test_eval_of_a_bundled_dataset_refuses_data_dir(digits_run, tmp_path, capsys):
    assert main(["eval", str(digits_run / "checkpoint.npz"), "--data-dir", str(tmp_path)]) == 2
    err = _one_line(capsys)
    assert f"--data-dir {tmp_path}" in err and "digits" in err and "bundled" in err


def test_train_on_a_bundled_dataset_refuses_data_dir(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--no-progress"]) == 2
    assert "bundled" in _one_line(capsys) and not (tmp_path / "run").exists()


def test_a_one_epoch_plot_has_one_whole_tick(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    row = dict(epoch=1, train_loss=1.0, test_loss=1.1, train_accuracy=0.5, test_accuracy=0.4)
    plots.curves([row], tmp_path / "curves.png")
    (fig,) = figures
    assert [list(ax.get_xticks()) for ax in fig.axes] == [[1], [1]]
