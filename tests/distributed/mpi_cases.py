"""The cases the distributed tests run under ``mpiexec -n R``, and the models, data and
single-process references they are compared against.

    PYTHONPATH=.:tests mpiexec -n 2 python tests/distributed/mpi_cases.py OUT case [case ...]

Each rank runs each case and writes OUT/<case>.rank<r>.npz (the arrays the test
compares), or OUT/<case>.rank<r>.error (the traceback) where the case raised;
tests/distributed/test_distributed_mpi.py launches this and reads them back. Importable too:
the tests build the same models, data and single-process references from here.
"""
import os
import sys
import time
import traceback

import numpy

import gpucnn
from gpucnn import distributed as dist
from gpucnn import nn

N_TRAIN, BATCH, STEPS, SEED = 80, 4, 20, 7  # 2 ranks x 4 = global batch 8: 10 steps an epoch


def data(n=N_TRAIN, seed=5, size=10, dtype=numpy.float64):
    rng = numpy.random.default_rng(seed)
    return rng.standard_normal((n, 1, size, size)).astype(dtype), rng.integers(0, 10, n)


def lenet(dtype=numpy.float64, seed=100, bn=False):
    """A small LeNet-like network (with BatchNorm2D after each conv where bn)."""
    gpucnn.manual_seed(seed)
    norm = (lambda c: [nn.BatchNorm2D(c)]) if bn else (lambda c: [])
    layers = ([nn.Conv2D(1, 4, 3)] + norm(4) + [nn.ReLU(), nn.MaxPool2D(2), nn.Conv2D(4, 6, 3)]
              + norm(6) + [nn.ReLU(), nn.Flatten(), nn.Linear(24, 10)])
    return nn.Sequential(*layers).to(dtype=dtype)


def mlp(dtype=numpy.float64, seed=100):
    """Input BatchNorm2D then two Linear layers: no RawModule kernel, so it runs fast on
    the CuPy stand-in."""
    gpucnn.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm2D(1), nn.Flatten(), nn.Linear(100, 16), nn.ReLU(),
                         nn.Linear(16, 10)).to(dtype=dtype)


