"""The built-in networks. A user can pass any Sequential of their own instead."""
from .nn import Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sequential


def lenet(num_classes=10, in_channels=1):
    """LeNet-style net for 28x28 images (MNIST, Fashion-MNIST)."""
    return Sequential(
        Conv2D(in_channels, 32, 5, padding=2), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 5, padding=2), ReLU(), MaxPool2D(2),
        Flatten(), Linear(64 * 7 * 7, 128), ReLU(), Linear(128, num_classes))


def digits_net(num_classes=10, in_channels=1):
    """A small net for scikit-learn's 8x8 digits."""
    return Sequential(
        Conv2D(in_channels, 16, 3, padding=1), ReLU(), MaxPool2D(2),
        Conv2D(16, 32, 3, padding=1), ReLU(), MaxPool2D(2),
        Flatten(), Linear(32 * 2 * 2, 64), ReLU(), Linear(64, num_classes))


MODELS = {"lenet": lenet, "digits": digits_net}
