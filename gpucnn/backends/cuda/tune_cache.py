"""The tile configurations `gpucnn tune` chose, per GPU: their keys, where they are
kept (JSON in the user's cache directory), reading and storing them.

The launchers (conv.ConvLaunchers.config_for) read a GPU's choices once; the
tuning itself (timing every configuration) is gpucnn.tools.tune. A new tuning
changes the choice, and so the rounding, of later runs only.
"""
import json
import os
import pathlib
import tempfile

import numpy


def cache_path():
    """$XDG_CACHE_HOME/gpucnn/tune.json, else ~/.cache/gpucnn/tune.json."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "gpucnn" / "tune.json"


def entry_key(pass_, g, dtype, precision="fp32"):
    """The key of one tuned choice within a GPU's entries, e.g.
    'forward N64 C1 H28 W28 K32 R5 S5 stride1x1 pad2,2,2,2 dil1x1 g1 float32'
    (FP32), with ' tf32' or ' 3xtf32' appended for the tensor-core precisions."""
    return (f"{pass_} N{g.N} C{g.C} H{g.H} W{g.W} K{g.K} R{g.R} S{g.S} "
            f"stride{g.sh}x{g.sw} pad{g.pt},{g.pb},{g.pl},{g.pr} dil{g.dh}x{g.dw} "
            f"g{g.groups} {numpy.dtype(dtype).name}" + ("" if precision == "fp32" else
                                                        f" {precision}"))


def load(path=None):
    """{GPU name: {entry_key: configuration}} as stored; {} where the file is
    missing or unreadable (nothing tuned yet)."""
    try:
        data = json.loads(pathlib.Path(path or cache_path()).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def choices_for(device_name, path=None, known=None):
    """{entry_key: configuration} tuned for the GPU named device_name; known: the
    configuration names to keep (any where None)."""
    entries = load(path).get(device_name, {})
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items()
            if isinstance(v, str) and (known is None or v in known)}


def save(device_name, chosen, path=None):
    """Add the choices {entry_key: configuration} to a GPU's entries, keeping the other
    GPUs' and its other shapes'. Written atomically: a reader sees the old file or
    the new one, never half."""
    path = pathlib.Path(path or cache_path())
    data = load(path)
    data.setdefault(device_name, {}).update(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
