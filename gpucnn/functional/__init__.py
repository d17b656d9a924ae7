"""Stateless forward and backward functions; the math of every layer lives here once."""
from .basic import (global_avg_pool2d, global_avg_pool2d_backward, linear, linear_backward, relu,
                    relu_backward, softmax_cross_entropy)
from .batchnorm import batch_norm, batch_norm_backward
from .conv import conv2d, conv2d_backward
from .pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward

__all__ = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d",
           "avg_pool2d_backward", "relu", "relu_backward", "linear", "linear_backward",
           "softmax_cross_entropy", "batch_norm", "batch_norm_backward", "global_avg_pool2d",
           "global_avg_pool2d_backward"]
