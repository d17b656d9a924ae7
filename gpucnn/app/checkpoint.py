"""Checkpoints: one .npz with the weights, the optimizer state and a JSON
record of everything else (epoch, step, RNG state, configuration, history).
Written to a temporary file and renamed, so a crash never loses the last good one.
Arrays are stored on the host, so a checkpoint loads on either device."""
import json
import os
import zipfile

import numpy

from .. import backend
from ..errors import UserError


class CheckpointError(UserError, ValueError):
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
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; pass the checkpoint.npz file in it") from None
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError,
            UnicodeDecodeError) as e:
        # NumPy's own message for a non-archive suggests allow_pickle, which
        # would run code from the file: say what is wrong instead.
        why = ("not a .npz archive" if not _is_zip(path) else
               "no gpucnn record in the archive" if isinstance(e, KeyError) else
               "it holds Python objects, which gpucnn never writes" if "pickle" in str(e) else
               "its record is not valid JSON" if isinstance(e, (ValueError, UnicodeDecodeError))
               else f"the archive is damaged or truncated: {e}")
        raise CheckpointError(f"{path} is not a readable gpucnn checkpoint ({why}); pass a "
                              "checkpoint.npz written by gpucnn train") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a readable gpucnn checkpoint (its record is not "
                              "a JSON object)")
    return meta, model_state, optim


def _is_zip(path):
    """Whether a file starts like a zip archive (.npz), even a damaged one."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def restore(path, model, optimizer=None, content=None):
    """Load a checkpoint into a model (and optimizer); returns its meta record.
    content: what read(path) returned, where it was read already (by rank 0 of a
    distributed run, which sends it to the others)."""
    meta, model_state, optim = read(path) if content is None else content
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
    try:
        model.load_state_dict(model_state)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} cannot be loaded: {e}") from None
    if meta.get("model_rng") is not None:
        model.load_random_state(meta["model_rng"])
    return meta
