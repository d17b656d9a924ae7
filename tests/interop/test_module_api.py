"""What a PyTorch user reaches for first: to(dtype), double()/float(), buffers(),
modules(), named_modules(), apply()."""
import numpy
import pytest

from gpucnn import nn


def _net():
    return nn.Sequential(nn.Conv2D(1, 2, 3), nn.BatchNorm2D(2),
                         nn.Residual(nn.Sequential(nn.ReLU())), nn.Flatten(), nn.Linear(8, 2))


def _dtypes(model):
    return {k: v.dtype for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cast", [lambda m: m.to(numpy.float64), lambda m: m.double(),
                                  lambda m: m.to("float64"), lambda m: m.to(dtype=numpy.float64),
                                  lambda m: m.to(numpy.dtype("float64"))])
def test_casts_to_float64_keep_integer_buffers(cast):
    model = _net()
    assert cast(model) is model
    dtypes = _dtypes(model)
    assert dtypes.pop("1.num_batches_tracked") == numpy.int64
    assert set(dtypes.values()) == {numpy.dtype(numpy.float64)}
    x = numpy.ones((1, 1, 4, 4))
    assert model.eval()(x).dtype == numpy.float64
    model.float()
    assert numpy.dtype(numpy.float32) in _dtypes(model).values()
    assert numpy.dtype(numpy.float64) not in _dtypes(model).values()


def test_torch_dtypes_are_taken():
    torch = pytest.importorskip("torch")
    model = _net().to(torch.float64)
    assert model[0].weight.data.dtype == numpy.float64
    assert model.to(dtype=torch.float32)[0].weight.data.dtype == numpy.float32
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got torch.int32"):
        model.to(torch.int32)


def test_to_still_refuses_bad_devices_and_dtypes():
    with pytest.raises(ValueError, match="device must be one of"):
        _net().to("bogus")
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        _net().to(numpy.int32)


def test_modules_buffers_and_apply():
    model = _net()
    names = [name for name, _ in model.named_modules()]
    assert names == ["", "0", "1", "2", "2.body", "2.body.0", "2.shortcut", "3", "4"]
    assert model.modules() == [m for _, m in model.named_modules()]
    assert [name for name, _ in model.named_buffers()] == [
        "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert model.buffers()[0].data is model[1].running_mean
    seen = []
    assert model.apply(seen.append) is model
    # children before their parents, the model last (PyTorch's order)
    assert seen[-1] is model and seen.index(model[2].body[0]) < seen.index(model[2].body) \
        < seen.index(model[2])
    assert sorted(map(id, seen)) == sorted(map(id, model.modules()))


def test_apply_reinitialises_layers():
    model = _net()

    def zero_linear(m):
        if isinstance(m, nn.Linear):
            m.weight.data[...] = 0
    model.apply(zero_linear)
    assert not model[4].weight.data.any() and model[0].weight.data.any()
