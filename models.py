"""Model zoo for projkd: the CIFAR zoo (VGG, ResNet (CIFAR and ResNet50), WideResNet, MobileNetV2,
ShuffleNet V1/V2) and the paper's ImageNet architectures (torchvision's ResNet-18/34/50 and
DenseNet-201, MobileNet v1).

The CIFAR models reproduce RepDistiller's CIFAR zoo (github.com/HobbitLong/RepDistiller, models/):
the same state_dict key names, order, shapes and forward computation, so its teacher checkpoints
(`<arch>_vanilla/ckpt_epoch_240.pth`, `torch.load(...)['model']`) load unchanged with
`load_state_dict(..., strict=True)`. Each architecture also uses RepDistiller's own weight
initialisation, so training from scratch reproduces the published accuracies.

Every model follows one interface that projkd.py relies on:
- forward(x) returns logits only;
- the classifier is the last nn.Linear in module order, and its input is the pooled penultimate
  feature;
- `map_layer` names the submodule whose output is the last stage's activation map (the tap used by
  similarity-preserving KD), for `model.get_submodule(model.map_layer)`.

Global pooling is a mean over H and W. On 32x32 inputs this equals RepDistiller's fixed-size
avg_pool2d (up to float rounding), and unlike it, it also works on other input sizes.

The ImageNet architectures are the names in IMAGENET_ARCHS; every other key of MODELS is a CIFAR
(32x32) one. TORCHVISION_WEIGHTS names the published torchvision ImageNet file of each pretrained
teacher. At the end, the weights of this zoo in the formats they are published in (ours,
RepDistiller's, mdistiller's, torchvision's): read_state_dict, frozen_model, load_teacher (a teacher
checkpoint, or one line saying where to get it); their errors are WeightsError, which projkd's CLI
prints as one line. Getting those files is fetch.py's work.

This file imports no other file of projkd: copy it with projkd.py, or alone for the architectures.
"""
import contextlib
import difflib
import hashlib
import logging
import os
import re
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# shared building blocks

def conv_bn(cin, cout, kernel_size=1, stride=1, groups=1, bias=False, relu=False):
    """Conv -> BN (-> ReLU) as a list of layers, so callers can splice them into one flat
    nn.Sequential and keep RepDistiller's integer key names (block0.0, block0.1, conv.3, ...)."""
    layers = [nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias),
              nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


def projection(cin, cout, stride):
    """1x1 conv + BN shortcut where the residual changes shape, identity otherwise (no keys, like
    RepDistiller's `None` / empty nn.Sequential)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


def stage(block, cin, cout, n, stride):
    """n blocks; the first one changes width and resolution."""
    return nn.Sequential(block(cin, cout, stride), *(block(cout, cout, 1) for _ in range(n - 1)))


def channel_shuffle(x, groups):
    # [N, C, H, W] -> [N, g, C/g, H, W] -> swap the two channel axes -> [N, C, H, W]
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def init_weights(model, linear_std=None, zero_linear_bias=False):
    """RepDistiller's He init: convs ~ N(0, 2 / (k*k*out_channels)) (kaiming_normal_, fan_out) with
    zero bias. BatchNorm's PyTorch default (weight 1, bias 0) is what RepDistiller sets explicitly.
    The Linear is left at the PyTorch default unless asked otherwise, because that differs between
    RepDistiller's files."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias:
                nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# VGG with BatchNorm (RepDistiller's vgg*_bn): five conv blocks, no FC layers but the classifier

VGG_CFGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    map_layer = "block4"

    def __init__(self, cfg, num_classes=100):
        super().__init__()
        # RepDistiller drops each block's final ReLU from the Sequential and applies it in forward.
        # Keeping it in the block changes no key (it is last and has no parameters) and makes
        # block4's output the map.
        def block(cin, widths):
            layers = []
            for w in widths:
                layers += conv_bn(cin, w, 3, bias=True, relu=True)
                cin = w
            return nn.Sequential(*layers)

        cins = [3] + [widths[-1] for widths in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = map(block, cins, cfg)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x):
        x = self.pool(self.block0(x))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        # no pooling between block3 and block4 on CIFAR: both run at 4x4
        x = self.block4(self.block3(x))
        return self.classifier(x.mean((2, 3)))


