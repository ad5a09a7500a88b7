"""Small conv-BN-ReLU stacks for CPU demos and tests, registered by name."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdcache.models.registry import _init_weights, register_model


# ---------------------------------------------------------------------------------------------
# Small conv-BN-ReLU stacks for CPU demos (e.g. 8x8 digits upscaled to 32x32).
# Stage names match the ResNets (conv1, layer1..3, fc), so one feature-KD setting such as
# `layer3` works for any teacher/student pair here. The stem has stride 2: digits are 8x8 images
# upsampled to 32x32, and full-resolution stages made these nets 4x slower on CPU for nothing.
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """3x3 conv, BN, ReLU: [B, cin, H, W] -> [B, cout, H/stride, W/stride]."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()


class SmallCNN(nn.Module):
    """Plain CNN of base width w: [B, in_chans, H, W] -> logits [B, num_classes].

    conv1 [B, w, H/2, W/2] -> layer1 [B, 2w, H/2, W/2] -> layer2 [B, 4w, H/4, W/4]
    -> layer3 [B, 8w, H/8, W/8] -> avgpool -> fc.
    """

    def __init__(self, width: int, *, num_classes: int, in_chans: int = 3):
        super().__init__()
        self.conv1 = ConvBNReLU(in_chans, width, stride=2)
        self.layer1 = ConvBNReLU(width, 2 * width)
        self.layer2 = ConvBNReLU(2 * width, 4 * width, stride=2)
        self.layer3 = ConvBNReLU(4 * width, 8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def cnn_tiny(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Conv-BN-ReLU stack, widths 4/8/16/32 (about 7k parameters for 10 classes)."""
    return SmallCNN(4, num_classes=num_classes, in_chans=in_chans)


@register_model
def cnn_small(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Conv-BN-ReLU stack, widths 8/16/32/64 (about 25k parameters for 10 classes)."""
    return SmallCNN(8, num_classes=num_classes, in_chans=in_chans)


@register_model
def cnn_medium(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Conv-BN-ReLU stack, widths 16/32/64/128 (about 100k parameters for 10 classes)."""
    return SmallCNN(16, num_classes=num_classes, in_chans=in_chans)
