"""A convolutional neural network engine written by hand: every forward and backward pass."""
from cnn.backend import backend_of, get_backend, manual_seed
from cnn.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d,
                        Linear, MaxPool2d, ReLU)
from cnn.models import ResidualBlock, Sequential, build_model, simple_cnn, small_resnet
from cnn.module import Module, Parameter

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "GlobalAvgPool2d",
           "Linear", "MaxPool2d", "Module", "Parameter", "ReLU", "ResidualBlock", "Sequential",
           "backend_of", "build_model", "get_backend", "manual_seed", "simple_cnn",
           "small_resnet"]
