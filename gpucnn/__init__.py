"""gpucnn: convolutional networks with hand-written backpropagation, on NumPy or CuPy."""
from . import backend, checkpoint, functional, init, schedules
from .augment import Augment
from .backend import get_array_module
from .cpu_threads import get_num_threads, set_num_threads
from .errors import UserError
from .inference import load
from .nn import (AvgPool2D, BatchNorm2D, Conv2D, Dropout, Flatten, GlobalAvgPool2D, Identity,
                 Linear, MaxPool2D, Module, Parameter, ReLU, Residual, Sequential)
from .optim import SGD, Adam
from .random import manual_seed
from .schedules import CosineAnnealingLR, StepLR
from . import step
from .step import train_step

__version__ = "0.1.0"
__all__ = ["backend", "checkpoint", "functional", "get_array_module", "Module", "Parameter",
           "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "Flatten", "Linear", "Dropout",
           "SGD", "Adam", "manual_seed", "load", "UserError", "step", "train_step", "BatchNorm2D",
           "Residual", "GlobalAvgPool2D", "Identity", "init", "schedules", "StepLR",
           "CosineAnnealingLR", "Augment", "get_num_threads", "set_num_threads"]
