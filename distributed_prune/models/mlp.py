"""MLP-7 of the paper: 7 linear layers of width 100 (identity or ReLU activations)."""
import torch.nn as nn

from .inits import DefaultInit


class MLP(DefaultInit, nn.Module):
    """``depth`` linear layers; hidden width ``width``; input is flattened (N, in_features)."""

    def __init__(self, in_features=64, width=100, depth=7, num_classes=10, activation="linear"):
        super().__init__()
        dims = [in_features] + [width] * (depth - 1) + [num_classes]
        act = {"linear": nn.Identity, "relu": nn.ReLU}[activation]
        layers = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(act())
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.activation = activation

    def forward(self, x):
        return self.features(x)


def mlp_7_linear(num_classes=10, in_features=64, width=100):
    return MLP(in_features, width, 7, num_classes, "linear")


def mlp_7_relu(num_classes=10, in_features=64, width=100):
    return MLP(in_features, width, 7, num_classes, "relu")
