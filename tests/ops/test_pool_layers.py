"""MaxPool2D and AvgPool2D: PyTorch's layer arguments, the geometry computed once
per input shape and handed to backward, argument errors at construction."""
import numpy
import pytest

from conftest import close
from gpucnn import AvgPool2D, MaxPool2D


def _torch_layer(torch, layer, x, dy):
    tx = torch.tensor(x, requires_grad=True)
    ty = layer(tx)
    ty.backward(torch.tensor(dy))
    return ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("make, make_torch", [
    (lambda: MaxPool2D(3, 2, 1, 2, ceil_mode=True),
     lambda nn: nn.MaxPool2d(3, 2, 1, 2, ceil_mode=True)),
    (lambda: MaxPool2D((2, 3), dilation=(2, 1)), lambda nn: nn.MaxPool2d((2, 3), dilation=(2, 1))),
    (lambda: AvgPool2D(3, 2, 1, True, False), lambda nn: nn.AvgPool2d(3, 2, 1, True, False)),
    (lambda: AvgPool2D(2, 1, divisor_override=3), lambda nn: nn.AvgPool2d(2, 1,
                                                                         divisor_override=3)),
])
def test_layer_matches_torch(torch, rng, make, make_torch, dtype):
    layer, tlayer = make(), make_torch(torch.nn)
    for shape in [(2, 3, 9, 8), (1, 3, 7, 10)]:  # a new input shape: a new geometry
        x = rng.standard_normal(shape).astype(dtype)
        y = layer(x)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = layer.backward(dy)
        ty, tdx = _torch_layer(torch, tlayer, x, dy)
        assert y.dtype == dx.dtype == dtype
        close(y, ty, dtype)
        close(dx, tdx, dtype)


def test_geometry_is_computed_once_per_input_shape(rng):
    layer = MaxPool2D(2)
    x = rng.standard_normal((2, 1, 6, 6))
    layer(x)
    g = layer._ctx.g
    layer.backward(numpy.ones((2, 1, 3, 3)))
    layer(x + 1)
    assert layer._ctx.g is g  # the same object: not recomputed
    layer(rng.standard_normal((3, 1, 8, 6)))
    assert layer._ctx.g is not g and layer._ctx.g.P == 4
    with pytest.raises(ValueError, match=r"grad_output must have shape \(3, 1, 4, 3\)"):
        layer.backward(numpy.ones((2, 1, 3, 3)))


def test_backward_before_forward_is_an_error():
    for layer in (MaxPool2D(2), AvgPool2D(2)):
        with pytest.raises(RuntimeError, match="backward called before forward"):
            layer.backward(numpy.ones((1, 1, 2, 2)))


def test_empty_batch(rng):
    for layer in (MaxPool2D(3, 2, 1, 2), AvgPool2D(3, 2, 1, count_include_pad=False)):
        y = layer(numpy.zeros((0, 2, 9, 9), numpy.float32))
        assert y.shape[:2] == (0, 2) and y.dtype == numpy.float32
        assert layer.backward(y).shape == (0, 2, 9, 9)


@pytest.mark.parametrize("make, exc, words", [
    (lambda: MaxPool2D(2, dilation=0), ValueError, "dilation must be positive"),
    (lambda: MaxPool2D(2, 2, 0, True), TypeError, "dilation must be an int or a pair"),
    (lambda: MaxPool2D(2, padding=2), ValueError, "at most half of kernel_size"),
    (lambda: AvgPool2D(2, divisor_override=0), ValueError, "divisor_override must be"),
    (lambda: AvgPool2D(2, count_include_pad="no"), TypeError, "count_include_pad must be a bool"),
    (lambda: AvgPool2D((2, 2, 2)), TypeError, "kernel_size must be an int or a pair"),
])
def test_bad_arguments_fail_at_construction(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value)


def test_repr_shows_the_arguments():
    assert repr(MaxPool2D(3, 2, 1, 2, ceil_mode=True)) == (
        "MaxPool2D(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)")
    assert "count_include_pad=False, divisor_override=None" in repr(
        AvgPool2D(2, count_include_pad=False))
