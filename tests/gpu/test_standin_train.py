"""The main job on the CuPy stand-in: a training step with no synchronisation,
train() on digits with checkpoints and exact resume (also across devices), the
CUDA-graph static-buffer path, eval, gradcheck --device cuda, bench and info."""
import numpy
import pytest

import gpucnn
from gpucnn import backend
from gpucnn.app import checkpoint, models, train
from gpucnn.tools import gradcheck
from gpucnn.backends.cuda import graph
from gpucnn.app.cli import main
from gpucnn.step import check_labels, train_step

QUICK = dict(dataset="digits", limit=96, batch_size=32, progress=False)
quiet = lambda *a: None  # noqa: E731


def _digits(device, optimizer="sgd"):
    gpucnn.manual_seed(0)
    net = models.digits_net().to(device)
    params = net.parameters()
    opt = (gpucnn.SGD(params, lr=0.05, momentum=0.9) if optimizer == "sgd"
           else gpucnn.Adam(params, lr=1e-2))
    rng = numpy.random.default_rng(0)
    batches = [(backend.to_device(rng.standard_normal((8, 1, 8, 8)).astype(numpy.float32), device),
                backend.to_device(rng.integers(0, 10, 8), device)) for _ in range(4)]
    return net, opt, batches


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_standin_training_step_has_no_sync(standin, optimizer):
    net, opt, batches = _digits("cuda", optimizer)
    train_step(net, opt, *batches[0])  # first step: kernels load, buffers appear
    for xb, yb in batches[1:]:
        with standin.count_syncs() as syncs:
            loss, logits = train_step(net, opt, xb, yb)
            assert syncs() == 0
        assert isinstance(loss, standin.ndarray) and loss.shape == ()
        assert isinstance(logits, standin.ndarray) and logits.shape == (8, 10)


def test_standin_train_step_equals_the_cpu_step(standin):
    cpu_net, cpu_opt, cpu_batches = _digits("cpu")
    net, opt, batches = _digits("cuda")
    for (x, y), (xc, yc) in zip(batches, cpu_batches):
        loss, _ = train_step(net, opt, x, y)
        cpu_loss, _ = train_step(cpu_net, cpu_opt, xc, yc)
        assert abs(float(loss) - float(cpu_loss)) < 1e-5
    for k, v in net.state_dict().items():
        numpy.testing.assert_allclose(v.get(), cpu_net.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_standin_labels_are_checked_once_not_per_step(standin):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\].*from 0 to 10"):
        check_labels(standin.asarray(numpy.array([0, 10, 3])), 10)
    with standin.count_syncs() as syncs:
        check_labels(standin.asarray(numpy.array([0, 9, 3])), 10)
        assert syncs() == 1


def test_standin_train_epoch_syncs_only_to_read_the_loss(standin, tmp_path):
    """One epoch of 24 steps: reads every READ_EVERY steps and at the end, and a few
    for the checkpoint and the evaluation; none inside a step."""
    before = standin.syncs()
    history, net = train.train(train.Config(epochs=1, out=str(tmp_path), device="cuda",
                                            dataset="digits", limit=768, batch_size=32,
                                            progress=False, cuda_graph=False), log=quiet)
    syncs = standin.syncs() - before
    # the loss read at step 20 and at the end of the epoch; the evaluation's two sums;
    # the checkpoint's weights and Adam buffers, one .get() each, and Adam's step counts
    # (one vector). The labels are host arrays, checked on the host.
    assert syncs == 2 + 2 + 3 * len(net.parameters()) + 1, syncs
    assert history[0]["train_loss"] > 0 and 0 <= history[0]["train_accuracy"] <= 1


def _run(tmp_path, name, epochs, device, resume=None, **kw):
    out = tmp_path / name
    cfg = train.Config(epochs=epochs, out=str(out), device=device,
                       resume=str(resume) if resume else None, **{**QUICK, **kw})
    history, _ = train.train(cfg, log=quiet)
    return history, checkpoint.read(out / "checkpoint.npz")[1]


def test_standin_train_checkpoint_and_exact_resume(standin, tmp_path):
    history, straight = _run(tmp_path, "straight", 3, "cuda")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    _run(tmp_path, "split", 2, "cuda")
    history, split = _run(tmp_path, "split", 3, "cuda", resume=tmp_path / "split/checkpoint.npz")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for k in straight:
        assert numpy.array_equal(straight[k], split[k]), k


