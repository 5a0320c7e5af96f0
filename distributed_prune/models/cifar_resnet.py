"""CIFAR ResNets (He et al. 2016, section 4.2): resnet20/32/56/110.

Three stages of 16/32/64 channels, BasicBlocks, option-A shortcut (stride-2 subsampling and
zero-padding of the new channels; parameter free). Module names follow torchvision
(``conv1``, ``layer1..3``, ``fc``) so ratio specs are written the same way for both families.
"""
import torch.nn as nn
import torch.nn.functional as F


class PadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::s, ::s] then zero-pad channels from ``in_c`` to ``out_c``."""

    def __init__(self, in_c, out_c, stride):
        super().__init__()
        self.in_c, self.out_c, self.stride = in_c, out_c, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_c - x.shape[1]
        lo = extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, extra - lo))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_c, out_c, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.shortcut = PadShortcut(in_c, out_c, stride) if (stride != 1 or in_c != out_c) else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth=56, num_classes=10, in_channels=3, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.init_weights()

    def init_weights(self):
        """The constructor's init: Kaiming-normal (fan_out, relu) convolutions; the other layers
        keep PyTorch's defaults. Fans come from the current shapes, so re-running it on a pruned
        instance initialises it as the small dense model it is."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _make(depth):
    def build(num_classes=10, in_channels=3):
        return CifarResNet(depth, num_classes, in_channels)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcut)."
    return build


resnet20, resnet32, resnet56, resnet110 = (_make(d) for d in (20, 32, 56, 110))