# -----------------------------------------------------------------------------
# ResNets: RepDistiller's CIFAR resnet.py (resnet8..110, resnet8x4/32x4) and resnetv2.py (ResNet50)

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = projection(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class ResNet(nn.Module):
    """CIFAR ResNet, depth 6n+2, three stages at 32, 16 and 8 pixels."""
    map_layer = "layer3"

    def __init__(self, depth, widths, num_classes=100):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = stage(BasicBlock, widths[0], widths[1], n, 1)
        self.layer2 = stage(BasicBlock, widths[1], widths[2], n, 2)
        self.layer3 = stage(BasicBlock, widths[2], widths[3], n, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # resnetv2.py calls it `shortcut`, resnet.py `downsample`
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    """ImageNet-width bottleneck ResNet with a 3x3 stride-1 stem and no max-pool, four stages down
    to 4x4. RepDistiller's zero_init_residual flag defaults to False and its ResNet50 never sets it,
    so it is omitted."""
    map_layer = "layer4"

    def __init__(self, num_classes=100, depths=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = stage(Bottleneck, 64, 256, depths[0], 1)
        self.layer2 = stage(Bottleneck, 256, 512, depths[1], 2)
        self.layer3 = stage(Bottleneck, 512, 1024, depths[2], 2)
        self.layer4 = stage(Bottleneck, 1024, 2048, depths[3], 2)
        self.linear = nn.Linear(2048, num_classes)
        init_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(x.mean((2, 3)))


# -----------------------------------------------------------------------------
# Wide ResNet (pre-activation blocks), depth 6n+4

class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # a projection shortcut takes the pre-activated input, an identity shortcut the raw one
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return shortcut + out


class WideResNet(nn.Module):
    # the map is block3's raw output: the final bn1 + ReLU belong to the head, as in RepDistiller's
    # features
    map_layer = "block3"

    def __init__(self, depth, widen, num_classes=100):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        # RepDistiller wraps each stage in a module whose only child is `layer`, hence keys
        # "block1.layer.0..."
        self.block1, self.block2, self.block3 = (
            nn.Sequential(OrderedDict(
                layer=stage(WideBlock, w[i], w[i + 1], n, 1 if i == 0 else 2)))
            for i in range(3))
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        init_weights(self, zero_linear_bias=True)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.relu(self.bn1(x)).mean((2, 3)))


# -----------------------------------------------------------------------------
# MobileNetV2 (RepDistiller's mobile_half: expansion 6, width 0.5)

class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        # the expansion conv is kept even when expand == 1, as in RepDistiller (keys conv.0 ...
        # conv.7)
        self.conv = nn.Sequential(*conv_bn(cin, mid, relu=True),
                                  *conv_bn(mid, mid, 3, stride, groups=mid, relu=True),
                                  *conv_bn(mid, cout))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # the last inverted-residual stage (linear bottleneck output, not ReLU'd)
    map_layer = "blocks.6"
    # expansion, width, blocks, stride
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=100, width=0.5):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*conv_bn(3, cin, 3, 2, relu=True))
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTINGS:
            block = partial(InvertedResidual, expand=t)
            self.blocks.append(stage(block, cin, int(c * width), n, s))
            cin = int(c * width)
        last = max(1280, int(1280 * width))  # the head never shrinks below 1280 channels
        self.conv2 = nn.Sequential(*conv_bn(cin, last, relu=True))
        # a Sequential: the key is classifier.0
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.conv2(x).mean((2, 3)))


# -----------------------------------------------------------------------------
# ShuffleNet V1 (groups 3) and V2 (1x). RepDistiller leaves both at PyTorch's default init.

class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.stride = stride
        branch = cout - cin if stride == 2 else cout  # stride-2 units concatenate the pooled input
        mid = branch // 4
        # no grouped 1x1 conv on the 24-channel stem output (as in the paper and RepDistiller)
        self.groups1 = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    map_layer = "layer3"

    def __init__(self, num_classes=100, widths=(240, 480, 960), depths=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)  # 1x1 stem, no downsampling on CIFAR
        self.bn1 = nn.BatchNorm2d(24)
        unit = partial(ShuffleUnit, groups=groups)
        self.layer1 = stage(unit, 24, widths[0], depths[0], 2)
        self.layer2 = stage(unit, widths[0], widths[1], depths[1], 2)
        self.layer3 = stage(unit, widths[1], widths[2], depths[2], 2)
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


