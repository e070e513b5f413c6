"""Bitwise inference against the float-simulated model, side by side (part ``deploy`` of run.py).

(d1) Each 3x3 binary conv shape of ResNet-18 (ImageNet, 224 px): the bitwise conv on packed input bits
     (the ``reste_timm::bitwise_conv2d`` op, float output) against torch's float conv of the same layer
     as the float-simulated model runs it (``conv2d(sign(x), bw)``, channels_last, the weight cached);
     and the fused step (conv + relu + BatchNorm + residual, float and packed outputs) against the same
     float ops. Target: every layer >= 10x.
(d2) Whole models, ResNet-18 1W/1A (224 px) and ResNet-20 1W/1A (32 px), batch 1 and 8, 1 and 2 threads:
     ``reste_timm.deploy(model)`` against the source model with its weight cache on
     (``set_weight_cache``, the fastest float path). Target: ResNet-18, batch 1, 2 threads: >= 4x.
(d3) Weight memory: the binary convs' float32 weights against their packed bits.
"""

from __future__ import annotations

import copy
import statistics
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F
from timing import interleaved, stats

import reste_timm
from reste_timm.deployment.bitwise import BitwiseConv2d, bn_affine, kernel, kernel_path, pack_signs
from reste_timm.nn.bitconv import copy_bytes

