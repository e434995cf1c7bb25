"""Containers and the two reference models.

Their ``state_dict()`` keys and array layouts are those of the equivalent ``torch.nn``
definitions (see ``cnn/torch_twins.py``), so a checkpoint loads into PyTorch with
``strict=True``.
"""
from __future__ import annotations

from collections import OrderedDict

from cnn.checks import type_name
from cnn.layers import (BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear,
                        MaxPool2d, ReLU)
from cnn.module import Module, check_grad


def _check_layer(layer, name: str) -> Module:
    if not isinstance(layer, Module):
        hint = (" (unpack a list of layers: Sequential(*layers))" if isinstance(layer, (list, tuple))
                else " (torch.nn layers do not run here: use the engine's, cnn.layers)"
                if type(layer).__module__.startswith("torch") else "")
        raise TypeError(f"Sequential takes layers (Modules), got {type_name(layer)} as layer {name}{hint}")
    return layer


class Sequential(Module):
    """Runs its layers in order; children are named ``0``, ``1``, ... as in PyTorch, or
    after the keys of one ``OrderedDict`` of layers. A slot emptied with
    ``setattr(seq, "1", None)`` is skipped (PyTorch would keep it as None, in ``len`` and
    indexing, and fail in ``forward``)."""

    def __init__(self, *layers: Module):
        super().__init__()
        named = (layers[0].items() if len(layers) == 1 and isinstance(layers[0], OrderedDict)
                 else ((str(i), layer) for i, layer in enumerate(layers)))
        for name, layer in named:
            self.add_module(name, _check_layer(layer, name))

    def __getitem__(self, i: int | slice) -> Module:
        """The i-th layer; a slice is a Sequential of those layers (the same objects, under
        the same names, as in PyTorch)."""
        if not isinstance(i, slice):
            layers = list(self.children())
            if not -len(layers) <= i < len(layers):
                raise IndexError(f"index {i} is out of range: this Sequential has {len(layers)} layers")
            return layers[i]
        part = Sequential()
        for name, layer in list(self.named_children())[i]:
            setattr(part, name, layer)
        return part

    def __setitem__(self, i: int, layer: Module) -> None:
        """Replace the i-th layer, under its name (``model[-1] = Linear(256, 5)`` for a new head)."""
        name = [name for name, _ in self.named_children()][i]
        setattr(self, name, _check_layer(layer, name))

    def __delitem__(self, i: int | slice) -> None:
        """Remove the i-th layer (or a slice of them, ``del model[-1]`` for a headless
        model); the rest are renamed 0, 1, ... as PyTorch does, named layers too."""
        names = [name for name, _ in self.named_children()]
        gone = names[i] if isinstance(i, slice) else [names[i]]
        self._renumber([layer for name, layer in self.named_children() if name not in gone])

    def pop(self, i: int) -> Module:
        """Remove the i-th layer and return it."""
        layer = self[i]
        del self[i]
        return layer

    def insert(self, index: int, layer: Module) -> "Sequential":
        """Put a layer before position ``index``; the layers are renamed 0, 1, ... as in PyTorch."""
        layers = list(self.children())
        if not -len(layers) <= index <= len(layers):
            raise IndexError(f"index {index} is out of range for a Sequential of {len(layers)} layers")
        layers.insert(index, _check_layer(layer, str(index)))
        self._renumber(layers)
        return self

    def _renumber(self, layers: list[Module]) -> None:
        for name in list(self._modules):
            delattr(self, name)
        for k, layer in enumerate(layers):
            setattr(self, str(k), layer)

    def append(self, layer: Module) -> "Sequential":
        """Add a layer at the end, named after its position, as PyTorch."""
        name = str(len(self._modules))
        setattr(self, name, _check_layer(layer, name))
        return self

    def extend(self, layers) -> "Sequential":
        """``append`` each of ``layers`` (any iterable of layers, a Sequential too)."""
        for layer in list(layers):
            self.append(layer)
        return self

    def __len__(self) -> int:
        return len(list(self.children()))

    def forward(self, x):
        last = None
        for last in self.children():
            x = last.forward(x)
        if last is not None and hasattr(x, "dtype"):
            # Kept on the last layer, for backward's check: a slice of this model that ends
            # with it (model[2:]) then checks against the same, latest forward pass. (A
            # layer of cnn.layers has kept it already; a module of the user's may not have,
            # nor return one array.)
            last._output(x)
        return x

    def backward(self, grad_out):
        layers = list(self.named_children())
        if layers:
            check_grad(type(self).__name__, grad_out, layers[-1][1].__dict__.get("_output_like"))
        # As autograd, go back no further than the first layer with a parameter to train
        # when the input gradient is not wanted (the first layer's input_grad is False, as
        # in the reference models): training a head on a frozen backbone costs the head's.
        start = 0
        if layers and getattr(layers[0][1], "input_grad", True) is False:
            start = next((i for i, (_, layer) in enumerate(layers)
                          if any(p.requires_grad for p in layer.parameters())), len(layers))
        first = {}
        for name, layer in layers[start:]:
            if first.setdefault(id(layer), name) != name:
                raise ValueError(f"layers {first[id(layer)]} and {name} are the same {type(layer).__name__}: "
                                 "a module keeps one forward pass for backward, so one used twice "
                                 "cannot go back through both. Give each place a layer of its own")
        for _, layer in reversed(layers[start:]):
            grad_out = layer.backward(grad_out)
        for _, layer in layers[:start]:  # after: a layer shared with the part above kept its cache for it
            layer.clear_caches()  # the batch's activations, which no backward pass will take
            for p in layer.parameters():
                p.grad = None  # frozen: no gradient, not one of an earlier step for the optimizer to use
        return None if start else grad_out


