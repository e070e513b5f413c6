"""The paper's indicators (docs/method.md, section 5): estimating error and gradient stability."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from reste_timm.nn.indicators import estimating_error, gradient_stability
from reste_timm.nn.layers import BinaryConv2d

DATA = Path(__file__).parent / "data" / "official_state_dicts.json"


class _Hand(nn.Module):
    """Two binary convs with hand-set weights, and FP layers with bigger weights that must not count.

    The attribute names are deliberately misleading: the reference's name-based selection would pick
    ``layer1.conv1`` (an FP conv here) and skip ``classifier`` (a binary conv here).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 3, bias=False)
        self.classifier = BinaryConv2d(2, 3, 3)  # 54 weights, all 0.25
        self.layer1 = nn.Module()
        self.layer1.conv1 = nn.Conv2d(3, 4, 3, bias=False)  # FP, |w| = 10
        self.head = nn.Sequential(nn.Identity(), BinaryConv2d(3, 4, 1))  # 12 weights, |w| = 4
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.stem.weight.fill_(7.0)
            self.classifier.weight.fill_(0.25)
            self.layer1.conv1.weight.fill_(-10.0)
            w = torch.full((4, 3, 1, 1), 4.0)
            w.view(-1)[::2] = -4.0
            self.head[1].weight.copy_(w)
            self.fc.weight.fill_(3.0)


def _binary_weights(model):
    return [model.classifier.weight, model.head[1].weight]


def test_estimating_error_closed_form():
    model = _Hand()
    # o = 1: F_1(w) = w -> || w - sign(w) ||: 0.75 sqrt(54) + 3 sqrt(12).
    assert estimating_error(model, 1.0) == pytest.approx(0.75 * math.sqrt(54) + 3.0 * math.sqrt(12), rel=1e-6)
    # o = 2: |w|^(1/2): 0.5 and 2 -> 0.5 sqrt(54) + 1 * sqrt(12).
    assert estimating_error(model, 2.0) == pytest.approx(0.5 * math.sqrt(54) + math.sqrt(12), rel=1e-6)
    # o = 3 (the paper's o_end): 0.25^(1/3) and 4^(1/3).
    expected = (1 - 0.25 ** (1 / 3)) * math.sqrt(54) + (4 ** (1 / 3) - 1) * math.sqrt(12)
    assert estimating_error(model, 3.0) == pytest.approx(expected, rel=1e-6)


def test_estimating_error_matches_the_formula_on_random_weights():
    torch.manual_seed(0)
    model = _Hand()
    with torch.no_grad():
        for w in _binary_weights(model):
            w.copy_(torch.randn_like(w) * 0.7)
        model.classifier.weight.view(-1)[0] = 0.0  # sign(0) = 0 and F_o(0) = 0: no contribution
    for o in (1.0, 1.7, 3.0):
        expected = 0.0
        for w in _binary_weights(model):
            w64 = w.detach().double()
            diff = torch.sign(w64) * w64.abs() ** (1.0 / o) - torch.sign(w64)
            expected += math.sqrt(float((diff**2).sum()))
        assert estimating_error(model, o) == pytest.approx(expected, rel=1e-6)


def test_estimating_error_at_o_end_1_is_distance_from_sign():
    """With o = o_end = 1 the equivalent forward is the identity: the error is ||w - sign(w)||."""
    model = timm.create_model("resnet20_1w1a_reste")
    listing = json.loads(DATA.read_text())["resnet20_1w1a"]["binarized_conv_weights"]
    params = dict(model.named_parameters())
    expected = sum(torch.linalg.vector_norm(params[k] - torch.sign(params[k])).item() for k in listing)
    assert len(listing) == 18
    assert estimating_error(model, 1.0) == pytest.approx(expected, rel=1e-5)
    # The FP stem and classifier are excluded: including them would change the value.
    fp = sum(torch.linalg.vector_norm(params[k] - torch.sign(params[k])).item()
             for k in ("conv1.weight", "linear.weight"))
    assert estimating_error(model, 1.0) != pytest.approx(expected + fp, rel=1e-5)


def test_estimating_error_decreases_with_o_for_small_weights():
    model = _Hand()
    with torch.no_grad():
        model.head[1].weight.mul_(0.1)  # all |w| < 1 now: |w|^(1/o) -> 1 as o grows
    values = [estimating_error(model, o) for o in (1.0, 1.5, 2.0, 3.0)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


def test_gradient_stability_closed_form():
    model = _Hand()
    assert gradient_stability(model) is None  # no gradient yet
    with torch.no_grad():
        # FP layers get huge, varied gradients: they must not count.
        for p in (model.stem.weight, model.layer1.conv1.weight, model.fc.weight):
            p.grad = torch.randn_like(p) * 100.0
    assert gradient_stability(model) is None  # still no binary-layer gradient
    g1 = torch.ones(54)
    g1[::2] = 3.0
    g1[1::4] = -1.0  # |g| is 1 or 3, half each: mean 2, unbiased variance 54 / 53
    model.classifier.weight.grad = g1.view(3, 2, 3, 3)
    g2 = torch.tensor([0.5, -0.5, 1.5, -1.5] * 3)  # |g| in {0.5, 1.5}: unbiased variance 0.25 * 12 / 11
    model.head[1].weight.grad = g2.view(4, 3, 1, 1)
    assert gradient_stability(model) == pytest.approx(54 / 53 + 0.25 * 12 / 11, rel=1e-6)


def test_gradient_stability_after_backward():
    torch.manual_seed(0)
    model = _Hand()
    with torch.no_grad():
        for w in _binary_weights(model):
            w.copy_(torch.randn_like(w) * 0.5)
    x = torch.randn(2, 2, 6, 6)
    out = model.head(model.classifier(x))
    (out * torch.randn_like(out)).sum().backward()
    expected = sum(torch.var(w.grad.abs()).item() for w in _binary_weights(model))
    assert expected > 0
    assert gradient_stability(model) == pytest.approx(expected, rel=1e-6)
    assert model.stem.weight.grad is None  # the FP stem took no part, and was not needed


@pytest.mark.parametrize("o", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_estimating_error_rejects_bad_exponent(o):
    with pytest.raises(ValueError):
        estimating_error(_Hand(), o)


def test_no_binary_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    model[0].weight.grad = torch.randn_like(model[0].weight)
    assert estimating_error(model, 3.0) == 0.0
    assert gradient_stability(model) is None
