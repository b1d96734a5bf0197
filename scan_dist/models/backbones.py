"""Backbones: a small CNN for 28x28 images on CPU, and torchvision ResNets (CIFAR/STL stems, ResNet-50).

Every backbone maps images [B, C, S, S] to features [B, out_dim] and carries `out_dim`; `feature_map` gives the
last convolutional map [B, out_dim, h, w] before the global average pool (for `mine.layer=grid`).
"""
from __future__ import annotations

import torch
from torch import nn
import torchvision

from ..errors import ConfigError


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Five 3x3 conv layers in three resolutions, global average pool: cheap enough for SimCLR on 2 CPU cores."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[:-2](x)  # all but the global pool and flatten


class _TorchvisionResNet(nn.Module):
    def __init__(self, net: nn.Module, out_dim: int):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


def _small_image_stem(net: nn.Module, in_channels: int, maxpool: bool) -> None:
    """The paper's CIFAR stem (3x3 stride-1 conv, no max-pool); the STL variant keeps a 2x2 stride-2 max-pool."""
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.MaxPool2d(2, stride=2, padding=1) if maxpool else nn.Identity()


def build_backbone(name: str, in_channels: int, width: int = 32) -> nn.Module:
    if name == "cnn_small":
        return SmallCNN(in_channels, width)
    if name in ("resnet18_cifar", "resnet18_stl"):
        net = torchvision.models.resnet18(weights=None)
        _small_image_stem(net, in_channels, maxpool=name == "resnet18_stl")
        return _TorchvisionResNet(net, 512)
    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return _TorchvisionResNet(net, 2048)
    raise ConfigError(f"model.backbone {name!r} is unknown; choose cnn_small, resnet18_cifar, resnet18_stl or resnet50")