class SplitUnit(nn.Module):
    """V2 basic unit: half the channels pass through, the other half go through the branch."""

    def __init__(self, channels):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownUnit(nn.Module):
    """V2 stride-2 unit: two branches on the full input, each giving half the output channels."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)  # left branch
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)  # right branch
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    map_layer = "layer3"  # before the 1x1 head conv2

    def __init__(self, num_classes=100, widths=(116, 232, 464, 1024), depths=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        # each stage is a DownUnit followed by `depth` SplitUnits (depth + 1 units in all)
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(DownUnit(cin, cout), *(SplitUnit(cout) for _ in range(n)))
            for cin, cout, n in zip((24,) + widths[:2], widths[:3], depths))
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean((2, 3)))


# -----------------------------------------------------------------------------
# ImageNet (224x224): torchvision's ResNets and DenseNet-201 unchanged, so their published files
# load as they are; MobileNet v1, which torchvision lacks, in the layout of the PEFD authors'
# ImageNet code.

def torchvision_model(name, map_layer, num_classes=1000):
    """torchvision's own model, untouched, with the instance attribute `map_layer` set."""
    # here, not at the top: importing it adds seconds to the start of every CIFAR run
    import torchvision
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    model.map_layer = map_layer
    return model


# DenseNet.forward is `F.relu(self.features(x), inplace=True)`, then pooling, and `features` ends
# with norm5, so a hook on features.norm5 sees the pre-ReLU map. There is no ReLU module to hook,
# but the ReLU runs in place on the very tensor the hook kept: by the time forward returns,
# Taps.feature_map is relu(norm5), with the ReLU in its autograd history, which is the map PEFD's
# code reads (f1 = relu(features)) and the one pooled into the feature.
DENSENET_MAP_LAYER = "features.norm5"


