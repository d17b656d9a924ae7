from .layers import AvgPool2D, Conv2D, Dropout, Flatten, Linear, MaxPool2D, ReLU
from .module import Module, Parameter, Sequential

__all__ = ["Module", "Parameter", "Sequential", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU",
           "Flatten", "Linear", "Dropout"]
