"""Speed and size benchmarks of reste-timm, every comparison side by side in one process.

(a) ReSTE estimator forward+backward on 4M float32 values: ours (C loop, compiled, eager), the
    ``G(x) + (sign(x) - G(x)).detach()`` form, the reference's masked indexing
    (``baseline_masked.py``) and a two-pass floor (``sign`` forward, one multiply backward).
(b) Training-step throughput (SGD step, random data) and peak step memory of each binary model
    against its full-precision twin at the same batch.
(c) Packed export: file sizes against float32 safetensors, and inference latency of the rebuilt
    model (``load_packed``) against the float one.
(d) Bitwise inference (``benchmarks/deploy.py``): each ResNet-18 3x3 layer and whole models on
    packed signs against the float-simulated model.

Usage: ``python benchmarks/run.py [--device cpu|cuda] [--threads 2] [--json out.json] [--quick]
[--malloc tuned|default] [--part estimator|training|packed|deploy ...] [--model resnet20 ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from baseline_masked import masked_sign_reste  # noqa: E402
from deploy import bench_deploy, print_deploy  # noqa: E402
from timing import interleaved, peak_step_memory, stats  # noqa: E402

import reste_timm  # noqa: E402, F401  (registers the models)
from reste_timm.analysis import summary  # noqa: E402
from reste_timm.hub import export_packed, load_packed  # noqa: E402
from reste_timm.nn.estimators import hyperparameters, native_kernels, sign  # noqa: E402
from reste_timm.nn.native import cpuinfo_line  # noqa: E402
from reste_timm.train.allocator import tune_cpu_allocator  # noqa: E402

_PARTS = ("estimator", "training", "packed", "deploy")
O_BENCH = 3.0  # the paper's o_end: a general exponent (no sqrt shortcut in pow)


class _Floor(torch.autograd.Function):
    """The least any sign estimator can do: one pass forward, one multiply backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


def reste_detach_form(x: torch.Tensor, o: float, t: float = 1.5, m: float = 0.1) -> torch.Tensor:
    """ReSTE as ``G(x) + (sign(x) - G(x)).detach()`` (docs/method.md, section 1), built from autograd ops."""
    ax, s = x.abs(), torch.sign(x)
    # clamp_min(m) keeps pow's gradient finite at 0 (that branch is not selected there anyway).
    power = torch.where(ax <= t, s * ax.clamp_min(m).pow(1.0 / o), s * t ** (1.0 / o))
    g = torch.where(ax <= m, x * (m ** (1.0 / o) / m), power)
    return g + (s - g).detach()


def bench_estimator(device: torch.device, quick: bool) -> dict:
    n = 4_000_000
    x = torch.randn(n, device=device, requires_grad=True)
    grad = torch.randn(n, device=device)

    def case(fn, native=True):
        def run():
            with native_kernels(native):
                x.grad = None
                fn(x).backward(grad)
        return run

    hp = hyperparameters(O_BENCH, 0.0, device=device)
    cases = {"ours (default: the op, C on CPU)": case(lambda t: sign(t, hp, "reste"))}
    if device.type == "cpu":
        cases["ours (the op, torch implementation)"] = case(lambda t: sign(t, hp, "reste"), False)
    cases.update({
        "detach form G+(sign-G).detach()": case(lambda t: reste_detach_form(t, O_BENCH)),
        "masked indexing (reference)": case(lambda t: masked_sign_reste(t, O_BENCH)),
        "floor: sign + 1 multiply": case(_Floor.apply),
    })
    times = interleaved(cases, rounds=5 if quick else 20, device=device, warmup=1 if quick else 2)
    rows = {name: stats(t) for name, t in times.items()}
    masked, floor = rows["masked indexing (reference)"], rows["floor: sign + 1 multiply"]
    for row in rows.values():
        row["speedup_vs_masked"] = masked["median_s"] / row["median_s"]
        row["speedup_vs_masked_min"] = masked["min_s"] / row["min_s"]
        row["x_floor"] = row["median_s"] / floor["median_s"]
        row["x_floor_min"] = row["min_s"] / floor["min_s"]
    return {"numel": n, "dtype": "float32", "o": O_BENCH, "rows": rows}


def _trainer(name: str, batch: int, size: int, device: torch.device):
    torch.manual_seed(0)
    # "name:fp" is the same architecture with ordinary convs (binary=False).
    arch, _, variant = name.partition(":")
    model = timm.create_model(arch, **({"binary": False} if variant == "fp" else {})).to(device).train()
    reste_timm.set_exponent(model, 2.0)  # mid-schedule; the fused kernel's cost does not depend on o
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


# (binary model, full-precision twin, batch, input size, rounds, rounds when --quick (0: skipped))
_PAIRS = [
    # 60 rounds: a step's time here varies by 15-30% from round to round, so the median of 20 moved
    # the ratio by +-0.04 between runs of the same code.
    ("resnet20_1w1a_reste", "resnet20_cifar_fp", 128, 32, 60, 3),
    ("resnet18_cifar_1w1a_reste", "resnet18_cifar_fp", 128, 32, 5, 0),
    ("vgg_small_1w1a_reste", "vgg_small_fp", 128, 32, 5, 0),
    # No FP twin is registered for the ImageNet model: the same architecture with binary=False.
    ("resnet18_1w1a_reste", "resnet18_1w1a_reste:fp", 16, 224, 5, 0),
]


