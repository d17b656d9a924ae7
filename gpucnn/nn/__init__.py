from .batchnorm import BatchNorm2D
from .layers import (AvgPool2D, Conv2D, Dropout, Flatten, GlobalAvgPool2D, Identity, Linear,
                     MaxPool2D, ReLU)
from .module import Buffer, Module, Parameter, Sequential
from .residual import Residual

__all__ = ["Module", "Parameter", "Buffer", "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D",
           "ReLU", "Flatten", "Linear", "Dropout", "BatchNorm2D", "Residual", "GlobalAvgPool2D",
           "Identity"]
