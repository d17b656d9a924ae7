"""gpucnn's CPU threads (gpucnn/backends/cpu/threads.py): the work is shared out, the answers
do not depend on how many threads share it, and the BLAS is held to one thread
meanwhile. The numbers are compared with the BLAS at one thread throughout: a
matrix product's last bits depend on the BLAS's own thread count."""
import multiprocessing
import os
import subprocess
import sys
import threading

import numpy
import pytest

import gpucnn
from gpucnn import functional as F
from gpucnn.app import models
from gpucnn.backends.cpu import conv as cpu_conv, threads as threads_module
from gpucnn.functional import conv

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def one_blas_thread():
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_set_num_threads_rejects_what_is_not_a_positive_int(bad, cpu_threads):
    with pytest.raises(ValueError, match=r"num_threads must be an int >= 1, got"):
        gpucnn.set_num_threads(bad)


def test_map_blocks_cuts_contiguous_blocks_runs_them_side_by_side_and_keeps_order(cpu_threads):
    cpu_threads(3)
    barrier = threading.Barrier(3, timeout=30)  # fails unless three threads run at once

    def fn(block):
        barrier.wait()
        return list(block), threading.current_thread().name
    out = threads_module.map_blocks(fn, list(range(10)))
    assert [b for b, _ in out] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert len({name for _, name in out}) == 3
    assert threads_module.map_blocks(fn, []) == []
    blocks = threads_module.map_blocks(list, list(range(5)), at_least=2)
    assert blocks == [[0, 1, 2], [3, 4]]  # three threads, but no block under two items
    assert threads_module.map_blocks(list, [0, 1, 2], at_least=2) == [[0, 1, 2]]


def test_map_blocks_runs_in_the_caller_with_one_thread_or_one_item_or_inside_a_block(
        cpu_threads):
    me = threading.current_thread().name
    cpu_threads(1)
    assert threads_module.map_blocks(lambda b: threading.current_thread().name,
                                         [1, 2, 3]) == [me]
    cpu_threads(2)
    assert threads_module.map_blocks(lambda b: list(b), [7]) == [[7]]
    # a block that itself asks for blocks gets them inline, not a deadlock
    inner = threads_module.map_blocks(
        lambda b: threads_module.map_blocks(lambda c: list(c), list(b)), [1, 2, 3, 4])
    assert inner == [[[1, 2]], [[3, 4]]]


def test_a_failing_block_raises_in_the_caller_and_the_threads_go_on(cpu_threads):
    cpu_threads(2)

    def fn(block):
        if 3 in block:
            raise ValueError("block failed")
        return sum(block)
    with pytest.raises(ValueError, match="block failed"):
        threads_module.map_blocks(fn, [1, 2, 3, 4])
    assert threads_module.map_blocks(sum, [1, 2, 3, 4]) == [3, 7]


def test_the_blas_is_held_to_one_thread_inside_a_section_and_given_back_after(cpu_threads):
    cpu_threads(2)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if threads_module.blas_threads() != 2:
            pytest.skip("this BLAS cannot run 2 threads")
        seen = threads_module.map_blocks(lambda b: threads_module.blas_threads(), [1, 2])
        with threads_module.section():
            inside = threads_module.blas_threads()
        assert (seen, inside, threads_module.blas_threads()) == ([1, 1], 1, 2)
        assert threads_module.step_blas_threads() == 1
        cpu_threads(1)
        assert threads_module.step_blas_threads() == 2