def batches(rank, size, batch, steps, n=N_TRAIN, seed=SEED):
    """The index batches rank `rank` of `size` trains on for `steps` steps: each epoch a
    permutation drawn from one generator seeded with seed, sharded by dist.shard."""
    rng, out = numpy.random.default_rng(seed), []
    while len(out) < steps:
        mine = dist.shard(rng.permutation(n), rank, size, batch)
        out += [mine[t * batch:(t + 1) * batch] for t in range(len(mine) // batch)]
    return out[:steps]


def train(model, x, y, index_batches, reducer=None, device="cpu"):
    """SGD with momentum over the batches; returns the losses (floats)."""
    opt = gpucnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for idx in index_batches:
        xb, yb = (gpucnn.backend.to_device(a[idx], device) for a in (x, y))
        loss, _ = gpucnn.train_step(model, opt, xb, yb, reducer=reducer)
        losses.append(float(gpucnn.backend.to_numpy(loss)))
    return numpy.array(losses)


def reference(make, size, batch=BATCH, steps=STEPS, dtype=numpy.float64):
    """One process trained on the global batches of size*batch: (state, losses)."""
    x, y = data(dtype=dtype)
    model = make()
    losses = train(model, x, y, batches(0, 1, size * batch, steps))
    return _state(model), losses


def _state(model):
    return {k: gpucnn.backend.to_numpy(v).copy() for k, v in model.state_dict().items()}


def _prefixed(prefix, d):
    return {f"{prefix}{k}": v for k, v in d.items()}


# --- the cases: each returns {name: array} for this rank ----------------------------------

def case_host(world):
    agree = world.agree_later(world.rank + 5)
    out = {"sum_int": world.allreduce_host(world.rank + 1),
           "max_float": world.allreduce_host(0.5 * world.rank, "max"),
           "min_array": world.allreduce_host(numpy.array([world.rank, -world.rank]), "min"),
           "bcast": world.bcast_host({"rank": world.rank, "text": "x" * 1000}, root=1)["rank"],
           "gathered": numpy.array(world.allgather_host(("r", world.rank)))[:, 1].astype(int),
           "differing": numpy.array(dist.differing_ranks(world, world.rank % 2) + [-1])}
    world.barrier()
    out["agreed"] = agree.result()
    out["local"] = numpy.array([world.local_rank, world.local_size, world.device_index(1)])
    return out


def _equivalence(world, dtype, bucket_bytes=dist.DEFAULT_BUCKET_BYTES, make=lenet, **kw):
    x, y = data(dtype=dtype)
    model = make(dtype=dtype, seed=100 + world.rank, **kw)  # unlike starts: broadcast fixes
    comm = dist.communicator_for(world, numpy)
    dist.broadcast_state(model, comm)
    if kw.get("bn"):
        dist.convert_sync_batchnorm(model, world)
    reducer = dist.GradientReducer(model, comm, bucket_bytes)
    losses = train(model, x, y, batches(world.rank, world.size, BATCH, STEPS), reducer)
    t = reducer.timings
    return {**_prefixed("state.", _state(model)), "losses": losses,
            "buckets": numpy.array([b.numel for b in reducer.buckets]),
            "started_in_backward": t["started_in_backward"], "steps": t["steps"],
            "order": numpy.array([name for b in reducer.buckets for name, _ in b.params])}


def case_equivalence64(world):
    return _equivalence(world, numpy.float64)


def case_equivalence32(world):
    return _equivalence(world, numpy.float32)


def case_buckets(world):
    return _equivalence(world, numpy.float64, bucket_bytes=200)


def case_syncbn_training(world):
    return _equivalence(world, numpy.float64, bn=True)


def syncbn_data(seed=3):
    """A global batch of 6 (N, C, H, W) inputs and output gradients, and the rows each
    of 2 ranks holds: 2 and 4 (unequal, so the global count matters)."""
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((6, 3, 4, 5)) * 3 + 1
    dy = rng.standard_normal((6, 3, 4, 5))
    return x, dy, [slice(0, 2), slice(2, 6)]


def case_syncbn_functional(world):
    x, dy, rows = syncbn_data()
    mine = rows[world.rank]
    comm = dist.communicator_for(world, numpy)
    rm, rv = numpy.full(3, 0.5), numpy.full(3, 2.0)
    w, b = numpy.array([1.5, -0.5, 2.0]), numpy.array([0.1, 0.2, -0.3])
    y, saved = gpucnn.functional.batch_norm(x[mine], rm, rv, w, b, training=True, momentum=0.1,
                                            eps=1e-5, sync=comm)
    dx, dw, db = gpucnn.functional.batch_norm_backward(dy[mine], saved, w)
    return {"y": y, "dx": dx, "dw": dw, "db": db, "rm": rm, "rv": rv}


def case_broadcast(world):
    x, y = data()
    model = lenet(seed=100 + world.rank, bn=True)
    train(model, x, y, batches(world.rank, world.size, BATCH, 1))  # buffers differ too
    before = dist.state_digest(model)
    dist.broadcast_state(model, world)
    after = dist.state_digest(model)
    return {"before": before, "after": after, **_prefixed("state.", _state(model))}


def case_average(world):
    x, y = data(dtype=numpy.float32)
    model = lenet(bn=True, dtype=numpy.float32)
    train(model, x, y, batches(world.rank, world.size, BATCH, 2))  # no reducer: stats differ
    model[1].running_mean[...] = 0.25  # the same on every rank
    before = {k: b.data.copy() for k, b in model.named_buffers()}
    dist.average_buffers(model, world)
    after = {k: b.data.copy() for k, b in model.named_buffers()}
    return {**_prefixed("before.", before), **_prefixed("after.", after)}


def case_nccl(world):
    """The GPU path on the CuPy and NCCL stand-ins: NCCL communicator, broadcast,
    sync-BN and the bucketed all-reduce, with no device->host sync in a step."""
    import standin
    from standin import nccl
    gpucnn.backend.set_cupy_module(standin)
    dist.set_nccl_module(nccl)
    x, y = data()
    model = mlp(seed=100 + world.rank).to("cuda")
    comm = dist.communicator_for(world, standin)
    dist.broadcast_state(model, comm)
    dist.convert_sync_batchnorm(model, world)
    reducer = dist.GradientReducer(model, comm, bucket_bytes=700)
    opt = gpucnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    syncs, losses = [], []
    for idx in batches(world.rank, world.size, BATCH, 6):
        xb, yb = standin.asarray(x[idx]), standin.asarray(y[idx])
        with standin.count_syncs() as n:
            loss, _ = gpucnn.train_step(model, opt, xb, yb, reducer=reducer)
            syncs.append(n())
        losses.append(float(loss))
    streams = {c[4] for c in nccl.calls if c[0] == "allReduce"}
    return {**_prefixed("state.", _state(model)), "losses": numpy.array(losses),
            "syncs": numpy.array(syncs), "kind": type(comm).__name__,
            "allreduce_streams_nonnull": all(s != 0 for s in streams) and len(streams) == 1,
            "calls": numpy.array([c[0] for c in nccl.calls]),
            "buckets": len(reducer.buckets)}


def case_uneven(world):
    """3 ranks: training shards, an evaluation split unevenly, and a few steps."""
    order = numpy.random.default_rng(1).permutation(20)
    train_shard = dist.shard(order, world.rank, world.size, 2)
    x, y = data(n=10, seed=9)
    model = lenet(seed=100)
    part = dist.shard_eval(len(y), world.rank, world.size)
    logits = model.eval().forward(x[part])
    loss, _ = gpucnn.functional.softmax_cross_entropy(logits, y[part]) if len(y[part]) else (0, 0)
    correct = world.allreduce_host(int((logits.argmax(axis=1) == y[part]).sum()))
    loss_sum = world.allreduce_host(float(loss) * len(y[part]))
    model.train()
    x, y = data()
    reducer = dist.GradientReducer(model, dist.communicator_for(world, numpy))
    losses = train(model, x, y, batches(world.rank, world.size, 2, 3), reducer)
    return {"shard": train_shard, "part": numpy.array([part.start, part.stop]),
            "correct": correct, "loss_sum": loss_sum, "losses": losses,
            **_prefixed("state.", _state(model))}


def case_average3(world):
    model = lenet(bn=True)
    bn = model[1]
    bn.running_mean[...] = 0.1  # equal everywhere: kept bit for bit (3 * 0.1 / 3 is not 0.1)
    bn.running_var[...] = world.rank + 0.1
    dist.average_buffers(model, world)
    return {"mean": bn.running_mean.copy(), "var": bn.running_var.copy()}


def case_timeout_rank1(world):
    """Rank 1 stops answering; rank 0 waits in a barrier with a 1 s timeout."""
    world = dist.get_world(timeout=1.0)
    if world.rank == 1:
        time.sleep(30)
    world.barrier()
    return {}


def case_timeout_rank0(world):
    world = dist.get_world(timeout=1.0)
    if world.rank == 0:
        time.sleep(30)
    world.allreduce_host(1)
    return {}


def case_busy_rank0(world):
    """Rank 0 is busy in work of its own (writing files, say) past rank 1's 1 s timeout."""
    world = dist.get_world(timeout=1.0)
    if world.rank == 0:
        with world.busy("writing the checkpoint"):
            time.sleep(30)
    world.allreduce_host(1)
    return {}


def main(out, cases):
    gpucnn.set_num_threads(1)
    world = dist.get_world(timeout=float(os.environ.get("GPUCNN_TEST_TIMEOUT", "60")))
    for case in cases:
        base = os.path.join(out, f"{case}.rank{world.rank}")
        try:
            result = globals()[f"case_{case}"](world)
        except Exception:  # noqa: BLE001  (recorded for the test to show; next case)
            with open(base + ".error", "w") as f:
                f.write(traceback.format_exc())
            continue
        numpy.savez(base + ".npz", **{k: numpy.asarray(v) for k, v in result.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