class ResidualBlock(Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    x: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride). The shortcut is
    the identity, or a 1x1 convolution with ``stride`` plus batch norm when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = BatchNorm2d(out_channels)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.bn2 = BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Sequential(Conv2d(in_channels, out_channels, 1, stride=stride),
                                       BatchNorm2d(out_channels))
        else:
            self.shortcut = None
        self.relu2 = ReLU()

    def forward(self, x):
        out = self.relu1.forward(self.bn1.forward(self.conv1.forward(x)))
        out = self.bn2.forward(self.conv2.forward(out))
        out += x if self.shortcut is None else self.shortcut.forward(x)
        return self.relu2.forward(out)

    def backward(self, grad_out):
        g = self.relu2.backward(grad_out)  # flows into both branches
        dx = self.bn2.backward(g)
        dx = self.conv2.backward(dx)
        dx = self.bn1.backward(self.relu1.backward(dx))
        dx = self.conv1.backward(dx)
        dx += g if self.shortcut is None else self.shortcut.backward(g)
        return dx


def simple_cnn(num_classes: int = 10) -> Sequential:
    """SimpleCNN, 620,810 parameters: three [conv3x3 -> BN -> ReLU -> maxpool2] stages
    (3->32->64->128 channels), then Linear(2048, 256) -> ReLU -> Dropout(0.5) -> Linear(256, 10).
    x: (N, 3, 32, 32) -> logits (N, num_classes)."""
    layers = []
    for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
        layers += [Conv2d(c_in, c_out, 3, padding=1), BatchNorm2d(c_out), ReLU(), MaxPool2d(2)]
    layers += [Flatten(), Linear(128 * 4 * 4, 256), ReLU(), Dropout(0.5), Linear(256, num_classes)]
    model = Sequential(*layers)
    model[0].input_grad = False  # nothing upstream needs the image gradient
    return model


def small_resnet(num_classes: int = 10) -> Sequential:
    """SmallResNet, 175,818 parameters: conv3x3(3->16) -> BN -> ReLU, residual blocks
    16->16 x2, 16->32 (stride 2), 32->32, 32->64 (stride 2), 64->64, global average pool,
    Linear(64, 10). x: (N, 3, 32, 32) -> logits (N, num_classes)."""
    blocks = [ResidualBlock(16, 16), ResidualBlock(16, 16),
              ResidualBlock(16, 32, stride=2), ResidualBlock(32, 32),
              ResidualBlock(32, 64, stride=2), ResidualBlock(64, 64)]
    model = Sequential(Conv2d(3, 16, 3, padding=1), BatchNorm2d(16), ReLU(), *blocks,
                       GlobalAvgPool2d(), Flatten(), Linear(64, num_classes))
    model[0].input_grad = False
    return model


MODELS = {"simple": simple_cnn, "resnet": small_resnet}


def build_model(name: str) -> Sequential:
    """A reference model by its CLI name: ``simple`` or ``resnet``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]()
