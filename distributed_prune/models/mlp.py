"""MLP-7 of the paper: 7 linear layers of width 100 (identity or ReLU activations)."""
import torch.nn as nn


class MLP(nn.Module):
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

    def init_weights(self):
        """The constructor's init: PyTorch's default of every layer (``reset_parameters``), at
        the current shapes. The constructor does not call it: its layers were just drawn by
        that same rule, and a second draw would only shift the RNG stream of every seeded run."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()

    def forward(self, x):
        return self.features(x)


def mlp_7_linear(num_classes=10, in_features=64, width=100):
    return MLP(in_features, width, 7, num_classes, "linear")


def mlp_7_relu(num_classes=10, in_features=64, width=100):
    return MLP(in_features, width, 7, num_classes, "relu")