def bench_training(device: torch.device, quick: bool, models: Optional[list] = None) -> list:
    results = []
    for binary, fp, batch, size, rounds, quick_rounds in _PAIRS:
        rounds = quick_rounds if quick else rounds
        if not rounds or (models and not any(m in binary for m in models)):
            continue
        steps = {binary: _trainer(binary, batch, size, device), fp: _trainer(fp, batch, size, device)}
        times = interleaved(steps, rounds=rounds, device=device, warmup=1)
        row = {"binary": binary, "fp": fp, "batch": batch, "input": size}
        for role, name in (("binary", binary), ("fp", fp)):
            s = stats(times[name])
            row[f"{role}_img_s"] = batch / s["median_s"]
            row[f"{role}_img_s_best"] = batch / s["min_s"]
            row[f"{role}_cpu_s"] = s["cpu_median_s"]
            row[f"{role}_faults"] = s["faults_median"]
            # --quick skips the profiled step on CPU (the profiler costs seconds per step).
            row[f"{role}_peak"] = (peak_step_memory(steps[name], device) if not quick or device.type == "cuda"
                                   else {"peak_bytes": None, "method": "skipped (--quick)"})
        row["ratio"] = row["binary_img_s"] / row["fp_img_s"]
        row["ratio_best"] = row["binary_img_s_best"] / row["fp_img_s_best"]
        row["ratio_cpu"] = row["fp_cpu_s"] / row["binary_cpu_s"]
        # Each round's own ratio (its two steps ran back to back), then their median.
        pairs = zip(times[fp]["wall"], times[binary]["wall"], strict=True)
        row["ratio_paired"] = statistics.median(f / b for f, b in pairs)
        results.append(row)
        print(f"  {binary} vs {fp}: {row['binary_img_s']:.1f} vs {row['fp_img_s']:.1f} img/s", flush=True)
    return results


def _file_sizes(name: str, tmp: Path) -> dict:
    from safetensors.torch import save_file

    model = timm.create_model(name).eval()
    float_file = tmp / f"{name}_float32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_file))
    row = {"model": name, "float32_bytes": float_file.stat().st_size}
    for dtype in ("float16", "float32"):
        folder = export_packed(model, tmp / f"{name}_packed_{dtype}", float_dtype=dtype)
        row[f"packed_{dtype}_bytes"] = (folder / "model.safetensors").stat().st_size
        row[f"ratio_{dtype}"] = row[f"packed_{dtype}_bytes"] / row["float32_bytes"]
    row["summary_compression"] = summary(model, print_fn=None)["compression"]
    return row


def _randomize_bn(model: torch.nn.Module) -> None:
    # Fresh BatchNorm statistics (mean 0, var 1) hide any error in the stored ones; perturb them.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _latency(device: torch.device, quick: bool, tmp: Path) -> dict:
    name, batch, size = ("resnet20_1w1a_reste", 8, 32) if quick else ("resnet18_1w1a_reste", 1, 224)
    model = timm.create_model(name).eval()
    _randomize_bn(model)
    out = {"model": name, "batch": batch, "input": size}
    for dtype in ("float32", "float16"):
        export_packed(model, tmp / f"lat_{dtype}", float_dtype=dtype)
    packed = load_packed(tmp / "lat_float32", device=device)
    cached = load_packed(tmp / "lat_float32", device=device, cache_weights=True)
    packed16 = load_packed(tmp / "lat_float16", device=device)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        ref = model(x)
        for label, other in (("float32", packed), ("float16", packed16)):
            pred = other(x)
            out[f"max_abs_logit_diff_{label}"] = (pred - ref).abs().max().item()
            out[f"same_top1_{label}"] = bool((pred.argmax(1) == ref.argmax(1)).all())
        cands = {"source model": lambda: model(x), "load_packed": lambda: packed(x),
                 "load_packed(cache_weights=True)": lambda: cached(x)}
        times = interleaved(cands, rounds=5 if quick else 15, device=device, warmup=1)
    out["latency"] = {k: stats(v) for k, v in times.items()}
    return out


