"""The exponent-annealing schedule and hook (docs/method.md, section 4)."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
import torch.nn as nn

from reste_timm.nn.annealing import ExponentAnnealing, annealed_exponent
from reste_timm.nn.layers import BinaryConv2d, binary_layers


def _closed_form(e: float, epochs: int, o_end: float) -> float:
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi / 2.0 * e / epochs))


class _Tiny(nn.Module):
    """Three binary convs at different depths and an FP conv that the hook must leave alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.a = BinaryConv2d(4, 4, 3)
        self.blocks = nn.Sequential(BinaryConv2d(4, 4, 3), nn.Sequential(BinaryConv2d(4, 4, 1)))


def _exponents(model):
    return [layer.exponent for layer in binary_layers(model)]


def _progresses(model):
    return [layer.progress for layer in binary_layers(model)]


@pytest.mark.parametrize("o_end", [3.0, 2.5, 1.0])
@pytest.mark.parametrize("epochs", [1, 10, 1000])
def test_schedule_closed_form(epochs, o_end):
    for e in sorted({0, 1, epochs // 4, epochs // 2, epochs - 1, epochs}):
        assert annealed_exponent(e, epochs, o_end) == pytest.approx(_closed_form(e, epochs, o_end), abs=1e-12)
    assert annealed_exponent(0, epochs, o_end) == 1.0
    assert annealed_exponent(epochs, epochs, o_end) == pytest.approx(o_end, abs=1e-12)


def test_schedule_hand_values():
    # o_end = 3: o(E/2) = 1 + 2 (1 - cos(pi/4)) = 3 - sqrt(2); o(E/3) = 1 + 2 (1 - cos(pi/6)) = 3 - sqrt(3).
    assert annealed_exponent(5, 10) == pytest.approx(3.0 - math.sqrt(2.0), abs=1e-12)
    assert annealed_exponent(10, 30) == pytest.approx(3.0 - math.sqrt(3.0), abs=1e-12)
    assert annealed_exponent(250, 250) == pytest.approx(3.0, abs=1e-12)  # default o_end is 3
    values = [annealed_exponent(e, 100) for e in range(101)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))  # strictly increasing from 1 to o_end


@pytest.mark.parametrize("epochs, o_end", [(0, 3.0), (-5, 3.0), (2.5, 3.0), (10, 0.5), (10, float("nan")),
                                           (10, float("inf"))])
def test_bad_schedule_raises(epochs, o_end):
    with pytest.raises(ValueError):
        annealed_exponent(0, epochs, o_end)
    with pytest.raises(ValueError):
        ExponentAnnealing(_Tiny(), epochs=epochs, o_end=o_end)


@pytest.mark.parametrize("epoch", [-1, -0.5, 10.5, 11])
def test_epoch_outside_schedule_raises(epoch):
    with pytest.raises(ValueError):
        annealed_exponent(epoch, 10)
    model = _Tiny()
    hook = ExponentAnnealing(model, epochs=10)
    hook.start_epoch(4)
    with pytest.raises(ValueError):
        hook.start_epoch(epoch)
    # A rejected call changes nothing.
    assert hook.position == 4 and hook.exponent == pytest.approx(_closed_form(4, 10, 3.0))
    assert _exponents(model) == [pytest.approx(_closed_form(4, 10, 3.0))] * 3


@pytest.mark.parametrize("steps", [0, -2, 1.5])
def test_bad_steps_per_epoch_raises(steps):
    with pytest.raises(ValueError):
        ExponentAnnealing(_Tiny(), epochs=10, steps_per_epoch=steps, per_step=True)


def test_per_epoch_sets_every_binary_layer():
    model = _Tiny()
    epochs = 8
    hook = ExponentAnnealing(model, epochs=epochs, o_end=3.0, steps_per_epoch=5)
    assert _exponents(model) == [1.0, 1.0, 1.0]
    for epoch in range(epochs):
        o = hook.start_epoch(epoch)
        assert o == pytest.approx(_closed_form(epoch, epochs, 3.0), abs=1e-12)
        assert _exponents(model) == [o, o, o]
        assert _progresses(model) == [pytest.approx(epoch / epochs)] * 3
        for step in range(5):  # per-epoch mode: steps leave o alone
            assert hook.step(epoch, step) == o
            assert _exponents(model) == [o, o, o]
    assert not hasattr(model.stem, "exponent")


def test_per_step_follows_the_same_curve():
    model = _Tiny()
    epochs, steps = 4, 5
    hook = ExponentAnnealing(model, epochs=epochs, o_end=3.0, steps_per_epoch=steps, per_step=True)
    seen = []
    for epoch in range(epochs):
        assert hook.start_epoch(epoch) == pytest.approx(_closed_form(epoch, epochs, 3.0))
        for step in range(steps):
            o = hook.step(epoch, step)
            position = epoch + (step + 1) / steps
            assert o == pytest.approx(_closed_form(position, epochs, 3.0), abs=1e-12)
            assert _exponents(model) == [o, o, o]
            assert _progresses(model) == [pytest.approx(position / epochs)] * 3
            seen.append(o)
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1] == pytest.approx(3.0)
    # Mid-epoch: epoch 2, after the 2nd of 5 steps -> e = 2.4.
    assert hook.step(2, 1) == pytest.approx(_closed_form(2.4, epochs, 3.0))
    # More batches than declared (e.g. gradient accumulation) stop at the epoch's end, never beyond.
    assert hook.step(epochs - 1, 3 * steps) == pytest.approx(3.0)
    assert hook.step(1, 99) == pytest.approx(_closed_form(2.0, epochs, 3.0))


