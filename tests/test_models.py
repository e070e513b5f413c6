"""CPU tests of the registered models: timm API, reference state dicts, init, estimator choice.

The architecture itself is checked against an independent functional forward in
tests/test_model_equivalence.py.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from model_helpers import randomize_bn

import reste_timm  # noqa: F401  (registers the models)
from reste_timm.nn.estimators import get_estimator
from reste_timm.nn.layers import BinaryConv2d, binary_layers

DATA = Path(__file__).parent / "data" / "official_state_dicts.json"

# Registered model -> entry of the reference listing whose state dict it must reproduce.
REFERENCE_OF = {
    "resnet20_1w1a_reste": "resnet20_1w1a",
    "resnet20_1w32a_reste": "resnet20_1w1a",
    "resnet20_cifar_fp": "resnet20_1w1a",
    "resnet20_bireal_1w1a_reste": "resnet20_bireal_1w1a",
    "resnet18_cifar_1w1a_reste": "resnet18_1w1a (CIFAR-10)",
    "resnet18_cifar_fp": "resnet18_1w1a (CIFAR-10)",
    "vgg_small_1w1a_reste": "vgg_small_1w1a",
    "vgg_small_fp": "vgg_small_1w1a",
    "resnet18_1w1a_reste": "resnet18_1w1a (ImageNet)",
    "resnet18_1w32a_reste": "resnet18_1w1a (ImageNet)",
    "resnet34_1w1a_reste": "resnet34_1w1a (ImageNet)",
    "resnet34_1w32a_reste": "resnet34_1w1a (ImageNet)",
}
PARAM_COUNTS = {
    "resnet20_1w1a": 269_850,
    "resnet20_bireal_1w1a": 269_850,
    "resnet18_1w1a (CIFAR-10)": 11_174_986,
    "vgg_small_1w1a": 4_660_106,
    "resnet18_1w1a (ImageNet)": 11_690_536,
    "resnet34_1w1a (ImageNet)": 21_798_696,
}
MODELS = sorted(timm.list_models("*_reste") + timm.list_models("*_fp"))
BINARY_MODELS = [n for n in MODELS if n.endswith("_reste")]
IMAGENET = {"resnet18_1w1a_reste", "resnet18_1w32a_reste", "resnet34_1w1a_reste", "resnet34_1w32a_reste"}
# A small input for the ImageNet models' expensive checks: they pool globally, so 32 px (a 1x1 map
# after layer4) is enough; their default 224 px is checked once, on resnet18_1w1a_reste.
SMALL = 32
DEFAULT_SIZE_CHECKED = {"resnet18_1w1a_reste"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module's tests.

    The tensors here are small; on a busy 2-core machine, OpenMP workers waiting on each other cost
    several times the work itself (measured: 28 s with one thread, 160 s with two).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _is_imagenet(name: str) -> bool:
    return name in IMAGENET


def _small_size(name: str) -> int:
    return SMALL if _is_imagenet(name) else 32


@functools.cache
def _listing() -> dict:
    with open(DATA) as f:
        return json.load(f)


def _reference(name: str) -> dict:
    return _listing()[REFERENCE_OF[name]]


@functools.cache
def _shared_model(name: str) -> nn.Module:
    """A model built once per session, for the read-only checks (do not modify it)."""
    torch.manual_seed(0)
    return timm.create_model(name).eval()


def _fresh(name: str) -> nn.Module:
    """A default model of its own (a copy: cheaper than initialising 20M parameters again)."""
    return copy.deepcopy(_shared_model(name))


# --------------------------------------------------------------------------------------------------
# Registry, state dicts, parameter counts, init
# --------------------------------------------------------------------------------------------------


def test_registry_matches_reference_mapping():
    assert set(MODELS) == set(REFERENCE_OF), "a model was added or removed: update REFERENCE_OF"
    assert set(REFERENCE_OF.values()) == set(_listing())


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_matches_reference(name):
    model = _shared_model(name)
    ref = _reference(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref["state_dict"]
    # Same order too: the parameter order is what a reference optimizer state is indexed by.
    assert list(ours) == list(ref["state_dict"])
    assert model.num_classes == ref["num_classes"]
    binarized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    if name.endswith("_fp"):
        assert binarized == set()
    else:
        assert binarized == set(ref["binarized_conv_weights"])
        assert all(m.binarize_input == ("1w32a" not in name) for m in binary_layers(model))


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name):
    model = _shared_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[REFERENCE_OF[name]]


@pytest.mark.parametrize("name", MODELS)
def test_init_rules(name):
    model = _shared_model(name)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        w = conv.weight.detach()
        fan_in = w[0].numel()
        if name.startswith("vgg_small"):
            expected = math.sqrt(2.0 / (w.shape[2] * w.shape[3] * w.shape[0]))
        elif name.startswith("resnet18_cifar"):
            expected = 1.0 / math.sqrt(3.0 * fan_in)  # PyTorch default: kaiming_uniform(a=sqrt(5))
        else:
            expected = math.sqrt(2.0 / fan_in)  # kaiming_normal_, fan_in, relu gain
        assert w.std().item() == pytest.approx(expected, rel=0.12), conv
    head = model.get_classifier()
    if name.startswith("vgg_small"):
        assert torch.all(head.bias == 0)
        assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    elif name.startswith("resnet20"):
        assert head.weight.std().item() == pytest.approx(math.sqrt(2.0 / head.in_features), rel=0.15)


@pytest.mark.parametrize("name", MODELS)
def test_reference_checkpoint_with_module_prefix_loads(name):
    """A DataParallel-saved checkpoint of the reference layout loads strictly once unprefixed."""
    ref = _reference(name)["state_dict"]
    g = torch.Generator().manual_seed(1)
    ckpt = {}
    for key, shape in ref.items():
        if key.endswith("num_batches_tracked"):
            ckpt[f"module.{key}"] = torch.tensor(123, dtype=torch.long)
        else:
            ckpt[f"module.{key}"] = torch.randn(shape, generator=g)
    model = _fresh(name)
    with pytest.raises(RuntimeError):
        model.load_state_dict(ckpt, strict=True)
    stripped = {k.removeprefix("module."): v for k, v in ckpt.items()}
    result = model.load_state_dict(stripped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for key, value in stripped.items():
        assert torch.equal(loaded[key], value), key


def test_reference_checkpoint_file_loads_with_timm(tmp_path):
    """timm's own loader strips ``module.`` from a reference-style ``{'state_dict': ...}`` file."""
    name = "resnet20_1w1a_reste"
    source = timm.create_model(name)
    randomize_bn(source)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               path)
    model = timm.create_model(name)
    timm.models.load_checkpoint(model, str(path), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------------
# Forward / backward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = _fresh(name).train()
    model.reset_classifier(7)
    size = _small_size(name)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 4])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {pname}"
    # The gradient reaches the stem through every stage, and every binary conv gets one.
    assert model.get_parameter(model.pretrained_cfg["first_conv"] + ".weight").grad.abs().sum() > 0
    for layer in binary_layers(model):
        assert layer.weight.grad.abs().sum() > 0


