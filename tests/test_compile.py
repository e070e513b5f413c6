"""torch.compile over the registered ops: one graph for a whole annealing schedule, eager gradients,
autocast; and the same on CUDA where a GPU exists (tests marked ``cuda``)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import reste_timm
from reste_timm.nn.layers import BinaryConv2d

OP_NODE = "GeneratedBackwardFor_reste_timm_binary_conv2d_defaultBackward"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _digits_batch(n=16, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


@pytest.mark.slow
def test_compiled_model_trains_through_twelve_exponents_with_one_graph():
    torch.manual_seed(0)
    # ResNet-20's code at one block per stage (ResNet-8): every kind of layer, stride and shortcut it
    # has, in a third of the graph (inductor's compile time grows with the graph; the property does not)
    model = timm.create_model("resnet20_1w1a_reste", layers=(1, 1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    compiled = torch.compile(model)  # inductor, forward and backward
    x, y = _digits_batch()
    annealing = reste_timm.ExponentAnnealing(model, epochs=12, o_end=3.0)
    counters.clear()
    losses = []
    for epoch in range(12):
        annealing.start_epoch(epoch)
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert len({layer.exponent for layer in reste_timm.binary_layers(model)}) == 1
    assert model.layer1[0].conv1.exponent == pytest.approx(reste_timm.annealed_exponent(11, 12, 3.0))
    assert counters["stats"]["unique_graphs"] == 1  # twelve exponents, one compiled graph
    assert counters["aot_autograd"]["total"] == 1
    # single-batch losses of a binary net jump from step to step: compare the first and last four
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.slow
@pytest.mark.parametrize("binarize_input", [True, False], ids=["1w1a", "1w32a"])
def test_compiled_layer_gradients_equal_eager(binarize_input):
    """Per layer (a whole binary network differs more: float rounding flips signs inside it)."""
    torch.manual_seed(1)
    layer = BinaryConv2d(16, 32, 3, stride=2, padding=1, bias=True, binarize_input=binarize_input)
    compiled = torch.compile(layer)
    x = torch.randn(4, 16, 12, 12)
    x[0, 0, 0, :3] = 0.0
    up = torch.randn(4, 32, 6, 6)
    counters.clear()
    for o in (1.0, 1.7, 2.6):
        reste_timm.set_exponent(layer, o)
        grads = []
        for fn in (layer, compiled):
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            out = fn(xi)
            out.backward(up)
            grads.append((out.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        for eager, comp in zip(*grads, strict=True):
            torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_autocast_bf16_runs_the_op_in_bf16_and_keeps_float32_gradients():
    torch.manual_seed(2)
    layer = BinaryConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == OP_NODE
    # The conv saw bf16 signs and bf16(sign(w) * mean|w|): the float32 result of the same conv, rounded.
    scale = layer.weight.abs().mean()
    bw = (torch.sign(layer.weight) * scale).to(torch.bfloat16)
    expected = F.conv2d(torch.sign(x).to(torch.bfloat16), bw, layer.bias.to(torch.bfloat16), padding=1)
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- CUDA

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["reste", "ste", "approxsign", "ede"])
def test_cuda_estimator_op_matches_the_closed_form(kind):
    from reste_timm.nn.estimators import get_estimator

    est = get_estimator(kind)
    x = torch.randn(1 << 16, device="cuda", requires_grad=True)
    up = torch.randn(1 << 16, device="cuda")
    y = est(x, 2.4, 0.3)
    assert torch.equal(y, torch.sign(x))
    y.backward(up)
    expected = est.factor(x.detach().double(), 2.4, 0.3) * up.double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=2e-6, atol=2e-6)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("binarize_input", [True, False], ids=["1w1a", "1w32a"])
def test_cuda_conv_op_matches_the_cpu(binarize_input):
    torch.manual_seed(3)
    layer = BinaryConv2d(8, 16, 3, padding=1, binarize_input=binarize_input).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        layer.to(device).zero_grad()
        xi = x.to(device).requires_grad_()
        out = layer(xi)
        out.square().sum().backward()
        results.append([t.cpu() for t in (out, xi.grad, layer.weight.grad)])
    for cpu, gpu in zip(*results, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-9)


@cuda
@pytest.mark.cuda
def test_cuda_training_step_bf16_autocast_and_compile():
    torch.manual_seed(4)
    model = timm.create_model("resnet20_1w1a_reste").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiled = torch.compile(model)
    x, y = _digits_batch(32, "cuda")
    counters.clear()
    for step in range(4):
        reste_timm.set_exponent(model, 1.0 + 0.5 * step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert counters["stats"]["unique_graphs"] == 1
