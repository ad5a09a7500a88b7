"""CIFAR ResNets and WideResNets, as the papers and CRD's code define them, registered by name."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcache.models.registry import _init_weights, register_model


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (CRD, "Contrastive Representation Distillation", Tian et al. 2020; torchdistill)
# Attribute names follow CRD's resnet.py so its released teacher state dicts load unchanged.
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: [B, inplanes, H, W] -> [B, planes, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            # CRD's option B shortcut: 1x1 conv + BN (not the zero-padding option A of He et al.)
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        # F.relu, not self.relu: a hook on `layerK.i.relu` then sees one call, the inner activation;
        # the block's output is the block itself (`layerK.i`).
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: [B, in_chans, H, W] (H, W >= 8) -> logits [B, num_classes].

    Stages: conv1 [B, w0, H, W] -> layer1 [B, w1, H, W] -> layer2 [B, w2, H/2, W/2]
    -> layer3 [B, w3, H/4, W/4] -> avgpool -> fc.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], *, num_classes: int, in_chans: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"CIFAR ResNet depth must be 6n+2, got {depth}"
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        # Adaptive, where CRD has AvgPool2d(8): the same weights then serve any input size >= 8.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, widths, num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(depth, widths, num_classes=num_classes, in_chans=in_chans)


_W1 = (16, 16, 32, 64)  # the original CIFAR ResNet widths (He et al. 2016)
_W4 = (32, 64, 128, 256)  # CRD's "x4" teacher widths


@register_model
def resnet8(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-8 (widths 16/32/64, 1 block per stage)."""
    return _cifar_resnet(8, _W1, num_classes, in_chans)


@register_model
def resnet14(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-14 (widths 16/32/64, 2 blocks per stage)."""
    return _cifar_resnet(14, _W1, num_classes, in_chans)


@register_model
def resnet20(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (widths 16/32/64, 3 blocks per stage)."""
    return _cifar_resnet(20, _W1, num_classes, in_chans)


@register_model
def resnet32(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-32 (widths 16/32/64, 5 blocks per stage)."""
    return _cifar_resnet(32, _W1, num_classes, in_chans)


@register_model
def resnet44(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-44 (widths 16/32/64, 7 blocks per stage)."""
    return _cifar_resnet(44, _W1, num_classes, in_chans)


@register_model
def resnet56(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-56 (widths 16/32/64, 9 blocks per stage)."""
    return _cifar_resnet(56, _W1, num_classes, in_chans)


@register_model
def resnet110(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-110 (widths 16/32/64, 18 blocks per stage)."""
    return _cifar_resnet(110, _W1, num_classes, in_chans)


@register_model
def resnet8x4(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CRD ResNet-8x4 (stem 32, widths 64/128/256, 1 block per stage)."""
    return _cifar_resnet(8, _W4, num_classes, in_chans)


@register_model
def resnet32x4(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CRD ResNet-32x4 (stem 32, widths 64/128/256, 5 blocks per stage): the usual CIFAR-100 teacher."""
    return _cifar_resnet(32, _W4, num_classes, in_chans)


# ---------------------------------------------------------------------------------------------
# WideResNets (Zagoruyko & Komodakis 2016), as in CRD's wrn.py: pre-activation blocks.
# Names keep CRD's `block1.layer.0.conv1` / `convShortcut` so its state dicts load unchanged.
# ---------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: [B, in_planes, H, W] -> [B, out_planes, H/stride, W/stride]."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # As in the reference: the identity shortcut takes x, the projection takes the activated x.
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One WRN stage, its blocks in `.layer` (CRD's naming)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: [B, in_chans, H, W] (H, W >= 8) -> logits [B, num_classes].

    conv1 [B, 16, H, W] -> block1 [B, 16k, H, W] -> block2 [B, 32k, H/2, W/2]
    -> block3 [B, 64k, H/4, W/4] -> bn1, relu -> avgpool -> fc.
    """

    def __init__(
        self, depth: int, widen_factor: int, *, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0
    ):
        super().__init__()
        assert (depth - 4) % 6 == 0, f"WideResNet depth must be 6n+4, got {depth}"
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, ch[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)  # CRD's wrn init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def wrn_16_1(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-1 (widths 16/32/64, 2 blocks per stage)."""
    return WideResNet(16, 1, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model
def wrn_16_2(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-2 (widths 32/64/128, 2 blocks per stage)."""
    return WideResNet(16, 2, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model
def wrn_40_1(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-1 (widths 16/32/64, 6 blocks per stage)."""
    return WideResNet(40, 1, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model
def wrn_40_2(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-2 (widths 32/64/128, 6 blocks per stage): CRD's usual WRN teacher."""
    return WideResNet(40, 2, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
