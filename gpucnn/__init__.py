"""gpucnn: convolutional networks with hand-written backpropagation, on NumPy or CuPy."""
from . import backend, checkpoint, functional
from .backend import get_array_module
from .errors import UserError
from .inference import load
from .nn import (AvgPool2D, Conv2D, Dropout, Flatten, Linear, MaxPool2D, Module, Parameter, ReLU,
                 Sequential)
from .optim import SGD, Adam
from .random import manual_seed
from . import step
from .step import train_step

__version__ = "0.1.0"
__all__ = ["backend", "checkpoint", "functional", "get_array_module", "Module", "Parameter",
           "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "Flatten", "Linear", "Dropout",
           "SGD", "Adam", "manual_seed", "load", "UserError", "step", "train_step"]
