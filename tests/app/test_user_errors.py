"""Every failure the user caused is one line on stderr and exit status 2, caught
before training where it can be; `gpucnn eval` needs only the test files.
docs/errors.md lists these cases."""
import contextlib
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import numpy
import pytest

from conftest import idx_set
from gpucnn.app import checkpoint, data, train
from gpucnn import errors
from gpucnn.app.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--limit", "64", "--epochs", "1", "--no-progress", "--device", "cpu"]


def one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("gpucnn: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "epoch 1/" not in captured.out  # nothing was trained
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch digits run to evaluate and resume."""
    out = tmp_path_factory.mktemp("run")
    train.train(train.Config(epochs=1, limit=64, out=str(out), progress=False),
                log=lambda *a: None)
    return out


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert main(["train", "--out", str(target)] + FAST) == 2
    one_line_error(capsys, f"{target} is a file, not a folder")


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["train", "--out", str(tmp_path / "taken" / "run")] + FAST) == 2
    one_line_error(capsys, f"lies under {tmp_path / 'taken'}, which is a file")


@contextlib.contextmanager
def _unprivileged():
    """Drop root's power to write anywhere (as `nobody`) for a read-only check."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_out_is_refused_before_training(capsys):
    parent = tempfile.mkdtemp(prefix="gpucnn-ro-")
    try:
        os.chmod(parent, 0o755)
        target = os.path.join(parent, "ro")
        os.mkdir(target, 0o555)
        os.chmod(target, 0o555)
        t0 = time.perf_counter()
        with _unprivileged():
            rc = main(["train", "--out", target] + FAST)
        assert rc == 2 and time.perf_counter() - t0 < 5
        one_line_error(capsys, f"--out {target} is not writable (Permission denied)")
        with _unprivileged():  # a folder to be created inside it
            assert main(["train", "--out", os.path.join(target, "sub")] + FAST) == 2
        one_line_error(capsys, "is not writable")
    finally:
        shutil.rmtree(parent)


def test_corrupt_gzip_data_names_the_file(tmp_path, capsys):
    root = idx_set(tmp_path / "mnist")
    path = root / "train-images-idx3-ubyte"
    packed = bytearray(gzip.compress(path.read_bytes()))
    packed[10] |= 0x06  # the first deflate block's type becomes 3, which does not exist
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(packed))
    path.unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(bytes(packed))
    assert main(["train", "--dataset", "mnist", "--data-dir", str(root), "--out",
                 str(tmp_path / "run")] + FAST) == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz: cannot be read or decompressed")


@pytest.mark.parametrize("command", ["eval", "resume", "predict"])
def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys, command):
    bogus = tmp_path / "random.npz"
    bogus.write_bytes(numpy.random.default_rng(0).bytes(3000))
    argv = {"eval": ["eval", str(bogus)],
            "resume": ["train", "--resume", str(bogus), "--no-progress"],
            "predict": ["predict", str(bogus), str(bogus)]}[command]
    assert main(argv) == 2
    err = one_line_error(capsys, f"{bogus} is not a readable gpucnn checkpoint (not a .npz "
                                 "archive)")
    assert "pickle" not in err


def test_empty_training_set(tmp_path, capsys):
    root = idx_set(tmp_path / "mnist", n_train=0)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(root), "--out",
                 str(tmp_path / "run")] + FAST) == 2
    one_line_error(capsys, "train-images-idx3-ubyte holds no images")
    assert not (tmp_path / "run").exists()  # no empty run folder left behind


@pytest.mark.parametrize("flag, value, needle", [
    ("--momentum", "5", "momentum must be in [0, 1), got 5.0"),
    ("--momentum", "1", "momentum must be in [0, 1), got 1.0"),
    ("--momentum", "-0.1", "momentum must be in [0, 1), got -0.1"),
    ("--seed", "-1", "seed must be an int >= 0, got -1"),
    ("--weight-decay", "-1", "weight_decay must be a number >= 0"),
    ("--lr", "nan", "lr must be a positive number"),
    ("--batch-size", "0", "batch_size must be a positive int, got 0"),
])
def test_bad_training_settings(tmp_path, capsys, flag, value, needle):
    assert main(["train", "--optimizer", "sgd", flag, value, "--out", str(tmp_path / "r")] +
                FAST) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "r").exists()  # refused before the folder was made


@pytest.mark.parametrize("size", ["0", "-5"])
def test_eval_bad_batch_size(run, capsys, size):
    assert main(["eval", str(run / "checkpoint.npz"), "--batch-size", size]) == 2
    one_line_error(capsys, f"batch_size must be a positive int, got {size}")


def test_bench_repeat_zero_and_gradcheck_negative_seed(capsys):
    assert main(["bench", "--repeat", "0", "--device", "cpu"]) == 2
    one_line_error(capsys, "--repeat must be a positive int, got 0")
    assert main(["gradcheck", "--seed", "-1", "--device", "cpu"]) == 2
    one_line_error(capsys, "--seed must be an int >= 0, got -1")


def test_cuda_without_a_gpu(capsys):
    from gpucnn import backend
    if backend.cuda_available():
        pytest.skip("a GPU is usable here")
    assert main(["gradcheck", "--device", "cuda"]) == 2
    one_line_error(capsys, "device 'cuda' requested")


def test_eval_uses_the_checkpoints_normalisation_and_only_the_test_files(tmp_path, capsys):
    root = idx_set(tmp_path / "mnist", n_train=64, n_test=30)
    history, _ = train.train(train.Config(dataset="mnist", data_dir=str(root), epochs=1,
                                          batch_size=16, out=str(tmp_path / "run"),
                                          progress=False), log=lambda *a: None)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (root / name).unlink()
    result = train.evaluate_checkpoint(tmp_path / "run" / "checkpoint.npz", log=lambda *a: None)
    assert result["test_accuracy"] == history[-1]["test_accuracy"]
    assert result["test_loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (root / name).unlink()
    idx_set(tmp_path / "empty", n_test=0)
    assert main(["eval", str(tmp_path / "run" / "checkpoint.npz"), "--data-dir",
                 str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "t10k-images-idx3-ubyte holds no images")


def test_a_closed_pipe_is_not_a_traceback(run):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) is gone before anything is printed
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gpucnn.app.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    done = subprocess.run([sys.executable, "-c", code, ROOT, "eval", str(run / "checkpoint.npz"),
                           "--device", "cpu"], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "gpucnn: error: the output pipe was closed before all output was written"]


def test_only_user_errors_are_caught():
    """cli.main turns UserError into one line; TypeError and RuntimeError from a bug
    keep their traceback, so they must not be UserErrors."""
    for cls in (data.DataError, checkpoint.CheckpointError, errors.ConfigError,
                errors.RunFolderError, errors.DiskFullError, errors.DeviceError):
        assert issubclass(cls, errors.UserError)
    for cls in (TypeError, RuntimeError, ValueError, OSError, train.TrainingDiverged):
        assert not issubclass(cls, errors.UserError)
