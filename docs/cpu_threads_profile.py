"""Wall time, CPU time and page faults of the resnet SGD step (batch 128), gpucnn's
and PyTorch's, with one thread or two each: the numbers of docs/benchmarks.md's
"The second core". Run from the repository root:

    python3 docs/cpu_threads_profile.py 1
    python3 docs/cpu_threads_profile.py 2
"""
import argparse
import resource
import statistics
import time

import numpy
import torch
from threadpoolctl import threadpool_limits

import gpucnn
from gpucnn.app import models
from gpucnn.tools.bench import torch_resnet


def measure(fn, repeat=10, warmup=2):
    """'median ms (CPU ms a step, page faults a step)' over `repeat` calls."""
    for _ in range(warmup):
        fn()
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / repeat
    faults = (after.ru_minflt - before.ru_minflt) / repeat
    return f"{statistics.median(times) * 1e3:.0f} ms (CPU {cpu * 1e3:.0f} ms, faults {faults:.0f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=int, choices=[1, 2])
    threads = parser.parse_args().threads
    gpucnn.manual_seed(0)
    net = models.resnet()
    opt = gpucnn.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((128, 1, 28, 28)).astype(numpy.float32)
    y = rng.integers(0, 10, 128)
    tnet = torch_resnet(torch)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                           weight_decay=5e-4)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def theirs():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tnet(tx), ty).backward()
        topt.step()
    torch.set_num_threads(threads)
    gpucnn.set_num_threads(threads)
    with threadpool_limits(threads, user_api="blas"):
        print(f"{threads} thread(s) each: gpucnn {measure(lambda: gpucnn.train_step(net, opt, x, y))}"
              f"; torch {measure(theirs)}")


if __name__ == "__main__":
    main()
