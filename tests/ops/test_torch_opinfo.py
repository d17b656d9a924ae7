"""PyTorch's own sample inputs (its OpInfo database, CPU float64) for conv2d,
max_pool2d and avg_pool2d, run through gpucnn's forward and backward against
PyTorch's. Unbatched (C, H, W) samples run with a batch axis added (gpucnn takes
N, C, H, W), and PyTorch's one-element and empty tuples are spelled as ints;
nothing is skipped."""
import numpy
import pytest

from conftest import close
from gpucnn import functional as F

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI installs torch==2.13.0)")
cmi = pytest.importorskip("torch.testing._internal.common_methods_invocations",
                          reason="PyTorch's OpInfo samples need expecttest (in the test extra)")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Hundreds of tiny ops: one thread each (on a busy machine, waking a second
    thread for an op that small costs PyTorch far more than the op itself)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _samples(name):
    op = next(o for o in cmi.op_db if o.name == name and o.variant_test_name == "")
    return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


def _spell(value):
    """PyTorch's (k,) -> k and () -> None (stride: the kernel size)."""
    if isinstance(value, (tuple, list)):
        return None if len(value) == 0 else value[0] if len(value) == 1 else tuple(value)
    return value


def _batched(sample):
    x = sample.input.detach()
    return x if x.dim() == 4 else x.unsqueeze(0)


def _torch_grads(fn, tensors, seed):
    """(y, [grad of each tensor]) of fn(*tensors) for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    y = out[0] if isinstance(out, tuple) else out
    dy = torch.from_numpy(numpy.random.default_rng(seed).standard_normal(tuple(y.shape)))
    y.backward(dy)
    return out, dy.numpy(), [t.grad.numpy() for t in leaves]


def _run(name, check):
    samples, seen = _samples(name), set()
    assert samples, f"PyTorch has no samples for {name}"
    for i, sample in enumerate(samples):
        # max_pool2d's samples come in pairs that differ only in return_indices
        key = (tuple(sample.input.shape), repr(sample.args),
               repr({k: v for k, v in sample.kwargs.items() if k != "return_indices"}))
        if key in seen:
            continue
        seen.add(key)
        try:
            check(sample, i)
        except AssertionError as e:
            raise AssertionError(f"{name} sample {i}: input {tuple(sample.input.shape)}, "
                                 f"args {sample.args}, kwargs {sample.kwargs}:\n{e}") from e
    return len(seen)


def test_max_pool2d():
    def check(sample, i):
        kw = {k: _spell(v) for k, v in sample.kwargs.items() if k != "return_indices"}
        x = _batched(sample)
        (ty, tidx), dy, (tdx,) = _torch_grads(
            lambda x: torch.nn.functional.max_pool2d(x, return_indices=True, **kw), [x], i)
        y, idx = F.max_pool2d(x.numpy(), **kw)
        numpy.testing.assert_array_equal(y, ty.detach().numpy())
        numpy.testing.assert_array_equal(idx, tidx.numpy())
        for geometry in ({}, kw):
            close(F.max_pool2d_backward(dy, idx, tuple(x.shape), **geometry), tdx,
                  numpy.float64)
    assert _run("nn.functional.max_pool2d", check) > 100


def test_avg_pool2d():
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")

    def check(sample, i):
        kw = {k: _spell(v) for k, v in zip(names, sample.args)}
        kw.update({k: _spell(v) for k, v in sample.kwargs.items()})
        x = _batched(sample)
        ty, dy, (tdx,) = _torch_grads(lambda x: torch.nn.functional.avg_pool2d(x, **kw), [x], i)
        close(F.avg_pool2d(x.numpy(), **kw), ty.detach().numpy(), numpy.float64)
        close(F.avg_pool2d_backward(dy, tuple(x.shape), **kw), tdx, numpy.float64)
    assert _run("nn.functional.avg_pool2d", check) >= 5


def test_conv2d():
    def check(sample, i):
        weight, bias = sample.args[0].detach(), sample.args[1]
        kw = {k: _spell(v) for k, v in sample.kwargs.items()}
        x = _batched(sample)
        tensors = [x, weight] + ([] if bias is None else [bias.detach()])

        def fn(x, w, b=None):
            return torch.nn.functional.conv2d(x, w, b, **kw)
        ty, dy, grads = _torch_grads(fn, tensors, i)
        xn, wn = x.numpy(), weight.numpy()
        bn = None if bias is None else bias.detach().numpy()
        close(F.conv2d(xn, wn, bn, **kw), ty.detach().numpy(), numpy.float64)
        dx, dw, db = F.conv2d_backward(dy, xn, wn, **kw)
        close(dx, grads[0], numpy.float64)
        close(dw, grads[1], numpy.float64)
        if bias is not None:
            close(db, grads[2], numpy.float64)
    assert _run("nn.functional.conv2d", check) >= 10
