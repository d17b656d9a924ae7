"""State-dict files that PyTorch and gpucnn both read: gpucnn.save and read_state_dict.

gpucnn's state-dict names are PyTorch's, so a model's weights move between the two
as a plain ``{name: tensor}`` file. ``save(model, path)`` writes one with
``torch.save`` where PyTorch is installed (``torch.load(path)`` and
``torch_model.load_state_dict`` read it), and a NumPy ``.npz`` archive (under the
name given) where it is not. ``read_state_dict(path)`` reads either, and gpucnn's
own training checkpoints (their model part); a torch file is read with
``torch.load(weights_only=True)``, which runs none of the file's code.
"""
import os
import zipfile

import numpy

from . import backend
from .errors import UserError

__all__ = ["save", "read_state_dict", "StateFileError"]


class StateFileError(UserError, ValueError):
    """A state-dict file cannot be read (missing, not a state dict, or needs PyTorch)."""


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _state_of(model):
    if callable(getattr(model, "state_dict", None)):  # a gpucnn Module
        return model.state_dict()
    if hasattr(model, "keys") and hasattr(model, "__getitem__"):
        return {name: backend.as_array(model[name]) for name in model.keys()}
    raise TypeError(f"model must be a gpucnn Module or a state dict (name -> array), got "
                    f"{type(model).__name__}")


def _check_path(path, name="path"):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    return os.fspath(path)


def save(model, path):
    """Write model's state dict (or a state dict itself) to path, on the host: with
    torch.save where PyTorch is installed, else as a NumPy .npz archive (at exactly
    path). Written to a temporary file first, so that path is never half-written.
    Returns path; Module.load_state_dict(path) and read_state_dict read it back."""
    arrays = {name: numpy.array(backend.to_numpy(a)) for name, a in _state_of(model).items()}
    torch = _torch()

    def write(f):
        if torch is not None:
            torch.save({name: torch.from_numpy(a) for name, a in arrays.items()}, f)
        else:
            numpy.savez(f, **arrays)
    write_atomically(path, write, StateFileError)
    return path


def write_atomically(path, write, error):
    """write(f) into a temporary file beside path, then rename it to path, so that
    path is never half-written. A folder that does not exist or cannot be written
    is error (a UserError) naming path."""
    target = _check_path(path)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise error(f"cannot write {target}: its folder {folder} does not exist or is not "
                    "writable")
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except OSError as e:
        raise error(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _zip_names(path):
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        return None


def _read_torch(path, torch):
    if torch is None:
        raise StateFileError(f"{path} was written by torch.save; reading it needs PyTorch "
                             "(pip install torch), or save it with gpucnn.save where PyTorch "
                             "is not installed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a bad file
        raise StateFileError(f"{path} could not be read by torch.load(weights_only=True): "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(hasattr(v, "__dlpack__") for v in state.values()):
        raise StateFileError(f"{path} holds a {type(state).__name__}, not a state dict of "
                             "name -> tensor; save model.state_dict() itself")
    return dict(state)


def _starts_as_a_pickle(path):
    """Whether the file starts as a pickle (protocol 2 and up: torch.save's legacy
    format); its zip format is recognised by _zip_names."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_state_dict(path):
    """{name: array} from a file of gpucnn.save, torch.save (a state dict) or a
    gpucnn training checkpoint (its model's arrays). NumPy arrays on the host."""
    path = _check_path(path)
    if not os.path.isfile(path):
        raise StateFileError(f"state-dict file {path} does not exist (or is not a file)")
    names = _zip_names(path)
    if names is None and not _starts_as_a_pickle(path):
        raise StateFileError(f"{path} is neither a torch.save file nor a NumPy archive "
                             "(.npz); pass a file written by gpucnn.save or torch.save")
    if names is None or any(n.endswith("data.pkl") for n in names):  # torch's formats
        return {k: numpy.array(backend.as_array(v)) for k, v in
                _read_torch(path, _torch()).items()}
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as e:
        raise StateFileError(f"{path} is neither a torch.save file nor a NumPy archive: "
                             f"{e}") from None
    if "meta" in arrays and any(k.startswith("model/") for k in arrays):  # a checkpoint
        arrays = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    return arrays