RESNET18_LAYERS = [  # (input side, C_in, C_out, stride, how many in the network)
    (56, 64, 64, 1, 4), (56, 64, 128, 2, 1), (28, 128, 128, 1, 3), (28, 128, 256, 2, 1),
    (14, 256, 256, 1, 3), (14, 256, 512, 2, 1), (7, 512, 512, 1, 3),
]
LAYER_TARGET, MODEL_TARGET = 10.0, 4.0


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics of a trained network (fresh ones keep relu's exact zeros, unlike training)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def _repeat(fn, times: int):
    def run():
        for _ in range(times):
            fn()
    return run


def _layer_cases(side: int, cin: int, cout: int, stride: int, batch: int) -> Dict[str, object]:
    torch.manual_seed(side + cin)
    layer = reste_timm.BinaryConv2d(cin, cout, 3, stride=stride, padding=1, bias=False).eval()
    bn = _trained_like(torch.nn.BatchNorm2d(cout))
    bitwise, (alpha, beta) = BitwiseConv2d(layer), bn_affine(bn)
    x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
    signs, bw = torch.sign(x), layer.binary_weight().detach()
    bits, _, _ = pack_signs(x)
    out_side = (side + 2 - 3) // stride + 1
    residual = torch.randn(batch, cout, out_side, out_side).contiguous(memory_format=torch.channels_last)
    reps = max(1, 200 // (batch * side))  # a few ms per timed call
    return {
        "float conv": _repeat(lambda: F.conv2d(signs, bw, None, stride, 1), reps),
        "bitwise conv": _repeat(lambda: bitwise.packed(bits, None), reps),
        "float conv+relu+bn+add": _repeat(lambda: bn(F.relu(F.conv2d(signs, bw, None, stride, 1))) + residual,
                                          reps),
        "bitwise fused": _repeat(lambda: bitwise.packed(bits, None, relu=True, bn=(alpha, beta),
                                                        residual=residual, out_bits=True), reps),
    }, reps


@torch.no_grad()
def bench_layers(batch: int, rounds: int) -> List[dict]:
    rows = []
    for side, cin, cout, stride, count in RESNET18_LAYERS:
        cases, reps = _layer_cases(side, cin, cout, stride, batch)
        timed = interleaved(cases, rounds=rounds, device=torch.device("cpu"))
        times = {k: stats(v) for k, v in timed.items()}
        ms = {k: 1e3 * v["median_s"] / reps for k, v in times.items()}
        rows.append({"layer": f"{side}x{side} {cin}->{cout} s{stride}", "count": count, "batch": batch, **ms,
                     "ratio": ms["float conv"] / ms["bitwise conv"],
                     "ratio_fused": ms["float conv+relu+bn+add"] / ms["bitwise fused"]})
    return rows


@torch.no_grad()
def bench_models(batches, threads_list, rounds: int) -> List[dict]:
    rows = []
    for name, size in (("resnet18_1w1a_reste", 224), ("resnet20_1w1a_reste", 32)):
        torch.manual_seed(0)
        source = _trained_like(timm.create_model(name))
        float_model = copy.deepcopy(source)
        reste_timm.set_weight_cache(float_model, True)
        deployed = reste_timm.deploy(source)
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            same = bool(torch.equal(deployed(x).argmax(1), float_model(x).argmax(1)))
            cases = {"float": lambda m=float_model, x=x: m(x), "deploy": lambda m=deployed, x=x: m(x)}
            for threads in threads_list:
                torch.set_num_threads(threads)
                times = interleaved(cases, rounds=rounds, device=torch.device("cpu"), warmup=2)
                fl, dp = times["float"]["wall"], times["deploy"]["wall"]
                rows.append({"model": name, "batch": batch, "threads": threads, "same_top1": same,
                             "float_ms": 1e3 * statistics.median(fl),
                             "deploy_ms": 1e3 * statistics.median(dp),
                             "float_min_ms": 1e3 * min(fl), "deploy_min_ms": 1e3 * min(dp),
                             "ratio": statistics.median(fl) / statistics.median(dp),
                             "ratio_paired": statistics.median(f / d for f, d in zip(fl, dp, strict=True))})
    return rows


def weight_memory() -> dict:
    model = timm.create_model("resnet18_1w1a_reste")
    deployed = reste_timm.deploy(model)
    float_bytes = sum(m.weight.numel() * 4 for m in reste_timm.binary_layers(model))
    layers = [m.weight_bits for m in deployed.modules() if isinstance(m, BitwiseConv2d)]
    copies = sum(copy_bytes(w) for w in layers)
    packed = sum(w.numel() * 8 for w in layers) - copies
    return {"model": "resnet18_1w1a_reste", "binary_float32_bytes": float_bytes, "packed_bytes": packed,
            "ratio": float_bytes / packed, "path_copy_bytes": copies}


def bench_deploy(quick: bool, threads: int) -> dict:
    rounds = 5 if quick else 21
    torch.set_num_threads(threads)
    layers = {b: bench_layers(b, rounds) for b in ((1,) if quick else (1, 8))}
    models = bench_models((1,) if quick else (1, 8), (threads,) if quick else (1, 2), rounds)
    torch.set_num_threads(threads)
    path = kernel_path() + (" + amx" if kernel().amx else "")
    return {"kernel_path": path, "layers": layers, "models": models, "memory": weight_memory()}


def print_deploy(res: dict) -> None:
    print(f"\n(d) Bitwise inference (kernel path: {res['kernel_path']})")
    for batch, rows in res["layers"].items():
        print(f"ResNet-18 3x3 layers, batch {batch}: ms per call, median (target >= {LAYER_TARGET:g}x)")
        print(f"  {'layer':<22} {'n':>2} {'float':>8} {'bitwise':>8} {'ratio':>7} | {'float+ops':>9} "
              f"{'fused':>8} {'ratio':>7}")
        for r in rows:
            print(f"  {r['layer']:<22} {r['count']:>2} {r['float conv']:>8.3f} {r['bitwise conv']:>8.3f} "
                  f"{r['ratio']:>6.1f}x | {r['float conv+relu+bn+add']:>9.3f} {r['bitwise fused']:>8.3f} "
                  f"{r['ratio_fused']:>6.1f}x")
    print(f"Whole models: ms per forward, median (min); ratio of medians (paired); target ResNet-18 b1 2 "
          f"threads >= {MODEL_TARGET:g}x")
    for r in res["models"]:
        print(f"  {r['model']:<22} b{r['batch']} t{r['threads']}  float {r['float_ms']:8.2f} "
              f"({r['float_min_ms']:.2f})  deploy {r['deploy_ms']:7.2f} ({r['deploy_min_ms']:.2f})  "
              f"{r['ratio']:5.1f}x ({r['ratio_paired']:.1f}x)  same top-1: {r['same_top1']}")
    m = res["memory"]
    print(f"Weight memory of the binary convs, {m['model']}: {m['binary_float32_bytes'] / 1e6:.2f} MB "
          f"float32 -> {m['packed_bytes'] / 1e6:.2f} MB packed ({m['ratio']:.1f}x less)"
          + (f", plus {m['path_copy_bytes'] / 1e6:.2f} MB of copies for the {res['kernel_path']} path "
             "on this CPU" if m.get("path_copy_bytes") else ""))
