"""VGG19 CIFAR variant ("vgg19_c"): 16 convs with BN, global average pooling, one linear layer.

Widths ``[64,64,M,128,128,M,256x4,M,512x4,M,512x4]`` (docs/science.md section 5). A ``width`` multiplier
makes small variants for tests (``vgg_tiny``).
"""
import torch.nn as nn

from .inits import DefaultInit

CFG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512]


class VGG(DefaultInit, nn.Module):
    def __init__(self, cfg=CFG19, num_classes=100, in_channels=3, width=1.0):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                v = max(1, int(round(v * width)))
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg19_c(num_classes=100, in_channels=3, width=1.0):
    return VGG(CFG19, num_classes, in_channels, width)


def vgg_tiny(num_classes=10, in_channels=1):
    """A 4-conv VGG-style chain for fast CPU tests and the debug config."""
    return VGG([16, 16, "M", 32, 32], num_classes, in_channels)
