"""Architecture equivalence: every registered model against an independent functional forward written
from docs/method.md section 3 that reads the weights by their reference state-dict names, so a change of
block order, shortcut, head or binarization shows up as a different output.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from model_helpers import randomize_bn

import reste_timm  # noqa: F401  (registers the models)

MODELS = sorted(timm.list_models("*_reste") + timm.list_models("*_fp"))
SMALL = 32  # the ImageNet models pool globally: 32 px is enough except where the 7x7 pool is checked


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: small tensors on a 2-core machine (see tests/test_models.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# Architecture equivalence with an independent functional reference (docs/method.md section 3)
# --------------------------------------------------------------------------------------------------


class _Ref:
    """Functional building blocks that read weights by their reference state-dict names."""

    def __init__(self, sd: dict, binary: bool, binary_act: bool):
        self.sd, self.binary, self.binary_act = sd, binary, binary_act

    def conv(self, x, key, stride=1, padding=0):  # full precision
        return F.conv2d(x, self.sd[f"{key}.weight"], None, stride, padding)

    def binconv(self, x, key, stride=1):
        w = self.sd[f"{key}.weight"]
        if self.binary:
            w = torch.sign(w) * w.abs().mean()
            if self.binary_act:
                x = torch.sign(x)
        return F.conv2d(x, w, None, stride, 1)

    def bn(self, x, key):
        sd = self.sd
        return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                            sd[f"{key}.bias"], False, 0.0, 1e-5)

    def linear(self, x, key):
        return F.linear(x, self.sd[f"{key}.weight"], self.sd[f"{key}.bias"])


def _ref_resnet20(r: _Ref, x, bireal: bool):
    out = r.bn(F.relu(r.conv(x, "conv1", 1, 1)), "bn1")
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64)):
        for b in range(3):
            stride = 2 if stage > 0 and b == 0 else 1
            p = f"layer{stage + 1}.{b}."
            if stride != 1 or in_planes != planes:
                def shortcut(t, pad=planes // 4):  # option A
                    return F.pad(t[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0)
            else:
                def shortcut(t):
                    return t
            if bireal:
                o1 = r.bn(F.relu(r.binconv(out, p + "conv1", stride)), p + "bn1") + shortcut(out)
                out = r.bn(F.relu(r.binconv(o1, p + "conv2")), p + "bn2") + o1
            else:
                o1 = r.bn(F.relu(r.binconv(out, p + "conv1", stride)), p + "bn1")
                out = r.bn(F.relu(r.binconv(o1, p + "conv2")), p + "bn2") + shortcut(out)
            in_planes = planes
    out = F.avg_pool2d(out, out.size(3)).view(out.size(0), -1)
    return r.linear(r.bn(out, "bn2"), "linear")


def _ref_resnet18_cifar(r: _Ref, x):
    out = r.bn(F.relu(r.conv(x, "conv1", 1, 1)), "bn1")
    in_planes = 64
    for stage, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stride = 2 if stage > 0 and b == 0 else 1
            p = f"layer{stage + 1}.{b}."
            o1 = r.bn(F.relu(r.binconv(out, p + "conv1", stride)), p + "bn1")
            o2 = r.bn(F.relu(r.binconv(o1, p + "conv2")), p + "bn2")
            if stride != 1 or in_planes != planes:  # option B
                o2 = o2 + r.bn(r.conv(out, p + "shortcut.0", stride), p + "shortcut.1")
            else:
                o2 = o2 + out
            out, in_planes = o2, planes
    out = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return r.linear(r.bn(out, "bn2"), "linear")


def _ref_vgg_small(r: _Ref, x):
    x = r.bn(F.relu(r.conv(x, "conv0", 1, 1)), "bn0")
    for i in range(1, 6):
        x = r.bn(F.relu(r.binconv(x, f"conv{i}")), f"bn{i}")
        if i in (1, 3, 5):
            x = F.max_pool2d(x, 2, 2)
    return r.linear(x.view(x.size(0), 512 * 4 * 4), "fc")


def _ref_resnet_imagenet(r: _Ref, x, layers):
    x = F.max_pool2d(r.bn(F.relu(r.conv(x, "conv1", 2, 3)), "bn1"), 3, 2, 1)
    inplanes = 64
    for stage, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
        for b in range(depth):
            stride = 2 if stage > 0 and b == 0 else 1
            p = f"layer{stage + 1}.{b}."
            residual = x
            out = r.bn(F.relu(r.binconv(x, p + "conv1", stride)), p + "bn1")
            if stride != 1 or inplanes != planes:
                residual = r.bn(r.conv(x, p + "downsample.0", stride), p + "downsample.1")
            out = out + residual
            residual = out
            x = r.bn(F.relu(r.binconv(out, p + "conv2")), p + "bn2") + residual
            inplanes = planes
    # The reference's AvgPool2d(7) at 224 px; a global average at other sizes.
    x = F.avg_pool2d(x, 7) if x.shape[-1] == 7 else x.mean((2, 3), keepdim=True)
    return r.linear(r.bn(x.view(x.size(0), -1), "bn2"), "fc")


_EQUIVALENCE = {
    "resnet20_1w1a_reste": (lambda r, x: _ref_resnet20(r, x, bireal=False), 32),
    "resnet20_1w32a_reste": (lambda r, x: _ref_resnet20(r, x, bireal=False), 32),
    "resnet20_cifar_fp": (lambda r, x: _ref_resnet20(r, x, bireal=False), 32),
    "resnet20_bireal_1w1a_reste": (lambda r, x: _ref_resnet20(r, x, bireal=True), 32),
    "resnet18_cifar_1w1a_reste": (_ref_resnet18_cifar, 32),
    "resnet18_cifar_fp": (_ref_resnet18_cifar, 32),
    "vgg_small_1w1a_reste": (_ref_vgg_small, 32),
    "vgg_small_fp": (_ref_vgg_small, 32),
    # resnet18_1w1a at its default 224 px, where the reference's 7x7 average pool applies.
    "resnet18_1w1a_reste": (lambda r, x: _ref_resnet_imagenet(r, x, (2, 2, 2, 2)), 224),
    "resnet18_1w32a_reste": (lambda r, x: _ref_resnet_imagenet(r, x, (2, 2, 2, 2)), SMALL),
    "resnet34_1w1a_reste": (lambda r, x: _ref_resnet_imagenet(r, x, (3, 4, 6, 3)), SMALL),
    "resnet34_1w32a_reste": (lambda r, x: _ref_resnet_imagenet(r, x, (3, 4, 6, 3)), SMALL),
}


def test_equivalence_covers_every_model():
    assert set(_EQUIVALENCE) == set(MODELS)


def _equivalence_setup(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    randomize_bn(model, seed=1)
    binary = not name.endswith("_fp")
    ref = _Ref(model.state_dict(), binary=binary, binary_act=binary and "1w32a" not in name)
    return model, ref


@pytest.mark.parametrize("name", MODELS)
def test_equivalence_with_spec_reference(name):
    fn, size = _EQUIVALENCE[name]
    model, ref = _equivalence_setup(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x)
        expected = fn(ref, x)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_equivalence_reference_is_discriminative():
    """The functional references tell the architectures apart (so the equivalence test can fail)."""
    model, ref = _equivalence_setup("resnet20_1w1a_reste")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), _ref_resnet20(ref, x, bireal=True), atol=1e-3)
        fp = _Ref(ref.sd, binary=False, binary_act=False)
        assert not torch.allclose(model(x), _ref_resnet20(fp, x, bireal=False), atol=1e-3)
        w32 = _Ref(ref.sd, binary=True, binary_act=False)
        assert not torch.allclose(model(x), _ref_resnet20(w32, x, bireal=False), atol=1e-3)
