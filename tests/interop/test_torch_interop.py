"""PyTorch and DLPack: inputs from any __dlpack__/__array__ array, outputs that
torch.from_dlpack takes, and weights moving both ways (state dicts, torch.save
files, gpucnn.save). Outputs compared in float32 within rtol 1e-4, atol 1e-5."""
import numpy
import pytest

import gpucnn
from gpucnn import interop, nn

torch = pytest.importorskip("torch")
TOL = dict(rtol=1e-4, atol=1e-5)


def _gpucnn_net():
    return nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(),
                         nn.MaxPool2D(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _torch_net():
    t = torch.nn
    return t.Sequential(t.Conv2d(1, 4, 3, padding=1), t.BatchNorm2d(4), t.ReLU(), t.MaxPool2d(2),
                        t.Flatten(), t.Linear(4 * 4 * 4, 3))


def _data(seed=0, n=16):
    rng = numpy.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(numpy.float32), rng.integers(0, 3, n)


def test_a_torch_tensor_goes_in_without_a_copy():
    t = torch.arange(12.0).reshape(3, 4)
    a = gpucnn.from_dlpack(t)
    assert isinstance(a, numpy.ndarray) and a.dtype == numpy.float32
    assert numpy.shares_memory(a, t.numpy())
    assert gpucnn.as_array(t) is not None and numpy.shares_memory(gpucnn.as_array(t), t.numpy())


def test_model_inputs_take_torch_tensors_and_array_likes():
    model = _gpucnn_net().eval()
    x, _ = _data()
    expected = model(x)

    class ArrayLike:  # offers only __array__ (as a pandas frame or a PIL image does)
        def __array__(self, dtype=None, copy=None):
            return x
    numpy.testing.assert_array_equal(model(torch.from_numpy(x)), expected)
    numpy.testing.assert_array_equal(model.forward(torch.from_numpy(x)), expected)
    numpy.testing.assert_array_equal(model(ArrayLike()), expected)


def test_outputs_go_to_torch_through_dlpack():
    y = _gpucnn_net().eval()(_data()[0])
    t = torch.from_dlpack(y)
    assert t.dtype == torch.float32 and tuple(t.shape) == y.shape
    assert numpy.shares_memory(t.numpy(), y)


def test_a_tensor_that_requires_grad_says_what_to_do():
    with pytest.raises(TypeError, match=r"detach\(\)"):
        gpucnn.from_dlpack(torch.ones(2, requires_grad=True))
    with pytest.raises(TypeError, match="__dlpack__"):
        gpucnn.from_dlpack([1.0, 2.0])


def _train_torch(net, steps=5):
    x, y = _data(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("through", ["tensors", "torch.save file"])
def test_weights_trained_in_pytorch_load_into_gpucnn(tmp_path, through):
    torch.manual_seed(0)
    tnet = _train_torch(_torch_net())
    state = tnet.state_dict()
    if through == "torch.save file":
        torch.save(state, tmp_path / "w.pt")
        state = tmp_path / "w.pt"
    model = _gpucnn_net().load_state_dict(state).eval()
    assert int(model[1].num_batches_tracked) == 5
    x, _ = _data(2)
    with torch.no_grad():
        expected = tnet(torch.from_numpy(x)).numpy()
    numpy.testing.assert_allclose(model(x), expected, **TOL)


def test_weights_trained_in_gpucnn_load_into_pytorch(tmp_path):
    gpucnn.manual_seed(0)
    model = _gpucnn_net()
    optimizer = gpucnn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data(1)
    for _ in range(5):
        gpucnn.train_step(model, optimizer, x, y)
    model.eval()
    gpucnn.save(model, tmp_path / "w.pt")
    tnet = _torch_net()
    tnet.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    tnet.eval()
    x, _ = _data(2)
    with torch.no_grad():
        expected = tnet(torch.from_numpy(x)).numpy()
    numpy.testing.assert_allclose(model(x), expected, **TOL)


def test_save_without_torch_writes_an_npz_that_loads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(interop, "_torch", lambda: None)
    model = _gpucnn_net()
    path = gpucnn.save(model, tmp_path / "w.bin")
    assert path == tmp_path / "w.bin" and list(tmp_path.iterdir()) == [path]
    with numpy.load(path) as archive:
        assert sorted(archive.files) == sorted(model.state_dict())
    other = _gpucnn_net().load_state_dict(path)
    for k, v in model.state_dict().items():
        numpy.testing.assert_array_equal(other.state_dict()[k], v)


def test_a_torch_file_without_torch_is_one_clear_error(tmp_path, monkeypatch):
    torch.save(_torch_net().state_dict(), tmp_path / "w.pt")
    monkeypatch.setattr(interop, "_torch", lambda: None)
    with pytest.raises(interop.StateFileError, match=r"written by torch.save; reading it needs"):
        _gpucnn_net().load_state_dict(tmp_path / "w.pt")


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"), ("whole model", "not a state dict"), (b"\x80\x02junk", "could not be read")])
def test_bad_state_files_say_why(tmp_path, content, match):
    path = tmp_path / "w.pt"
    if content == "whole model":
        torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(interop.StateFileError, match=match):
        gpucnn.read_state_dict(path)


def test_a_training_checkpoint_gives_its_model_weights(tmp_path):
    from gpucnn.app import checkpoint
    model = _gpucnn_net()
    checkpoint.save(tmp_path / "c.npz", model, gpucnn.SGD(model.parameters(), lr=0.1), {})
    state = gpucnn.read_state_dict(tmp_path / "c.npz")
    assert sorted(state) == sorted(model.state_dict())
    numpy.testing.assert_array_equal(state["0.weight"], model[0].weight.data)


def test_a_mismatched_torch_state_dict_is_named():
    state = torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict()
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys \[\]"):
        _gpucnn_net().load_state_dict(state)


def test_a_state_entry_that_requires_grad_is_named():
    state = {k: torch.from_numpy(numpy.array(v)) for k, v in _gpucnn_net().state_dict().items()}
    state["5.bias"].requires_grad_(True)
    with pytest.raises(TypeError, match=r"state_dict\['5.bias'\]: .*detach\(\)"):
        _gpucnn_net().load_state_dict(state)


def test_train_step_takes_torch_tensors(torch):
    gpucnn.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    opt = gpucnn.SGD(net.parameters(), lr=0.1)
    x = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)
    loss, logits = gpucnn.train_step(net, opt, x, torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and numpy.isfinite(float(loss))


@pytest.mark.parametrize("content", [b"hello, weights", numpy.lib.format.MAGIC_PREFIX + b"xx"])
def test_a_file_of_another_kind_is_named_as_such(tmp_path, content):
    path = tmp_path / "w.bin"
    path.write_bytes(content)
    with pytest.raises(interop.StateFileError, match="neither a torch.save file nor a NumPy"):
        interop.read_state_dict(path)