def depthwise_separable(cin, cout, stride):
    """3x3 depthwise conv-BN-ReLU then 1x1 pointwise conv-BN-ReLU, flat: keys 0, 1 (depthwise) and
    3, 4 (pointwise)."""
    return nn.Sequential(*conv_bn(cin, cin, 3, stride, groups=cin, relu=True),
                         *conv_bn(cin, cout, relu=True))


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al. 2017), width 1.0: 4,231,976 parameters with 1000 classes.

    Same state_dict as the MobileNet of the PEFD authors' ImageNet code (github.com/chenyd7/PEFD,
    models/MobileNet.py, taken from SRRL's github.com/jingyang2017/KD_SRRL): `model1` holds the stem
    and the blocks down to stride 16 (model1.0 ... model1.11), `model2` the two 1024-wide blocks at
    stride 32 (model2.0, model2.1), then `fc`. mdistiller (megvii-research/mdistiller,
    mdistiller/models/imagenet/mobilenetv1.py) keeps the same tensors in one flat Sequential: its
    `model.{i}` is our `model1.{i}` for i < 12 and `model2.{i - 12}` after, `fc` is `fc`. Both leave
    PyTorch's default init, and so does this. Their AvgPool2d(7) is a mean over H, W at 224x224.
    """
    map_layer = "model2"  # the ReLU'd 1024-channel last stage (7x7 at 224), PEFD's `fea`
    # (width, stride) of the 13 depthwise-separable blocks; the last two form model2
    BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
              (1024, 2), (1024, 1)]

    def __init__(self, num_classes=1000):
        super().__init__()
        cins = [32] + [w for w, _ in self.BLOCKS[:-1]]
        blocks = [depthwise_separable(cin, w, s) for cin, (w, s) in zip(cins, self.BLOCKS)]
        self.model1 = nn.Sequential(nn.Sequential(*conv_bn(3, 32, 3, 2, relu=True)), *blocks[:-2])
        self.model2 = nn.Sequential(*blocks[-2:])
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(self.model2(self.model1(x)).mean((2, 3)))


# -----------------------------------------------------------------------------
# architecture name (RepDistiller's model_dict names, torchvision's for ImageNet) ->
# constructor(num_classes=...)

_CIFAR_WIDTHS, _X4_WIDTHS = (16, 16, 32, 64), (32, 64, 128, 256)

MODELS = {
    **{f"vgg{d}": partial(VGG, VGG_CFGS[d]) for d in VGG_CFGS},
    **{f"resnet{d}": partial(ResNet, d, _CIFAR_WIDTHS) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(ResNet, 8, _X4_WIDTHS),
    "resnet32x4": partial(ResNet, 32, _X4_WIDTHS),
    "ResNet50": ResNet50,
    **{f"wrn_{d}_{w}": partial(WideResNet, d, w) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
    # ImageNet (constructor(num_classes=1000)); torchvision's names, which no CIFAR name collides
    # with
    # (their map: layer4, the ReLU'd block output)
    **{f"resnet{d}": partial(torchvision_model, f"resnet{d}", "layer4") for d in (18, 34, 50)},
    "densenet201": partial(torchvision_model, "densenet201", DENSENET_MAP_LAYER),
    "mobilenet_v1": MobileNetV1,
}

# every other key is CIFAR
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet201", "mobilenet_v1")

# arch -> (file, url) of torchvision's IMAGENET1K_V1 weights (top-1 by torchvision: 69.758, 73.314,
# 76.13, 76.896), the paper's teachers. Plain state_dicts, but the densenet file (2017) has
# old-style keys (denselayer1.norm.1.weight for norm1.weight; torchvision's _load_state_dict renames
# them) and no num_batches_tracked entries.
TORCHVISION_WEIGHTS = {arch: (file, "https://download.pytorch.org/models/" + file)
                       for arch, file in (
    ("resnet18", "resnet18-f37072fd.pth"),
    ("resnet34", "resnet34-b627a593.pth"),
    ("resnet50", "resnet50-0676ba61.pth"),
    ("densenet201", "densenet201-c1103571.pth"),
)}


# -----------------------------------------------------------------------------
# timm architectures by name: `timm:NAME` (e.g. timm:resnet18, timm:convnext_tiny.fb_in1k), built by
# timm.create_model, imported only when such a name is used. build_model gives a zoo or a timm model
# the interface above: timm's classifier is the final nn.Linear (checked), and `map_layer` is the
# submodule whose output is the map forward_features returns, or None where that is no C x H x W map
# (a ViT's tokens).

TIMM_PREFIX = "timm:"


class ModelError(Exception):
    """An architecture that cannot be built, or weights that cannot be read or do not fit it;
    projkd's CLI prints it as one line."""


def is_timm(arch):
    return arch.startswith(TIMM_PREFIX)


def import_timm(arch):
    try:
        import timm
    except ImportError:
        raise ModelError(f"{arch} needs timm, which is not installed: pip install timm "
                         f"(requirements-dev.txt names the version tested)") from None
    return timm


def check_timm_name(arch):
    """One line with timm's close matches when `arch` names no timm model."""
    timm = import_timm(arch)
    name = arch[len(TIMM_PREFIX):]
    if timm.is_model(name):
        return
    base = name.split(".")[0]
    stem = re.match(r"[a-z]*", base).group()  # resnet in resnet19, convnext in convnext_tinyy
    pool = timm.list_models(f"*{stem}*") if stem else []
    close = difflib.get_close_matches(base, pool or timm.list_models(), n=5, cutoff=0.5)
    hint = "none is close"
    if close:
        hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}"
    raise ModelError(f"timm has no model {name!r} ({hint}; timm.list_models('*{stem}*') lists "
                     f"them)")


