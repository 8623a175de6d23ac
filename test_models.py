"""Tests for models.py: every architecture against the RepDistiller zoo (as data in testdata/),
their shared interface, and the ImageNet architectures with their torchvision files."""
import importlib.util
import json
import os
import re

import pytest
import torch

import models
import projkd
from conftest import COMPAT
from models import IMAGENET_ARCHS, MODELS, TORCHVISION_WEIGHTS
from projkd import (
    features_and_logits,
)


def _fill():
    spec = importlib.util.spec_from_file_location("compat_fill", os.path.join(COMPAT, "fill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fill


@pytest.fixture(scope="module")
def compat():
    with open(os.path.join(COMPAT, "repdistiller_spec.json")) as f:
        spec = json.load(f)
    ref = torch.load(os.path.join(COMPAT, "repdistiller_ref_seed1.pt"), weights_only=True)
    return spec, ref["ref"], _fill()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", json.load(open(os.path.join(COMPAT, "repdistiller_spec.json"))))
def test_architecture_matches_the_repdistiller_zoo(arch, compat):
    spec, ref, fill = compat
    model = MODELS[arch](num_classes=100)
    ours = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert ours == spec[arch]  # names, order, shapes, dtypes
    sd = fill(spec[arch], 1)
    sd.update(ref[arch]["bn_buffers"])
    model.load_state_dict(sd, strict=True)
    model.eval()
    taps = projkd.Taps(model, model.map_layer)
    with torch.no_grad():
        logits = model(ref[arch]["input"])
    taps.remove()
    assert _rel_err(logits, ref[arch]["logits"]) < 1e-4
    assert _rel_err(taps.feature, ref[arch]["pooled"]) < 1e-4
    assert _rel_err(taps.feature_map, ref[arch]["map"]) < 1e-4


def test_every_architecture_takes_num_classes_and_channels_last():
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for arch, build in MODELS.items():
        model = build(num_classes=10).to(memory_format=torch.channels_last)
        feature, logits = features_and_logits(model, x)
        assert logits.shape == (2, 10), arch
        assert feature.shape == (2, projkd.classifier_of(model).in_features), arch


# Feature width (the classifier's in_features, also the map's channels) of each ImageNet
# architecture.
IMAGENET_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "densenet201": 1920,
                   "mobilenet_v1": 1024}


# The PEFD authors' MobileNet (github.com/chenyd7/PEFD, models/MobileNet.py) as (key, shape): its
# start, the model1/model2 boundary and its end. Their checkpoints load only if ours has exactly
# these names.
MOBILENET_V1_KEYS = {
    "head": [("model1.0.0.weight", (32, 3, 3, 3)), ("model1.0.1.weight", (32,)),
             ("model1.0.1.bias", (32,)),
             ("model1.0.1.running_mean", (32,)), ("model1.0.1.running_var", (32,)),
             ("model1.0.1.num_batches_tracked", ()), ("model1.1.0.weight", (32, 1, 3, 3))],
    "boundary": [("model1.11.4.num_batches_tracked", ()), ("model2.0.0.weight", (512, 1, 3, 3))],
    "tail": [("model2.1.3.weight", (1024, 1024, 1, 1)), ("model2.1.4.weight", (1024,)),
             ("model2.1.4.bias", (1024,)),
             ("model2.1.4.running_mean", (1024,)), ("model2.1.4.running_var", (1024,)),
             ("model2.1.4.num_batches_tracked", ()), ("fc.weight", (1000, 1024)),
             ("fc.bias", (1000,))],
}


def test_mobilenet_v1_has_the_published_size_and_the_pefd_key_layout():
    model = MODELS["mobilenet_v1"](num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976  # Howard et al. 2017: 4.2M
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(layout) == 164  # stem conv + BN (6), 13 blocks of 2 convs + 2 BNs (12 each), fc (2)
    assert layout[:7] == MOBILENET_V1_KEYS["head"] and layout[-8:] == MOBILENET_V1_KEYS["tail"]
    i = layout.index(MOBILENET_V1_KEYS["boundary"][1])
    assert layout[i - 1:i + 1] == MOBILENET_V1_KEYS["boundary"]


def test_mobilenet_v1_logits_feature_and_map_at_224_and_64():
    model = MODELS["mobilenet_v1"](num_classes=1000).eval()
    for size, side in ((224, 7), (64, 2)):  # total stride 32
        maps = []

        def keep(module, args, output, maps=maps):
            maps.append(output)
        hook = model.get_submodule(model.map_layer).register_forward_hook(keep)
        with torch.no_grad():
            feature, logits = features_and_logits(model, torch.randn(2, 3, size, size))
        hook.remove()
        assert logits.shape == (2, 1000) and feature.shape == (2, 1024)
        assert torch.allclose(projkd.classifier_of(model)(feature), logits, atol=1e-5)
        assert maps[0].shape == (2, 1024, side, side)
        assert torch.allclose(maps[0].mean((2, 3)), feature, atol=1e-6)


def test_imagenet_archs_name_models_and_their_torchvision_files():
    import torchvision

    assert len(set(IMAGENET_ARCHS)) == len(IMAGENET_ARCHS) == 5
    assert set(IMAGENET_ARCHS) == set(IMAGENET_WIDTHS)
    assert set(IMAGENET_ARCHS) <= set(MODELS)
    with open(os.path.join(COMPAT, "repdistiller_spec.json")) as f:
        assert not set(json.load(f)) & set(IMAGENET_ARCHS)  # RepDistiller's zoo is CIFAR
    assert set(TORCHVISION_WEIGHTS) == set(IMAGENET_ARCHS) - {"mobilenet_v1"}
    for arch, (file, url) in TORCHVISION_WEIGHTS.items():
        assert url == torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
        assert url.endswith("/" + file)


@pytest.mark.parametrize("arch", list(IMAGENET_WIDTHS))
def test_imagenet_architecture_classifies_and_taps_feature_and_map(arch):
    model = MODELS[arch](num_classes=10).eval()
    width = IMAGENET_WIDTHS[arch]
    assert projkd.classifier_of(model).in_features == width
    taps = projkd.Taps(model, model.map_layer)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    taps.remove()
    assert logits.shape == (2, 10) and taps.feature.shape == (2, width)
    assert taps.feature_map.shape[:2] == (2, width)
    # The map is the one pooled into the feature. For densenet201 that holds only because
    # torchvision's forward applies its final ReLU in place, to the very tensor the features.norm5
    # hook kept.
    assert torch.allclose(taps.feature_map.mean((2, 3)), taps.feature, atol=1e-6)


def test_torchvision_densenet_files_load_with_their_old_names():
    state = MODELS["densenet201"](num_classes=10).state_dict()
    # as torchvision's published file has them
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert any(".norm.1." in k for k in old)
    model = models.frozen_model("densenet201", models.normalise_keys(old), 10,
                                "densenet201-c1103571.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()
               if k in old or "norm1" in k)
