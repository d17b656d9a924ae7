from .batchnorm import BatchNorm2D
from .conv import Conv2D
from .layers import Dropout, Flatten, GlobalAvgPool2D, Identity, Linear, ReLU
from .pool import AvgPool2D, MaxPool2D
from .module import Buffer, Module, Parameter, Sequential
from .residual import Residual

__all__ = ["Module", "Parameter", "Buffer", "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D",
           "ReLU", "Flatten", "Linear", "Dropout", "BatchNorm2D", "Residual", "GlobalAvgPool2D",
           "Identity"]