def test_standin_gpu_checkpoint_resumes_on_the_cpu_and_back(standin, tmp_path):
    _, gpu1 = _run(tmp_path, "hop", 1, "cuda")
    ckpt = tmp_path / "hop/checkpoint.npz"
    # the checkpoint holds host arrays: it loads on the CPU bit for bit
    net = models.digits_net().to("cpu")
    checkpoint.restore(ckpt, net)
    for k, v in net.state_dict().items():
        assert type(v) is numpy.ndarray and numpy.array_equal(v, gpu1[k])
    _, cpu2 = _run(tmp_path, "hop", 2, "cpu", resume=ckpt)
    history, gpu3 = _run(tmp_path, "hop", 3, "cuda", resume=ckpt)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the same three epochs on the CPU alone: the device only changes rounding
    _, cpu3 = _run(tmp_path, "cpu", 3, "cpu")
    for k in cpu3:
        assert not numpy.array_equal(cpu2[k], gpu3[k])
        numpy.testing.assert_allclose(gpu3[k], cpu3[k], rtol=1e-3, atol=1e-4)


def test_standin_eval_cli_and_device_side_evaluation(standin, tmp_path, capsys):
    _run(tmp_path, "e", 1, "cpu", optimizer="adam")
    ckpt = str(tmp_path / "e/checkpoint.npz")
    cpu = train.evaluate_checkpoint(ckpt, device="cpu", log=quiet)
    with standin.count_syncs() as syncs:
        gpu = train.evaluate_checkpoint(ckpt, device="cuda", log=quiet)
        assert syncs() <= 3  # the label check and the two sums, whatever the batch count
    assert gpu["test_accuracy"] == cpu["test_accuracy"]
    assert abs(gpu["test_loss"] - cpu["test_loss"]) < 1e-5
    assert main(["eval", ckpt, "--device", "cuda", "--batch-size", "64"]) == 0
    assert "digits test set after epoch 1" in capsys.readouterr().out


