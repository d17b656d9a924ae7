"""gpucnn: convolutional networks with hand-written backpropagation, on NumPy or CuPy.

The package is in three groups (docs/architecture.md): the library (this level,
``functional``, ``nn``, ``backends``), the training application (``gpucnn.app``:
``gpucnn train`` and friends) and developer tools (``gpucnn.tools``). The library
imports neither of the others; the application's public names (``load``,
``checkpoint``, ``train``) are reachable from here, imported on first use.
"""
import importlib

from . import backend, functional, init, onnx_export, schedules, step
from .augment import Augment
from .backend import as_array, from_dlpack, get_array_module
from .batches import batches
from .backends.cpu.threads import get_num_threads, set_num_threads
from .backends.precision import conv_precision, get_conv_precision, set_conv_precision
from .errors import UserError
from .interop import read_state_dict, save
from .nn import (AvgPool2D, BatchNorm2D, Conv2D, Dropout, Flatten, GlobalAvgPool2D, Identity,
                 Linear, MaxPool2D, Module, Parameter, ReLU, Residual, Sequential)
from .optim import SGD, Adam
from .random import manual_seed
from .schedules import CosineAnnealingLR, StepLR
from .step import train_step

__version__ = "0.1.0"
__all__ = ["backend", "checkpoint", "functional", "get_array_module", "Module", "Parameter",
           "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "Flatten", "Linear", "Dropout",
           "SGD", "Adam", "manual_seed", "load", "UserError", "step", "train_step", "BatchNorm2D",
           "Residual", "GlobalAvgPool2D", "Identity", "init", "schedules", "StepLR",
           "CosineAnnealingLR", "Augment", "get_num_threads", "set_num_threads", "from_dlpack",
           "as_array", "batches", "save", "read_state_dict", "onnx_export", "set_conv_precision",
           "get_conv_precision", "conv_precision"]

# The application's names at the top level: (module, attribute or None for the module).
_APPLICATION = {"load": ("gpucnn.app.inference", "load"), "checkpoint": ("gpucnn.app.checkpoint", None),
                "train": ("gpucnn.app.train", None)}


def __getattr__(name):
    if name not in _APPLICATION:
        raise AttributeError(f"module 'gpucnn' has no attribute {name!r}")
    module, attribute = _APPLICATION[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)