def bench_packed(device: torch.device, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = [_file_sizes(n, tmp) for n in ("resnet20_1w1a_reste", "resnet18_1w1a_reste")]
        latency = _latency(device, quick, tmp)
    return {"sizes": sizes, "latency": latency}


def _print_estimator(res: dict) -> None:
    print(f"\n(a) ReSTE estimator forward+backward, {res['numel']:,} {res['dtype']}, o={res['o']}")
    print(f"{'candidate':<34} {'median ms':>10} {'min ms':>8} {'x faster than masked':>21} "
          f"{'x floor (min)':>14}")
    for name, r in res["rows"].items():
        print(f"{name:<34} {1e3 * r['median_s']:>10.2f} {1e3 * r['min_s']:>8.2f} "
              f"{r['speedup_vs_masked']:>12.1f} (min {r['speedup_vs_masked_min']:>4.1f}) "
              f"{r['x_floor']:>7.2f} ({r['x_floor_min']:.2f})")


def _print_training(rows: list) -> None:
    print("\n(b) Training step (SGD, random data): img/s median (best); ratio binary/FP of the medians "
          "(of the bests; of the process CPU times; median of each round's ratio); peak step memory MB")
    print(f"{'binary model':<27} {'FP twin':<26} {'batch':>5} {'binary img/s':>15} {'FP img/s':>15} "
          f"{'ratio (best; cpu; paired)':>26} {'peak MB bin/FP':>15} {'faults/step bin/FP':>19}")
    for r in rows:
        peaks = [r[f"{role}_peak"]["peak_bytes"] for role in ("binary", "fp")]
        mem = "-" if None in peaks else f"{peaks[0] / 1e6:.0f}/{peaks[1] / 1e6:.0f}"
        print(f"{r['binary']:<27} {r['fp']:<26} {r['batch']:>5} "
              f"{r['binary_img_s']:>7.1f} ({r['binary_img_s_best']:>5.1f}) "
              f"{r['fp_img_s']:>7.1f} ({r['fp_img_s_best']:>5.1f}) "
              f"{r['ratio']:>5.2f} ({r['ratio_best']:.2f}; {r['ratio_cpu']:.2f}; {r['ratio_paired']:.2f}) "
              f"{mem:>15} "
              f"{r['binary_faults']:>9.0f}/{r['fp_faults']:.0f}")
    if rows:
        print(f"  peak memory: {rows[0]['binary_peak']['method']}")


def _print_packed(res: dict) -> None:
    print("\n(c) Packed export (1-bit binary convs) vs float32 safetensors")
    print(f"{'model':<22} {'float32 MB':>11} {'packed fp16 MB':>15} {'ratio':>7} {'packed fp32 MB':>15} "
          f"{'ratio':>7} {'summary x':>10}")
    for r in res["sizes"]:
        print(f"{r['model']:<22} {r['float32_bytes'] / 1e6:>11.2f} {r['packed_float16_bytes'] / 1e6:>15.3f} "
              f"1/{1 / r['ratio_float16']:>5.1f} {r['packed_float32_bytes'] / 1e6:>15.3f} "
              f"1/{1 / r['ratio_float32']:>5.1f} {r['summary_compression']:>10.1f}")
    lat = res["latency"]
    print(f"Inference latency, {lat['model']} batch {lat['batch']} at {lat['input']} px:")
    for name, s in lat["latency"].items():
        print(f"  {name:<34} median {1e3 * s['median_s']:8.2f} ms  min {1e3 * s['min_s']:8.2f} ms")
    print(f"  rebuilt vs source logits: max |diff| {lat['max_abs_logit_diff_float32']:.2e} (float32 rest, "
          f"same top-1: {lat['same_top1_float32']}), {lat['max_abs_logit_diff_float16']:.2e} (float16 rest, "
          f"same top-1: {lat['same_top1_float16']})")


def _cpu_model() -> str:
    """The CPU's name (the figures are this machine's)."""
    line = cpuinfo_line("model name", "Model", "CPU part")
    return line.split(":", 1)[1].strip() if line else platform.processor() or "unknown"


def _commit() -> str:
    """The checkout's commit, with ``+`` when the tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+" if dirty else "") if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and models (about a minute)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="CPU: tune glibc's allocator as train.py does (reste_timm.allocator), or not")
    parser.add_argument("--part", action="append", choices=_PARTS,
                        help="run only this part (repeatable); default: all four")
    parser.add_argument("--model", action="append",
                        help="training part: only the binary models whose name contains this (repeatable)")
    args = parser.parse_args(argv)
    parts = args.part or list(_PARTS)
    # One process, one allocator setting: every candidate of every comparison runs under the same one.
    malloc = "tuned" if args.malloc == "tuned" and tune_cpu_allocator() else "default"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
           "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "quick": args.quick,
           "cpu_model": _cpu_model(), "commit": _commit(), "loadavg_start": os.getloadavg(),
           "malloc": malloc}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    print(f"env: {env}", flush=True)
    results = {"env": env}
    if "estimator" in parts:
        results["estimator"] = bench_estimator(device, args.quick)
        _print_estimator(results["estimator"])
    if "training" in parts:
        results["training"] = bench_training(device, args.quick, args.model)
        _print_training(results["training"])
    if "packed" in parts:
        results["packed"] = bench_packed(device, args.quick)
        _print_packed(results["packed"])
    if "deploy" in parts and device.type == "cpu":
        results["deploy"] = bench_deploy(args.quick, args.threads)
        print_deploy(results["deploy"])
    env["loadavg_end"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min): start {env['loadavg_start']}, end {env['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
