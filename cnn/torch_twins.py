"""The native ``torch.nn`` twins of the reference models, with autograd.

They are the oracle of the tests and the baseline of the benchmark, and define the
checkpoint interop contract: the engine's ``model.state_dict()`` (NumPy arrays), made
tensors, loads with ``strict=True`` (``torch_twin(name, state)`` does both).
The engine never uses them (only the tests and the benchmark, ``cnn/bench.py``, do):
its layers run on torch tensors through the backend, without ``torch.nn`` or autograd.
"""
from __future__ import annotations

import torch
from torch import nn


def simple_cnn_twin(num_classes: int = 10) -> nn.Sequential:
    layers = []
    for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                   nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(2048, 256), nn.ReLU(), nn.Dropout(0.5),
               nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def small_resnet_twin(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16), Block(16, 16), Block(16, 32, 2), Block(32, 32), Block(32, 64, 2),
        Block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


TWINS = {"simple": simple_cnn_twin, "resnet": small_resnet_twin}


def torch_twin(name: str, state_dict=None, num_classes: int | None = None) -> nn.Sequential:
    """The torch.nn twin of reference model ``name``, loaded from a state_dict if given;
    its head has ``num_classes`` outputs, by default as many as the state_dict's head (the
    last 2-d weight: both models end with a Linear), or 10."""
    if not isinstance(name, str):  # a model, as torch code passes one: say what to pass
        raise TypeError(f"torch_twin takes a reference model's name ({', '.join(map(repr, TWINS))}), "
                        f"got a {type(name).__name__}: for a model in hand, "
                        "torch_twin(name, model.state_dict())")
    if name not in TWINS:
        raise ValueError(f"no torch.nn twin of model {name!r}: choose one of {', '.join(TWINS)}")
    if num_classes is None:
        heads = [v for k, v in (state_dict or {}).items() if k.endswith("weight") and len(v.shape) == 2]
        num_classes = heads[-1].shape[0] if heads else 10
    model = TWINS[name](num_classes)
    if state_dict is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
    return model
