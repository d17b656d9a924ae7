"""Checkpoints: one .npz with the weights, the optimizer state and a JSON
record of everything else (epoch, step, RNG state, configuration, history).
Written to a temporary file and renamed, so a crash never loses the last good one.
Arrays are stored on the host, so a checkpoint loads on either device."""
import json
import os
import zipfile

import numpy

from . import backend


class CheckpointError(ValueError):
    """A checkpoint is damaged or does not fit the model it is loaded into."""


def save(path, model, optimizer, meta):
    arrays = {f"model/{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars = []
    for i, st in enumerate(opt_state["state"]):
        scalars.append({k: v for k, v in st.items() if not hasattr(v, "shape")})
        for k, v in st.items():
            if hasattr(v, "shape"):
                arrays[f"optim/{i}/{k}"] = backend.to_numpy(v)
    # the random layers' state (Dropout), unless the caller took it at a step boundary
    meta = dict(meta, model_rng=meta.get("model_rng", model.random_state()))
    record = dict(meta, optimizer=dict(type=type(optimizer).__name__, steps=opt_state["steps"],
                                       hyper=opt_state["hyper"], scalars=scalars),
                  params={k: list(v.shape) for k, v in model.state_dict().items()})
    arrays["meta"] = numpy.frombuffer(json.dumps(record).encode(), dtype=numpy.uint8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path):
    """(meta, model_state, optimizer_arrays) from a checkpoint, all on the host."""
    try:
        with numpy.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            model_state = {k[len("model/"):]: z[k] for k in z.files if k.startswith("model/")}
            optim = {k[len("optim/"):]: z[k] for k in z.files if k.startswith("optim/")}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError,
            UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable gpucnn checkpoint "
                              f"(damaged or another kind of file): {e}") from None
    return meta, model_state, optim


def restore(path, model, optimizer=None):
    """Load a checkpoint into a model (and optimizer); returns its meta record."""
    meta, model_state, optim = read(path)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in model_state.items()}
    if own != theirs:
        raise CheckpointError(f"{path} was written for another model: it holds parameters "
                              f"{theirs}, this model has {own}")
    if optimizer is not None:
        info = meta["optimizer"]
        if info["type"] != type(optimizer).__name__:
            raise CheckpointError(f"{path} holds {info['type']} state, but the optimizer is "
                                  f"{type(optimizer).__name__}")
        state = [dict(s) for s in info["scalars"]]
        for key, value in optim.items():
            i, name = key.split("/", 1)
            state[int(i)][name] = value
        optimizer.load_state_dict(dict(steps=info["steps"], hyper=info["hyper"], state=state))
    model.load_state_dict(model_state)
    if meta.get("model_rng") is not None:
        model.load_random_state(meta["model_rng"])
    return meta
