"""Host side of a LeNet training step on the CuPy stand-in: device operations
(each a kernel launch or copy in CuPy), RawModule launches, synchronisations and
host microseconds per step (wall time minus the emulated kernels' time).

    python3 tests/standin/host_overhead.py [--tree DIR] [--batch 2] [--steps 20]

--tree runs another checkout of gpucnn (e.g. an older commit, from git archive);
its training loop is timed as train() runs it: before gpucnn.step existed, the
loop body of that time (softmax with its label check, float(loss) every step).
"""
import argparse
import pathlib
import statistics
import sys
import time

import numpy

HERE = pathlib.Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tree", default=str(HERE.parent.parent))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    sys.path[:0] = [args.tree, str(HERE.parent)]
    import standin
    sys.modules["cupy"] = standin  # the way CuPy itself is found: no seam needed
    import gpucnn
    from gpucnn import backend, functional as F
    from gpucnn.app import models
    assert backend.resolve_device("cuda")[0] == "cuda"
    gpucnn.manual_seed(0)
    net = models.lenet().to("cuda")
    opt = gpucnn.SGD(net.parameters(), lr=0.01, momentum=0.9)
    rng = numpy.random.default_rng(0)
    x = standin.asarray(rng.standard_normal((args.batch, 1, 28, 28)).astype(numpy.float32))
    y = standin.asarray(rng.integers(0, 10, args.batch))
    try:
        from gpucnn.step import train_step
        from gpucnn.app.train import _DeviceSums
        sums = _DeviceSums(standin, 0.0, 0)

        def step(i):
            loss, logits = train_step(net, opt, x, y)
            sums.add(loss, logits, y, i + 1)
            if sums.full():  # as train() does: one read every READ_EVERY steps
                sums.read(0, pathlib.Path("none"), 0.01)
        kind = "train_step + device-side sums (this tree)"
    except ImportError:
        state = {"loss_sum": 0.0, "correct": 0}

        def step(i):  # gpucnn/train.py's loop body before gpucnn.step
            opt.zero_grad()
            logits = net.forward(x)
            loss, dlogits = F.softmax_cross_entropy(logits, y)
            value = float(loss)
            net.backward(dlogits, need_input_grad=False)
            opt.step()
            state["loss_sum"] += value * len(y)
            state["correct"] = state["correct"] + (logits.argmax(axis=1) == y).sum()
        kind = "the loop body of train.py (older tree)"
    step(0)  # kernels compile, buffers appear
    host, ops, launches, syncs = [], [], [], []
    for i in range(1, args.steps + 1):
        c = dict(standin._counts)
        t0 = time.perf_counter()
        step(i)
        wall = time.perf_counter() - t0
        host.append((wall - (standin._counts["kernel_s"] - c["kernel_s"])) * 1e6)
        ops.append(standin._counts["ops"] - c["ops"])
        launches.append(standin._counts["launches"] - c["launches"])
        syncs.append(standin._counts["syncs"] - c["syncs"])
    print(f"{kind}: LeNet batch {args.batch}, median of {args.steps} steps: "
          f"{statistics.median(ops):.0f} device ops ({statistics.median(launches):.0f} RawModule "
          f"launches), {statistics.median(syncs):.0f} syncs, "
          f"{statistics.median(host):.0f} us host time per step")


if __name__ == "__main__":
    main()