def test_forward_at_default_size_resnet18_imagenet():
    model = _shared_model("resnet18_1w1a_reste")
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# timm API (mirrors timm's tests/test_models.py::test_model_default_cfgs and friends)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg(name):
    model = _shared_model(name)
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    for key in ("first_conv", "classifier"):
        names = cfg[key] if isinstance(cfg[key], (tuple, list)) else (cfg[key],)
        for module_name in names:
            assert f"{module_name}.weight" in state_dict, f"{key}={module_name} not in the model"
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().out_features == cfg["num_classes"]
    hub = cfg["hf_hub_id"]
    org, _, repo = hub.partition("/")
    assert org and repo and not hub.startswith("timm/")
    tag = "in1k" if _is_imagenet(name) else "cifar10"
    assert cfg["tag"] == tag
    assert f"{name}.{tag}" in timm.list_pretrained(name)
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert cfg["input_size"] == ((3, 224, 224) if _is_imagenet(name) else (3, 32, 32))


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_forward_shapes(name):
    torch.manual_seed(0)
    model = _fresh(name)
    cfg = model.pretrained_cfg
    pool_size = tuple(cfg["pool_size"])
    input_size = tuple(cfg["input_size"])
    if _is_imagenet(name) and name not in DEFAULT_SIZE_CHECKED:  # same cfg, checked on resnet18_1w1a
        assert (input_size, pool_size) == ((3, 224, 224), (7, 7))
        input_size, pool_size = (3, SMALL, SMALL), (SMALL // 32, SMALL // 32)
    x = torch.randn(1, *input_size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert tuple(feats.shape[-2:]) == pool_size
        assert feats.shape[1] == model.num_features
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.dim() == 2 and pre.shape[1] == model.head_hidden_size
        logits = model.forward_head(feats)
        assert logits.shape == (1, cfg["num_classes"])
        torch.testing.assert_close(model(x), logits)

        model.reset_classifier(0)
        out = model(x)
        assert out.dim() == 2 and out.shape[1] == model.head_hidden_size
        torch.testing.assert_close(out, pre)
        assert isinstance(model.get_classifier(), nn.Identity)

        model.reset_classifier(0, "")
        out = model(x)
        assert out.dim() == 4 and tuple(out.shape[-2:]) == pool_size
        assert out.shape[1] == model.num_features

        model = timm.create_model(name, num_classes=0, global_pool="").eval()
        out = model(x)
        assert out.dim() == 4 and tuple(out.shape[-2:]) == pool_size
        assert out.shape[1] == model.num_features


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_keeps_head_bn(name):
    model = _fresh(name)
    bn = getattr(model, "bn2", None)
    model.reset_classifier(5)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 5
    assert head.in_features == model.head_hidden_size
    if not name.startswith("vgg_small"):
        assert model.bn2 is bn  # the trained head BN (and its statistics) survives


@pytest.mark.parametrize("name", ["resnet20_1w1a_reste", "resnet18_cifar_fp"])
def test_concatenating_global_pool(name):
    model = timm.create_model(name, global_pool="catavgmax").eval()
    assert model.head_hidden_size == 2 * model.num_features
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        model.reset_classifier(3, "avg")
        assert model.head_hidden_size == model.num_features == model.bn2.num_features
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet20_1w1a_reste", "vgg_small_1w1a_reste", "resnet18_1w1a_reste"])
def test_reset_classifier_follows_model_dtype(name):
    model = _fresh(name).double()
    model.reset_classifier(3)
    assert model.get_classifier().weight.dtype == torch.float64
    if not name.startswith("vgg_small"):
        model.reset_classifier(4, "catavgmax")  # a new, wider bn2
        assert model.bn2.weight.dtype == torch.float64
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape[1] == model.num_classes


@pytest.mark.parametrize("name", ["resnet20_1w1a_reste", "vgg_small_fp", "resnet18_1w1a_reste"])
def test_timm_train_script_kwargs(name):
    """timm's train.py calls create_model with these (the None ones are dropped by timm)."""
    model = timm.create_model(name, pretrained=False, in_chans=3, num_classes=4, drop_rate=0.5,
                              drop_path_rate=None, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=False, checkpoint_path="")
    assert model.drop_rate == 0.5
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        torch.manual_seed(0)
        model.train()
        a, b = model(x), model(x)
    assert a.shape == (4, 4) and not torch.allclose(a, b)  # dropout is active in training only


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    full = _shared_model(name)
    feat = timm.create_model(name, features_only=True).eval()
    assert feat.load_state_dict(full.state_dict(), strict=False).missing_keys == []
    size = _small_size(name)
    x = torch.randn(2, 3, size, size)
    taps = {}
    hooks = [full.get_submodule(info["module"]).register_forward_hook(
        lambda mod, inp, out, key=info["module"]: taps.__setitem__(key, out))
        for info in feat.feature_info.get_dicts()]
    with torch.no_grad():
        outs = feat(x)
        full(x)
    for h in hooks:
        h.remove()
    channels, reductions = feat.feature_info.channels(), feat.feature_info.reduction()
    assert isinstance(outs, list) and len(outs) == len(channels) >= 4
    for out, ch, red, info in zip(outs, channels, reductions, feat.feature_info.get_dicts(), strict=True):
        assert out.shape == (2, ch, size // red, size // red)
        torch.testing.assert_close(out, taps[info["module"]])
    assert reductions[-1] == size // full.forward_features(x).shape[-1]


@pytest.mark.parametrize("name", MODELS)
def test_in_chans_and_num_classes(name):
    model = timm.create_model(name, in_chans=1, num_classes=5).eval()
    first = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert first.in_channels == 1 and not isinstance(first, BinaryConv2d)
    size = _small_size(name)
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_non_default_input_size(name):
    size = 160 if _is_imagenet(name) else 48
    model = _shared_model(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
    reduction = model.feature_info[-1]["reduction"]
    assert tuple(feats.shape[-2:]) == (size // reduction, size // reduction)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# Estimator choice
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BINARY_MODELS)
def test_estimator_kwarg(name):
    model = timm.create_model(name, estimator="ste")
    layers = list(binary_layers(model))
    assert len(layers) == len(_reference(name)["binarized_conv_weights"])
    for layer in layers:
        assert layer.estimator == "ste"
        assert layer._estimate is get_estimator("ste")
    assert all(m._estimate is get_estimator("reste") for m in binary_layers(_shared_model(name)))


def test_estimator_kwarg_changes_the_gradient():
    """|x| in (1, 1.5]: STE cuts the gradient, ReSTE at o = 1 (an STE clipped at 1.5) passes it.

    x's gradient is the estimator's slope times a sum of weight signs times the upstream gradient: that
    upstream gradient is drawn from a normal distribution: with an integer-valued one the sum was exactly
    0 at some entry for 49 of 200 model seeds (the output squared as the loss) or 190 (all ones); with
    this one, for none.
    """
    grads = {}
    for estimator in ("ste", "reste"):
        torch.manual_seed(0)
        model = timm.create_model("resnet20_1w1a_reste", estimator=estimator)
        layer = next(binary_layers(model))
        x = torch.full((1, layer.in_channels, 4, 4), 1.2)
        x[:, ::2] = -1.2
        x.requires_grad_(True)
        out = layer(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        grads[estimator] = x.grad
    assert torch.all(grads["ste"] == 0)
    assert torch.all(grads["reste"] != 0)


@pytest.mark.parametrize("name", ["resnet20_1w1a_reste", "vgg_small_1w1a_reste"])
def test_unknown_estimator_raises(name):
    with pytest.raises(ValueError, match="unknown estimator"):
        timm.create_model(name, estimator="no-such-estimator")