def timm_model(arch, num_classes, image_size=None, pretrained=False):
    """timm.create_model for `timm:NAME`, at image_size for the models built for one size (ViTs),
    with timm's pretrained weights of NAME when asked (a new head where num_classes differs from
    theirs)."""
    timm = import_timm(arch)
    check_timm_name(arch)
    name = arch[len(TIMM_PREFIX):]
    # offline, the hub says each retry of each file: here, one line says it
    hub_log = logging.getLogger("huggingface_hub")
    hub_level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                      img_size=image_size)
        except TypeError as e:  # a model that takes any size has no img_size argument
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:  # a bad tag, or a download that failed: offline, a proxy, no weights
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not pretrained or "pretrained tag" in reason:
            raise ModelError(f"timm cannot build {name} ({reason})") from None
        raise ModelError(f"timm's pretrained weights for {name} could not be loaded ({reason}); "
                         f"where you are online, save them (docs/your-own.md) and pass the file as "
                         f"--weights FILE") from None
    finally:
        hub_log.setLevel(hub_level)
    image_size = image_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    find_map_layer(model, arch, image_size)
    return model


def classifier_name(model):
    """The name of the model's final nn.Linear, as in its state_dict keys."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


def find_map_layer(model, arch, image_size):
    """One image through the model, in eval mode and without gradients (nothing of it changes):
    checks that it takes image_size pixels and that its logits are its final nn.Linear of its pooled
    feature, then sets model.map_layer to the outermost submodule that returns forward_features' map
    (None for tokens)."""
    outputs, feature = {}, []

    def keep(module, args, output, name):
        outputs.setdefault(name, output)
    hooks = [m.register_forward_hook(partial(keep, name=name))
             for name, m in model.named_modules() if name]
    classifier = model.get_submodule(classifier_name(model))
    hooks.append(classifier.register_forward_pre_hook(lambda module, args: feature.append(args[0])))
    was_training = model.training
    x = torch.zeros(1, 3, image_size, image_size)
    try:
        with torch.no_grad():
            features = model.eval().forward_features(x)
            logits = model(x)  # (its outputs come second: `outputs` keeps the first of each module)
    except (RuntimeError, AssertionError, ValueError) as e:  # timm's size checks are asserts
        raise ModelError(f"{arch} cannot take {image_size} x {image_size} images "
                         f"({str(e).splitlines()[0]}); pass another --image-size") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not torch.allclose(classifier(feature[-1]), logits, atol=1e-5):
        raise ModelError(f"{arch}'s output is not its final nn.Linear ({classifier_name(model)}) "
                         f"of its pooled feature, which projkd needs (a distilled or multi-head "
                         f"model?)")
    model.map_shape = tuple(features.shape[1:])
    model.map_layer = None
    if features.dim() == 4:
        # the same tensor object: the module computed forward_features' result (or passed it on)
        same = [name for name, output in outputs.items() if output is features]
        model.map_layer = min(same, key=lambda name: name.count("."), default=None)


def require_map_layer(model, arch):
    """The map_layer of a model for --method sp, or one line saying it has no last-stage map."""
    if getattr(model, "map_layer", None) is None:
        shape = getattr(model, "map_shape", ())
        what = " x ".join(map(str, shape))
        if len(shape) == 2:
            what = f"{shape[0]} tokens of width {shape[1]}"
        raise ModelError(f"{arch} has no last-stage C x H x W map for --method sp (its "
                         f"forward_features give {what}); use --method pefd, kd or crd")
    return model.map_layer


def build_model(arch, num_classes, image_size=None, pretrained=False):
    """A zoo model (MODELS[arch]) or a timm one (`timm:NAME`), with num_classes classes. pretrained:
    timm's weights for NAME; the zoo's own pretrained teachers are files (load_teacher)."""
    if is_timm(arch):
        return timm_model(arch, num_classes, image_size, pretrained)
    if pretrained:
        raise ModelError(f"--pretrained takes timm's weights, for timm: architectures; start "
                         f"{arch} from a file with --weights FILE")
    return MODELS[arch](num_classes=num_classes)


# -----------------------------------------------------------------------------
# weights: the files this zoo loads, in the formats they are published in (ours, RepDistiller's,
# mdistiller's, torchvision's), always with torch.load(weights_only=True)


class WeightsError(ModelError):
    """A weight file that cannot be read, or does not fit its architecture; projkd's CLI prints it
    as one line."""


def load_checkpoint_file(path, what):
    """torch.load(path, weights_only=True), with one clear line for a file that is not a safe
    checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        why = "truncated, or not a PyTorch file"
        if "weights only" in str(e).lower():
            why = ("it holds Python objects besides tensors and plain containers, which a safe "
                   "load refuses")
        raise WeightsError(f"{what} {path} is not a readable PyTorch checkpoint ({why})") from None


