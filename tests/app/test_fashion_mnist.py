"""The real data path: a short LeNet run on Debian's Fashion-MNIST files."""
import pathlib

import pytest

from gpucnn.app import data, train

DIR = pathlib.Path(data.DATASETS["fashion-mnist"].default_dir)
pytestmark = pytest.mark.skipif(not DIR.is_dir(), reason=f"{DIR} is missing: apt-get install "
                                                          "dataset-fashion-mnist (CI installs it)")


def test_real_files_load():
    ds = data.load("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert sorted(set(ds.train_y.tolist())) == list(range(10))


def test_short_lenet_run_learns(tmp_path):
    history, _ = train.train(train.Config(dataset="fashion-mnist", limit=3000, epochs=1,
                                          out=str(tmp_path), progress=False),
                             log=lambda *a: None)
    assert history[0]["test_accuracy"] > 0.70
    assert (tmp_path / "confusion.png").exists()