def test_a_blas_loaded_after_the_first_section_is_held_too():
    """SciPy brings an OpenBLAS of its own; imported after gpucnn's first section,
    it must be held to one thread in the next (a fresh process: SciPy is loaded)."""
    pytest.importorskip("scipy.linalg")
    code = """if True:
        import threadpoolctl, gpucnn
        from gpucnn.backends.cpu import threads as threads_module
        gpucnn.set_num_threads(2)
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            with threads_module.section():
                pass
            import scipy.linalg  # noqa: F401
            with threads_module.section():
                print(threads_module.blas_threads())  # the most threads of any BLAS loaded
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"], out.stdout


def _grad_pass(seed, shape, kw):
    rng = numpy.random.default_rng(seed)
    N, C, H, W, K, R = shape
    x = rng.standard_normal((N, C, H, W)).astype(numpy.float32)
    w = rng.standard_normal((K, C // kw.get("groups", 1), R, R)).astype(numpy.float32)
    b = rng.standard_normal(K).astype(numpy.float32)
    y = F.conv2d(x, w, b, **kw)
    dy = rng.standard_normal(y.shape).astype(numpy.float32)
    return (y,) + F.conv2d_backward(dy, x, w, **kw)


CONVS = [((37, 16, 28, 28, 16, 3), dict(padding=1)),             # dx as a forward pass
         ((37, 3, 17, 19, 8, 3), dict(stride=2, padding=1)),     # dx tap by tap
         ((9, 32, 14, 14, 64, 3), dict(padding=2, dilation=2, groups=4)),
         ((200, 1, 28, 28, 16, 5), dict(padding=2)),             # NCHW columns
         ((3, 16, 7, 7, 32, 1), dict(stride=2))]


@pytest.mark.parametrize("shape, kw", CONVS)
def test_conv_passes_are_bitwise_the_same_on_any_thread_count(shape, kw, cpu_threads,
                                                                one_blas_thread):
    results = []
    for n in (1, 2, 3):
        cpu_threads(n)
        results.append(_grad_pass(0, shape, kw))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            numpy.testing.assert_array_equal(a, b)


BN_INPUTS = [(19, 24, 9, 7), (32, 3, 5, 5), (40, 5, 3, 3), (32, 16, 4, 4), (50, 3), (23, 6),
             "channels-last"]


@pytest.mark.parametrize("shape", BN_INPUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_and_relu_are_bitwise_the_same_on_any_thread_count(
        shape, training, affine, cpu_threads, rng):
    if shape == "channels-last":  # an NHWC array seen as NCHW
        x = rng.standard_normal((17, 6, 5, 12)).astype(numpy.float32).transpose(0, 3, 1, 2)
    else:
        x = rng.standard_normal(shape).astype(numpy.float32)
    C = x.shape[1]
    dy = rng.standard_normal(x.shape).astype(numpy.float32)
    w, b = (rng.standard_normal(C).astype(numpy.float32) for _ in range(2))
    results = []
    for n in (1, 2, 3, 16):  # 16 threads give 16 channels one each, but for the pairing
        cpu_threads(n)
        stats = [numpy.linspace(-1, 1, C, dtype=numpy.float32),
                 numpy.linspace(0.5, 2, C, dtype=numpy.float32)]
        y, saved = F.batch_norm(x, *stats, weight=w if affine else None,
                                bias=b if affine else None, training=training)
        grads = F.batch_norm_backward(dy, saved, weight=w if affine else None)
        relu = F.relu(y), F.relu_backward(dy, y)
        results.append([y, *stats, *(g for g in grads if g is not None), *relu])
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            numpy.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=2, stride=1, dilation=2, ceil_mode=True),
                                dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)])
def test_max_pool_is_bitwise_the_same_on_any_thread_count(kw, cpu_threads, rng):
    x = rng.standard_normal((9, 4, 11, 10)).astype(numpy.float32)
    x[3, 1, 2, 2] = numpy.nan  # a NaN in one thread's samples only
    x[5, 2] = -numpy.inf  # windows of -inf: their first cell inside
    x[7, 0, :4, :4] = 1.0  # ties: the first maximum wins, overlapping windows add
    results = []
    for n in (1, 2, 3, 16):
        cpu_threads(n)
        y, indices = F.max_pool2d(x, **kw)
        dy = numpy.arange(y.size, dtype=numpy.float32).reshape(y.shape) / 7
        dx = F.max_pool2d_backward(dy, indices, x.shape, **kw)
        results.append([y, indices, dx])
    assert numpy.isnan(results[0][0][3]).any() and (results[0][2][7] > 0).any()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            numpy.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("N, per_sample", [(128, 451584), (128, 225792), (128, 112896),
                                           (100, 300000), (7, 10 ** 9), (3, 1), (0, 8)])
def test_conv_chunks_are_even_and_a_multiple_of_four_so_threads_share_them_evenly(N, per_sample):
    chunks = cpu_conv._chunks(N, per_sample)
    assert [n for c in chunks for n in range(*c)] == list(range(N))  # in order, all, once
    sizes = [b - a for a, b in chunks]
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert not sizes or max(sizes) * per_sample <= max(cpu_conv.CHUNK_BYTES, per_sample)
    assert len(chunks) == N or len(chunks) % cpu_conv.CHUNK_ROUND == 0
    for threads in (2, 4):  # each thread's block of chunks holds as many samples, +-1
        if chunks and len(chunks) % threads == 0:
            work = [sum(b - a for a, b in block)
                    for block in threads_module._blocks(chunks, threads)]
            assert max(work) - min(work) <= 1, work


def test_backward_filter_holds_a_few_chunk_products_not_one_a_chunk(cpu_threads, rng):
    tracemalloc = pytest.importorskip("tracemalloc")
    cpu_threads(2)
    x = rng.standard_normal((48, 512, 8, 8)).astype(numpy.float32)
    w = rng.standard_normal((64, 512, 3, 3)).astype(numpy.float32)
    g = conv.geometry(x, w, None, 1, 1, 1, 1)
    dy = rng.standard_normal((48, 64, 8, 8)).astype(numpy.float32)
    saved = cpu_conv.im2col_source(x, g)
    assert len(cpu_conv._column_chunks(g, 4)) >= 12
    conv.backward_filter(dy, x, g, saved)  # the threads' buffers exist from here
    tracemalloc.start()
    try:
        conv.backward_filter(dy, x, g, saved)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    product = w.nbytes  # one chunk's (K, R*S*C) product
    assert peak < dy.nbytes + cpu_conv.CHUNK_BYTES + 6 * product, (peak, product)


def test_set_num_threads_inside_a_block_is_an_error_not_a_deadlock(cpu_threads):
    cpu_threads(2)
    with pytest.raises(RuntimeError, match="inside a block of gpucnn's own threads"):
        threads_module.map_blocks(lambda b: gpucnn.set_num_threads(1), [1, 2])


def _train(n, steps=3):
    gpucnn.set_num_threads(n)
    gpucnn.manual_seed(0)
    net = models.resnet()
    opt = gpucnn.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = numpy.random.default_rng(0)
    logits = []
    for _ in range(steps):
        x = rng.standard_normal((21, 1, 28, 28)).astype(numpy.float32)
        logits.append(gpucnn.train_step(net, opt, x, rng.integers(0, 10, 21))[1])
    return logits, net.state_dict()


def test_resnet_training_steps_are_bitwise_the_same_on_any_thread_count(cpu_threads,
                                                                          one_blas_thread):
    (l1, s1), (l2, s2) = _train(1), _train(2)
    for a, b in zip(l1, l2):
        numpy.testing.assert_array_equal(a, b)
    assert s1.keys() == s2.keys()
    for k in s1:
        numpy.testing.assert_array_equal(s1[k], s2[k], err_msg=k)


def _child(queue):
    queue.put(threads_module.map_blocks(sum, [1, 2, 3, 4]))


def test_a_forked_child_gets_threads_of_its_own(cpu_threads):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    cpu_threads(2)
    threads_module.map_blocks(sum, [1, 2])  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == [3, 7]
    child.join(timeout=60)
    assert child.exitcode == 0