# torchvision's published DenseNet files predate its module names: 'denselayer1.norm.1' is
# 'denselayer1.norm1' now.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def normalise_keys(state_dict):
    # DataParallel/DDP save "module.", torch.compile "_orig_mod."; the weights are the same.
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        m = _OLD_DENSENET_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def read_safetensors(path, what):
    """A .safetensors file's tensors (timm's published format: a plain state_dict, never code)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{what} {path} is a safetensors file, which needs the safetensors "
                           f"package: pip install safetensors (timm brings it)") from None
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own kinds for a truncated or foreign file
        raise WeightsError(f"{what} {path} is not a readable safetensors file "
                           f"({str(e).splitlines()[0]})") from None


def read_state_dict(path, what="checkpoint"):
    """The state_dict in our model.pt, a RepDistiller/mdistiller checkpoint ({'model': ...}), a
    torchvision weight file, a timm checkpoint ({'state_dict': ...}) or any plain state_dict, loaded
    with weights_only=True; or a .safetensors file."""
    if path.endswith(".safetensors"):
        return normalise_keys(read_safetensors(path, what))
    ckpt = load_checkpoint_file(path, what)
    if isinstance(ckpt, dict):
        inner = [ckpt[k] for k in ("model", "state_dict") if isinstance(ckpt.get(k), dict)]
        ckpt = next(iter(inner), ckpt)
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise WeightsError(f"{what} {path} holds no state_dict (expected a dict of tensors or "
                           f"{{'model': ...}})")
    return normalise_keys(ckpt)


def unfitting_tensors(ours, state, optional=()):
    """What keeps `state` from loading into a model whose state_dict is `ours`: "N missing, N
    unexpected, N mis-shaped tensors, e.g. NAME", or None where it fits. Compared before loading:
    load_state_dict raises a bare RuntimeError on a shape mismatch, strict or not. BatchNorm's
    num_batches_tracked (torchvision's published files have none; loading fills them in) and the
    `optional` keys may be missing."""
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")
               and k not in optional]
    unexpected = [k for k in state if k not in ours]
    misshaped = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if not (missing or unexpected or misshaped):
        return None
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped "
            f"tensors, e.g. {(missing + unexpected + misshaped)[0]}")


def frozen_model(arch, state, num_classes, source, what="checkpoint", image_size=None):
    """build_model(arch) with `state` loaded strictly, in eval mode and without gradients."""
    model = build_model(arch, num_classes, image_size)
    unfitting = unfitting_tensors(model.state_dict(), state)
    if unfitting:
        raise WeightsError(f"{what} {source} does not fit {arch} with {num_classes} classes "
                           f"({unfitting}); wrong architecture or file?")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def torchvision_state_dict(arch, weights_name, put_at):
    """torchvision's published `weights_name` weights of `arch`, downloaded into torch's hub cache
    (online only)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)[weights_name]
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision publishes no weights {weights_name!r} for {arch} "
                           f"(it has them for {', '.join(TORCHVISION_WEIGHTS)}: e.g. "
                           f"IMAGENET1K_V1)") from None
    file, url = TORCHVISION_WEIGHTS.get(arch, (os.path.basename(weights.url), weights.url))
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, a proxy, a bad download: all end the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"downloading {url} failed ({reason}); get {file} from there by other "
                           f"means and put it "
                           f"at {put_at}") from None
    return normalise_keys(state)