def test_drives_a_registered_model_and_a_wrapped_one():
    model = timm.create_model("resnet20_1w1a_reste")
    wrapped = nn.Sequential(model)  # any wrapper (DDP, accelerate) exposes the layers through modules()
    hook = ExponentAnnealing(wrapped, epochs=10, o_end=3.0)
    o = hook.start_epoch(7)
    layers = list(binary_layers(model))
    assert len(layers) == 18
    assert all(layer.exponent == o for layer in layers)
    assert all(layer.progress == pytest.approx(0.7) for layer in layers)


def test_exponent_reaches_the_estimator():
    """Backward through ReSTE at the annealed o differs from o = 1 (the hook's value is used)."""
    torch.manual_seed(0)
    model = _Tiny()
    hook = ExponentAnnealing(model, epochs=10, o_end=3.0)
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for epoch in (0, 9):
        hook.start_epoch(epoch)
        model.zero_grad()
        out = model.blocks(model.a(model.stem(x)))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(model.a.weight.grad.clone())
    assert torch.isfinite(grads[1]).all()
    assert not torch.allclose(grads[0], grads[1])


def test_state_dict_round_trip_on_fresh_model():
    model = _Tiny()
    hook = ExponentAnnealing(model, epochs=20, o_end=2.5, steps_per_epoch=10, per_step=True)
    hook.start_epoch(6)
    hook.step(6, 3)
    state = hook.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # a checkpoint holds it
    buffer.seek(0)
    restored_state = torch.load(buffer, weights_only=True)

    fresh = _Tiny()
    assert _exponents(fresh) == [1.0, 1.0, 1.0]
    resumed = ExponentAnnealing(fresh, epochs=3, o_end=1.0)  # settings come from the state
    resumed.load_state_dict(restored_state)
    assert resumed.state_dict() == state
    expected = _closed_form(6.4, 20, 2.5)
    assert resumed.exponent == pytest.approx(expected, abs=1e-12)
    assert _exponents(fresh) == [pytest.approx(expected, abs=1e-12)] * 3
    assert _progresses(fresh) == [pytest.approx(6.4 / 20)] * 3
    # Both carry on identically.
    assert resumed.step(6, 4) == hook.step(6, 4)
    assert resumed.start_epoch(7) == hook.start_epoch(7)
    assert _exponents(fresh) == _exponents(model)


def test_load_bad_state_raises_and_keeps_state():
    model = _Tiny()
    hook = ExponentAnnealing(model, epochs=10)
    hook.start_epoch(2)
    before = hook.state_dict()
    for bad in ({**before, "position": 12.0}, {**before, "o_end": 0.5}, {**before, "epochs": 0}):
        with pytest.raises(ValueError):
            hook.load_state_dict(bad)
        assert hook.state_dict() == before
        assert _exponents(model) == [pytest.approx(_closed_form(2, 10, 3.0))] * 3