def test_standin_gradcheck_device_cuda(standin, capsys):
    assert main(["gradcheck", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    cases = len(gradcheck.cases(numpy.random.default_rng(0)))
    assert "on cuda" in out and f"{cases} passed, 0 failed" in out


def test_standin_bench_smoke(standin, capsys):
    captures = standin.Stream.captures
    assert main(["bench", "--device", "cuda", "--smoke", "--repeat", "1"]) == 0
    assert standin.Stream.captures == captures + 1  # the graphed step's one capture
    out = capsys.readouterr().out
    assert "benchmark on cuda" in out and "LeNet SGD step, batch 2" in out
    assert "LeNet images/s: gpucnn" in out
    assert "LeNet SGD step in a CUDA graph, batch 2 training step" in out


def test_standin_info_reports_the_device_and_the_test_kernel(standin, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "device: cuda" in out and "a test kernel compiled with NVRTC and ran" in out
    assert "GPU: gpucnn CuPy stand-in" in out and "instantiations loaded on the GPU" in out


# --- CUDA graph: the static-buffer path ------------------------------------------------------


def _graphed_vs_eager(standin, batches_x, batches_y, capture):
    net, opt, _ = _digits("cuda")
    eager_net, eager_opt, _ = _digits("cuda")
    graphed = graph.GraphedStep(net, opt, step=train_step, capture=capture, warmup=2,
                                log=quiet)
    for x, y in zip(batches_x, batches_y):
        loss, logits = graphed(x, y)
        eager_loss, eager_logits = train_step(eager_net, eager_opt, x, y)
        assert numpy.array_equal(loss.get(), eager_loss.get())
        assert numpy.array_equal(logits.get(), eager_logits.get())
    for k, v in net.state_dict().items():
        assert numpy.array_equal(v.get(), eager_net.state_dict()[k].get()), k
    assert opt.steps == eager_opt.steps
    return graphed


@pytest.mark.parametrize("capture", [True, False])
def test_standin_cuda_graph_static_buffers_match_eager(standin, capture):
    rng = numpy.random.default_rng(3)
    xs = [standin.asarray(rng.standard_normal((8, 1, 8, 8)).astype(numpy.float32))
          for _ in range(6)]
    ys = [standin.asarray(rng.integers(0, 10, 8)) for _ in range(6)]
    xs.append(xs[0][:5])  # a last, partial batch runs eagerly
    ys.append(ys[0][:5])
    captures = standin.cuda.Stream.captures
    graphed = _graphed_vs_eager(standin, xs, ys, capture)
    assert standin.cuda.Stream.captures - captures == (1 if capture else 0)
    assert (graphed.graph is not None) == capture


def test_standin_cuda_graph_capture_failure_falls_back_with_one_line(standin):
    net, opt, batches = _digits("cuda")
    lines = []
    graphed = graph.GraphedStep(net, opt, step=train_step, warmup=1, log=lines.append)
    stream = graphed.stream
    stream.begin_capture()  # a capture already under way makes begin_capture fail
    for x, y in batches:
        graphed(x, y)
    stream.end_capture()
    assert len(lines) == 1 and "CUDA graph capture failed" in lines[0], lines
    assert "training continues eagerly" in lines[0] and graphed.graph is None
    eager_net, eager_opt, _ = _digits("cuda")
    for x, y in batches:
        train_step(eager_net, eager_opt, x, y)
    for k, v in net.state_dict().items():
        assert numpy.array_equal(v.get(), eager_net.state_dict()[k].get()), k


def test_standin_cuda_graph_is_off_with_dropout(standin):
    gpucnn.manual_seed(0)
    net = gpucnn.Sequential(gpucnn.Flatten(), gpucnn.Dropout(0.2),
                            gpucnn.Linear(64, 10)).to("cuda")
    lines = []
    graphed = graph.GraphedStep(net, gpucnn.SGD(net.parameters(), lr=0.1), step=train_step,
                                log=lines.append)
    assert not graphed.capture and len(lines) == 1 and "Dropout" in lines[0]


def test_standin_train_uses_the_graph_by_default_on_cuda(standin, tmp_path):
    captures = standin.cuda.Stream.captures
    kw = dict(optimizer="sgd", lr=0.05, limit=200)  # 6 full batches and a partial one
    _, with_graph = _run(tmp_path, "g", 1, "cuda", **kw)
    assert standin.cuda.Stream.captures == captures + 1  # after the warm-up steps
    _, eager = _run(tmp_path, "n", 1, "cuda", cuda_graph=False, **kw)
    for k in eager:
        assert numpy.array_equal(with_graph[k], eager[k]), k


def test_standin_train_records_its_conv_precision_and_a_resume_keeps_it(standin, tmp_path):
    config = dict(QUICK, device="cuda", out=str(tmp_path / "run"), epochs=1, precision="tf32")
    history, _ = train.train(train.Config(**config), log=quiet)
    assert history[-1]["conv_precision"] == "tf32"
    ckpt = tmp_path / "run/checkpoint.npz"
    assert checkpoint.read(ckpt)[0]["conv_precision"] == "tf32"
    lines = []
    resumed = dict(config, epochs=2, resume=str(ckpt), precision=None)
    history, _ = train.train(train.Config(**resumed), log=lines.append)
    assert [h["conv_precision"] for h in history] == ["tf32", "tf32"]  # kept, not the default
    assert not any("conv precision" in line for line in lines)
    changed = dict(resumed, epochs=3, precision="fp32")
    history, _ = train.train(train.Config(**changed), log=lines.append)
    assert history[-1]["conv_precision"] == "fp32"
    assert sum("trained with conv precision tf32 and resumes with fp32" in line
               for line in lines) == 1
    assert gpucnn.get_conv_precision() == "fp32"  # the caller's setting is back


def test_cpu_train_says_once_that_tensor_core_precisions_apply_on_a_gpu(standin, tmp_path):
    lines = []
    config = dict(QUICK, device="cpu", out=str(tmp_path / "run"), epochs=1, precision="3xtf32")
    history, _ = train.train(train.Config(**config), log=lines.append)
    assert sum("--precision 3xtf32 needs a GPU with TF32 tensor cores" in line
               for line in lines) == 1
    assert history[-1]["conv_precision"] == "fp32"
    # a CPU run's fp32 does not bind a GPU resume: it takes the process's setting
    resumed = dict(QUICK, device="cuda", epochs=2, resume=str(tmp_path / "run/checkpoint.npz"))
    with gpucnn.conv_precision("3xtf32"):
        history, _ = train.train(train.Config(**resumed), log=lines.append)
    assert [h["conv_precision"] for h in history] == ["fp32", "3xtf32"]