def require_teacher_file(arch, path):
    """One line saying where to get a teacher checkpoint that is not at `path`."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        example = os.path.join(path, "ckpt_epoch_240.pth")
        raise WeightsError(f"--teacher-ckpt {path} is a folder: pass the checkpoint file itself, "
                           f"e.g. {example} (RepDistiller's) or {arch}.pt")
    if is_timm(arch):
        raise WeightsError(f"no teacher checkpoint at {path}: fine-tune one on your data, e.g. "
                           f"python projkd.py --dataset folder --data-dir DIR --student {arch} "
                           f"--method ce --pretrained, and pass its model.pt as --teacher-ckpt "
                           f"(make own does both: docs/your-own.md)")
    if arch in TORCHVISION_WEIGHTS:
        file, url = TORCHVISION_WEIGHTS[arch]
        raise WeightsError(f"no teacher checkpoint at {path}: get torchvision's {file} from {url} "
                           f"and put it there, or pass --teacher-weights IMAGENET1K_V1 when online "
                           f"(make imagenet-all fetches it)")
    raise WeightsError(f"no teacher checkpoint at {path}: pass --teacher-ckpt PATH (RepDistiller's "
                       f"{arch}_vanilla/ckpt_epoch_240.pth works), or train one: python projkd.py "
                       f"--student {arch} --method ce, then copy its model.pt there (make teachers "
                       f"does both)")


def load_teacher(arch, path, num_classes, weights="", image_size=None):
    """A frozen teacher from our model.pt, a RepDistiller/mdistiller checkpoint ({'model': ...}), a
    torchvision weight file, a timm or plain state_dict (.safetensors too) at `path`; or
    torchvision's published `weights` (a name) when given. image_size: the size a timm model is
    built for (those made for one, as ViTs)."""
    if weights:
        if is_timm(arch):
            raise WeightsError(f"--teacher-weights names torchvision's weights; a {arch} teacher "
                               f"is a file: --teacher-ckpt FILE (timm's, safetensors or .pt, or a "
                               f"model.pt of ours)")
        put_at = os.path.join("checkpoints", "imagenet", f"{arch}.pt")
        state = torchvision_state_dict(arch, weights, put_at)
        return frozen_model(arch, state, num_classes, weights, "torchvision weights")
    require_teacher_file(arch, path)
    state = read_state_dict(path, "teacher checkpoint")
    return frozen_model(arch, state, num_classes, path, "teacher checkpoint", image_size)


# -----------------------------------------------------------------------------
# start weights: the trained model from timm's pretrained weights (build_model(...,
# pretrained=True)) or from a file, with a new head where the class count differs, and where those
# weights came from


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_start_weights(model, arch, path):
    """Every tensor of the file at `path` (a timm or plain state_dict, .safetensors or .pt) into
    `model`, in place; the classifier's only where its shape fits (else the model's own new head is
    kept). Returns the provenance: the file, its sha256, whether the head is new."""
    if not os.path.isfile(path):
        raise WeightsError(f"no weights file at {path} (--weights)")
    state = read_state_dict(path, "weights file")
    ours = model.state_dict()
    head = classifier_name(model)
    head_keys = [f"{head}.weight", f"{head}.bias"]
    new_head = any(k in state and state[k].shape != ours[k].shape for k in head_keys if k in ours)
    new_head_keys = ()
    if new_head:
        state = {k: v for k, v in state.items() if k not in head_keys}
        new_head_keys = head_keys
    unfitting = unfitting_tensors(ours, state, optional=new_head_keys)
    if unfitting:
        raise WeightsError(f"weights file {path} does not fit {arch} ({unfitting}); wrong "
                           f"architecture, or another --image-size than the file's?")
    model.load_state_dict(state, strict=False)
    return {"how": "a weights file", "arch": arch, "file": path, "sha256": sha256_of(path),
            "new_head": new_head}


def timm_provenance(model, arch, num_classes):
    """Where timm's pretrained weights of a model came from: its name, tag, hub and the cached
    file's sha256 (where timm's cache has one)."""
    import timm

    cfg = model.pretrained_cfg
    record = {"how": "timm's pretrained weights, by name", "arch": arch, "tag": cfg.get("tag"),
              "hub": cfg.get("hf_hub_id") or cfg.get("url"), "timm": timm.__version__,
              "new_head": num_classes != cfg.get("num_classes")}
    # the hub's cache layout changed, or a file fetched from a url: no sha256 then
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache
        file = cfg.get("hf_hub_filename") or "model.safetensors"
        cached = try_to_load_from_cache(cfg["hf_hub_id"], file)
        if isinstance(cached, str):
            record["sha256"] = sha256_of(cached)
    return record
