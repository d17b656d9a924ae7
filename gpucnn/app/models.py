"""The built-in networks, each registered once in MODELS as a ModelSpec: its
builder, the image shape it is built for and the training recipe it needs. A
user can pass any Sequential of their own to training instead."""
import dataclasses
import types

from ..errors import ConfigError
from ..nn import (BatchNorm2D, Conv2D, Flatten, GlobalAvgPool2D, Linear, MaxPool2D, ReLU, Residual,
                 Sequential)


def _pooled_twice(image_size, model):
    """(H, W) after two 2x2 max pools (the convs before them keep the size); an
    image too small to leave one pixel is refused."""
    H, W = (int(v) for v in image_size)
    if H < 4 or W < 4:
        raise ConfigError(f"model {model} needs images of at least 4x4 pixels (two 2x2 max "
                          f"pools), got {H}x{W}")
    return H // 4, W // 4


def lenet(num_classes=10, in_channels=1, image_size=(28, 28)):
    """LeNet-style net, for 28x28 images (MNIST, Fashion-MNIST) by default; its first
    Linear takes what the two pools leave of image_size (H, W)."""
    H, W = _pooled_twice(image_size, "lenet")
    return Sequential(
        Conv2D(in_channels, 32, 5, padding=2), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 5, padding=2), ReLU(), MaxPool2D(2),
        Flatten(), Linear(64 * H * W, 128), ReLU(), Linear(128, num_classes))


def digits_net(num_classes=10, in_channels=1, image_size=(8, 8)):
    """A small net, for scikit-learn's 8x8 digits by default; its first Linear takes
    what the two pools leave of image_size (H, W)."""
    H, W = _pooled_twice(image_size, "digits")
    return Sequential(
        Conv2D(in_channels, 16, 3, padding=1), ReLU(), MaxPool2D(2),
        Conv2D(16, 32, 3, padding=1), ReLU(), MaxPool2D(2),
        Flatten(), Linear(32 * H * W, 64), ReLU(), Linear(64, num_classes))


def basic_block(in_channels, out_channels, stride=1):
    """ResNet's basic block: conv3x3-BN-ReLU-conv3x3-BN plus the identity (or a 1x1
    strided conv + BN where the shape changes), then ReLU. Kaiming-normal convs."""
    body = Sequential(
        Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias=False,
               init="kaiming_normal"),
        BatchNorm2D(out_channels), ReLU(),
        Conv2D(out_channels, out_channels, 3, padding=1, bias=False, init="kaiming_normal"),
        BatchNorm2D(out_channels))
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = Sequential(Conv2D(in_channels, out_channels, 1, stride=stride, bias=False,
                                     init="kaiming_normal"), BatchNorm2D(out_channels))
    return Sequential(Residual(body, shortcut), ReLU())


def resnet(num_classes=10, in_channels=1, widths=(16, 32, 64), image_size=(28, 28)):
    """A small ResNet for 28x28 images: stem conv3x3 (no bias) + BN + ReLU, one
    basic block per stage at widths 16, 32, 64 (28, 14, 7 pixels), global average
    pool, Linear(64, classes); any image_size gives the same layers (the pool takes
    what the stages leave). Convs Kaiming-normal (fan_out, ReLU), BN weight 1 and
    bias 0, the Linear PyTorch's default: torchvision's ResNet initialisation."""
    layers = [Conv2D(in_channels, widths[0], 3, padding=1, bias=False, init="kaiming_normal"),
              BatchNorm2D(widths[0]), ReLU()]
    prev = widths[0]
    for i, width in enumerate(widths):
        layers.append(basic_block(prev, width, stride=1 if i == 0 else 2))
        prev = width
    layers += [GlobalAvgPool2D(), Linear(prev, num_classes)]
    return Sequential(*layers)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A built-in network: ``build(num_classes, input_shape=(C, H, W))`` makes a fresh
    one for images of that shape (its weights drawn from gpucnn's seeded generator);
    input_shape is the (C, H, W) it is built for by default (in_channels alone
    changes only C); recipe holds the training settings it needs
    unless the user sets them (they override the dataset's defaults)."""
    name: str
    builder: object
    input_shape: tuple
    help: str
    recipe: types.MappingProxyType

    def build(self, num_classes=10, in_channels=None, input_shape=None):
        C, H, W = (int(v) for v in (input_shape or self.input_shape))
        if in_channels is not None:
            C = int(in_channels)
        return self.builder(num_classes=num_classes, in_channels=C, image_size=(H, W))


def _spec(name, builder, input_shape, help, **recipe):
    return ModelSpec(name, builder, tuple(input_shape), help, types.MappingProxyType(recipe))


MODELS = {spec.name: spec for spec in (  # in the order --help lists them
    _spec("digits", digits_net, (1, 8, 8), "two 3x3 convs with max pooling for 8x8 images"),
    _spec("lenet", lenet, (1, 28, 28), "LeNet-style, two 5x5 convs with max pooling and two "
          "linear layers"),
    # A BN ResNet trains with SGD, Nesterov momentum, a cosine schedule, weight decay
    # and augmentation (docs/benchmarks.md compares this recipe with PyTorch's). On
    # a dataset whose images change class when mirrored crop+flip becomes crop.
    _spec("resnet", resnet, (1, 28, 28), "a small ResNet (three basic blocks, batch norm) "
          "trained with its own recipe", epochs=10, batch_size=128, optimizer="sgd", lr=0.1,
          momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
          augment="crop+flip"),
)}
