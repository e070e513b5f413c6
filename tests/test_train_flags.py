"""Every training flag of ``reste-timm train``, each run for real and checked for its effect.

The runs call :func:`reste_timm.train.run.main` in this process (a few steps of the digits or of a
tiny image folder) and watch it through global hooks, changing no code of the run: a module forward
hook sees what each layer received and returned, an optimizer step hook counts the steps and sees the
optimizer. Runs that need several processes go through ``accelerate launch`` and
tests/fault_helpers/observe_train.py, which records the same things per process. The recipe's
numbers are checked against the paper's (docs/method.md, section 6).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from conftest import ROOT, launch_two_cpu_processes, make_image_folder, run_script
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from reste_timm import save_pretrained
from reste_timm.nn import BinaryConv2d
from reste_timm.train.config import packaged_configs, parse_config
from reste_timm.train.loop import build_lr_scheduler, build_optimizer, lr_factor
from reste_timm.train.run import main

MODEL = "resnet20_1w1a_reste"
OP_BACKWARD = "GeneratedBackwardFor_reste_timm_binary_conv2d_defaultBackward"
TINY = ["--dataset", "digits", "--model", MODEL, "--batch-size", "32", "--val-batch-size", "120",
        "--max-train-steps", "3", "--epochs", "1", "--report-to", "none", "--no-cpu-malloc-tuning"]
OBSERVE = str(ROOT / "tests" / "fault_helpers" / "observe_train.py")

def _reset_accelerate() -> None:
    # accelerate keeps one process-wide state, fixed by the first Accelerator (mixed precision...):
    # each in-process run gets a fresh one, as a new process would.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_process_state():
    """A fresh accelerate state for every run, and the ACCELERATE_* variables restored after it."""
    env = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    _reset_accelerate()
    yield
    _reset_accelerate()
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]
    os.environ.update(env)


class Observed:
    """What a run did, as the global hooks saw it."""

    def __init__(self):
        self.binary = []  # (output dtype, output grad_fn name, input is channels_last) per training call
        self.train_inputs = []  # the model's input, per training batch
        self.val_inputs = []  # the model's input, per evaluation batch of the trained model
        self.modules = set()  # class names of the modules that ran a training forward
        self.optimizers = []  # the optimizer, once per step
        self.first_params = None  # the model's parameters at its first training batch (before any step)

    def forward(self, module, inputs, output):
        if module.training:
            self.modules.add(type(module).__name__)
        if isinstance(module, BinaryConv2d) and module.training:
            x = inputs[0]
            self.binary.append((output.dtype, type(output.grad_fn).__name__,
                                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        if hasattr(module, "pretrained_cfg"):  # a timm model's top level: one call per batch
            (self.train_inputs if module.training else self.val_inputs).append(inputs[0].detach().clone())
            if module.training and self.first_params is None:
                self.first_params = {k: v.detach().clone() for k, v in module.named_parameters()}

    def step(self, optimizer, args, kwargs):
        self.optimizers.append(optimizer)


@contextlib.contextmanager
def observe():
    seen = Observed()
    hooks = [register_module_forward_hook(seen.forward), register_optimizer_step_post_hook(seen.step)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def train(out: Path, *flags, base=TINY):
    """Runs ``reste-timm train`` in this process; returns its exit code and what the hooks saw."""
    with observe() as seen:
        code = main.__wrapped__([*base, *map(str, flags), "--output-dir", str(out)])
    return code, seen


def read_metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- precision

@pytest.mark.slow
def test_bf16_autocast_runs_the_binary_conv_op_in_bf16(tmp_path):
    code, seen = train(tmp_path / "bf16", "--mixed-precision", "bf16")
    assert code == 0
    assert len(seen.binary) == 3 * 18  # 3 steps x the 18 binary convs of ResNet-20
    assert {dtype for dtype, _, _ in seen.binary} == {torch.bfloat16}
    assert {grad_fn for _, grad_fn, _ in seen.binary} == {OP_BACKWARD}  # the registered op, not a fallback
    record = read_metrics(tmp_path / "bf16")[0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])


@pytest.mark.slow
def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    # accelerate accepts --mixed-precision fp16 on CPU without a word and keeps autocast off there, so the
    # run would be float32: the command refuses it and names bf16.
    if torch.cuda.is_available():
        pytest.skip("on a GPU fp16 autocast runs: test_cuda_* cover it")
    code, seen = train(tmp_path / "fp16", "--mixed-precision", "fp16")
    assert code == 2 and not seen.binary
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("reste-timm train: error:")]
    assert "key 'mixed_precision'" in line and "bf16" in line
    assert not (tmp_path / "fp16").exists()


# ------------------------------------------------------------------------------------ optimisation

@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_grad_accum_steps_the_optimizer_once_per_accum_batches(tmp_path, accum):
    code, seen = train(tmp_path / "run", "--grad-accum", accum, "--max-train-steps", 4)
    assert code == 0
    assert len(seen.train_inputs) == 4
    assert len(seen.optimizers) == 4 // accum


@pytest.mark.slow
def test_optimizer_and_schedule_in_a_run_are_the_papers(tmp_path):
    # Defaults are the paper's recipe: SGD, lr 0.1, momentum 0.9, weight decay 1e-4 on every parameter.
    code, seen = train(tmp_path / "run", "--epochs", 3, "--warmup-epochs", 1, "--max-train-steps", 1)
    assert code == 0
    optimizer = seen.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"], group["dampening"]) == (0.9, 1e-4,
                                                                                                 False, 0)
    n_params = sum(1 for _ in timm.create_model(MODEL, num_classes=10).parameters())
    assert len(group["params"]) == n_params  # BN and the classifier decay too
    # 1 warm-up epoch of 3: lr 0.1 * (0+1)/1, then cosine over the 2 others: 0.1 * 0.5 * (1 + cos(pi/2))
    assert [m["lr"] for m in read_metrics(tmp_path / "run")] == pytest.approx([0.1, 0.1, 0.05])


@pytest.mark.slow
@pytest.mark.parametrize("flag", [True, False], ids=["channels-last", "default"])
def test_channels_last_reaches_the_binary_convs(tmp_path, flag):
    code, seen = train(tmp_path / "run", *(["--channels-last"] if flag else []))
    assert code == 0 and len(seen.binary) == 3 * 18
    assert {cl for _, _, cl in seen.binary} == {flag}


@pytest.mark.slow
def test_two_workers_give_the_same_batches_bit_for_bit(tmp_path):
    # The DataLoader path (not --data-on-device): augmentation seeded per sample and epoch.
    runs = [train(tmp_path / f"w{n}", "--workers", n, "--epochs", 2) for n in (0, 2)]
    (code0, serial), (code2, parallel) = runs
    assert code0 == code2 == 0
    assert len(serial.train_inputs) == 6 and len(serial.val_inputs) == len(parallel.val_inputs) > 0
    for name in ("train_inputs", "val_inputs"):
        a, b = getattr(serial, name), getattr(parallel, name)
        assert len(a) == len(b)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
    assert not torch.equal(serial.train_inputs[0], serial.train_inputs[3])  # epoch 1 draws anew
    wa, wb = (load_file(tmp_path / f"w{n}" / "final" / "model.safetensors") for n in (0, 2))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------- outputs

@pytest.mark.slow
def test_tensorboard_event_file_holds_the_epoch_scalars(tmp_path):
    # tensorboard is in the dev extra: without it --report-to tensorboard would log nothing, silently.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code, _ = train(out, "--report-to", "tensorboard", "--epochs", 2, "--max-train-steps", 1,
                    base=[a for a in TINY if a not in ("--report-to", "none")])
    assert code == 0
    files = sorted(out.rglob("events.out.tfevents.*"))
    scalars = {}
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    metrics = read_metrics(out)
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "o"):
        assert [step for step, _ in scalars[key]] == [0, 1], key
        assert [v for _, v in scalars[key]] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


@pytest.mark.slow
def test_init_local_dir_fine_tunes_and_keeps_every_non_head_parameter(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model(MODEL, num_classes=7)  # another head: the run must make a 10-way one
    save_pretrained(source, tmp_path / "pretrained")
    out = tmp_path / "finetune"
    code, seen = train(out, "--init", f"local-dir:{tmp_path / 'pretrained'}", "--lr", 0, "--momentum", 0,
                       "--weight-decay", 0)
    assert code == 0 and len(seen.optimizers) == 3
    head = source.pretrained_cfg["classifier"]
    before = dict(source.named_parameters())
    after = load_file(out / "final" / "model.safetensors")
    assert after[f"{head}.weight"].shape == (10, before[f"{head}.weight"].shape[1])
    body = [k for k in before if not k.startswith(f"{head}.")]
    assert len(body) == len(before) - 2
    for key in body:
        assert torch.equal(after[key], before[key].detach()), key
    bn = "bn1.running_mean"  # the forward passes did run on these weights: BN statistics moved
    assert not torch.equal(after[bn], source.state_dict()[bn])


@pytest.mark.slow
def test_shipped_finetune_config_runs_as_shipped(tmp_path, monkeypatch):
    # It starts from local-dir:outputs/resnet20_1w1a_reste/final, relative to the working directory,
    # where `make train` saves its model: here a saved folder of another run stands in for it.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(11)
    trained = timm.create_model(MODEL, num_classes=10)
    save_pretrained(trained, Path("outputs/resnet20_1w1a_reste/final"))
    out = tmp_path / "finetuned"
    code, seen = train(out, "--config", "finetune/resnet20_1w1a_cifar10_to_digits", "--epochs", 1,
                       "--max-train-steps", 2, "--report-to", "none", "--no-cpu-malloc-tuning", base=[])
    assert code == 0
    for key, value in trained.named_parameters():  # the run began from the saved weights
        assert torch.equal(seen.first_params[key], value.detach()), key
    assert len(seen.optimizers) == 2
    record = read_metrics(out)[0]
    assert record["lr"] == 0.01 and record["val_count"] == 360  # the config's own settings
    assert (out / "final" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- data

def _image_folder_with_test_split(root: Path) -> Path:
    """train/ (12 images), val/ (7) and test/ (5): the splits train, validation and test."""
    make_image_folder(root)
    other = make_image_folder(root.parent / "other", n_val=(2, 3), seed=1)
    shutil.move(str(other / "val"), str(root / "test"))
    return root


def _parquet_with_three_splits(root: Path) -> Path:
    """train (6 images), val (4) and test (3) parquet files."""
    from datasets import ClassLabel, Dataset, Features, Image

    root.mkdir(parents=True)
    feats = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4), ("test", 3)):
        images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(n)]
        Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]},
                          features=feats).to_parquet(str(root / f"{split}-00000.parquet"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("source, make, train_split, train_size, val_split, val_size", [
    ("imagefolder", _image_folder_with_test_split, "validation", 7, "test", 5),
    ("parquet", _parquet_with_three_splits, "val", 4, "test", 3),
])
def test_train_and_val_split_names_choose_the_splits(tmp_path, source, make, train_split, train_size,
                                                     val_split, val_size):
    # By default these sources train on "train" and validate on "validation"/"val".
    data = make(tmp_path / "data")
    out = tmp_path / "run"
    code, seen = train(out, "--dataset", source, "--data-path", data, "--batch-size", 4,
                       "--val-batch-size", 2, "--train-split", train_split, "--val-split", val_split,
                       base=[a for a in TINY if a not in ("--dataset", "digits")])
    assert code == 0
    assert sum(x.shape[0] for x in seen.train_inputs) == train_size
    assert read_metrics(out)[0]["val_count"] == val_size


# ------------------------------------------------------------------------------------ sync BN, compile

@pytest.mark.slow
def test_sync_bn_replaces_every_batchnorm_in_one_process(tmp_path):
    code, seen = train(tmp_path / "run", "--sync-bn")
    assert code == 0
    assert "SyncBatchNorm" in seen.modules
    assert not {"BatchNorm1d", "BatchNorm2d"} & seen.modules


@pytest.mark.slow
def test_sync_bn_with_two_cpu_processes_is_refused_in_one_line(tmp_path):
    """torch's SyncBatchNorm synchronizes CUDA tensors only (DDP refuses it on CPU): the run says so at
    once instead of ending in a traceback; the one-process conversion is tested above."""
    data = make_image_folder(tmp_path / "imgs", n_train=(9, 9), n_val=(4, 3))
    launch = launch_two_cpu_processes()
    args = [OBSERVE, "--dataset", "imagefolder", "--data-path", str(data), "--model", MODEL,
            "--batch-size", "4", "--val-batch-size", "2", "--epochs", "1", "--report-to", "none", "--sync-bn",
            "--output-dir", str(tmp_path / "out")]
    proc = run_script(launch + args, env={"CUDA_VISIBLE_DEVICES": "", "OBSERVE_DIR": str(tmp_path / "seen")})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("reste-timm train: error:")]
    assert len(lines) == 1 and "key 'sync_bn'" in lines[0] and "CUDA tensors only" in lines[0]
    # no traceback from the run itself (the launcher still prints its summary of the exit codes)
    assert "reste_timm/train" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compile_with_step_annealing_keeps_one_train_and_one_eval_graph(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        code = main.__wrapped__([*TINY, "--compile", "--anneal", "step", "--epochs", "2",
                                 "--max-train-steps", "4", "--output-dir", str(tmp_path / "run")])
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert code == 0
    o = [m["o"] for m in read_metrics(tmp_path / "run")]
    assert o[0] == 1.0 < o[1]  # o moved every step (8 values), without recompiling:
    assert graphs <= 2, f"{graphs} graphs for a train and an eval pass"


# ----------------------------------------------------------------------------- the paper's recipe

def test_lr_factor_is_the_papers_warmup_then_cosine():
    # CIFAR: 1000 epochs, 5 of linear warm-up (e+1)/5, then cosine to 0 over the 995 others.
    factors = [lr_factor(e, 1000, 5) for e in range(1000)]
    assert factors[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert factors[502] > 0.5 > factors[503]  # half way through the cosine: e - 5 = 497.5
    assert 0 < factors[999] < 1e-4 and lr_factor(1000, 1000, 5) == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    # ImageNet: no warm-up, cosine over all epochs (250): half at 125
    assert lr_factor(0, 250) == 1.0 and lr_factor(125, 250) == pytest.approx(0.5)


def test_the_scheduler_steps_the_optimizer_lr_per_epoch():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = build_lr_scheduler(optimizer, 1000, 5)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1 * lr_factor(6, 1000, 5),
                                 0.1 * lr_factor(7, 1000, 5)])
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    assert len(group["params"]) == len(list(model.parameters()))  # BN's weight and bias decay too


CIFAR = {  # docs/method.md, section 6: epochs and batch per network; lr 0.1 etc. for all
    "cifar10/resnet20_1w1a_reste": (1000, 256), "cifar10/resnet20_1w32a_reste": (1000, 256),
    "cifar10/resnet20_bireal_1w1a_reste": (1000, 256), "cifar10/vgg_small_1w1a_reste": (1000, 256),
    "cifar10/resnet18_cifar_1w1a_reste": (2000, 96),
}
IMAGENET = {
    "imagenet/resnet18_1w1a_reste": (250, 750), "imagenet/resnet18_1w32a_reste": (250, 750),
    "imagenet/resnet34_1w1a_reste": (250, 750), "imagenet/resnet34_1w32a_reste": (250, 750),
    "imagenet/resnet18_1w1a_reste_e200_b750": (200, 750),
    "imagenet/resnet18_1w1a_reste_e200_b512": (200, 512),
    "imagenet/resnet18_1w1a_reste_e150_b512": (150, 512),
}


def test_packaged_configs_hold_the_papers_values():
    shipped = packaged_configs()
    papers = {name for name in shipped if name.startswith(("cifar10/", "imagenet/"))}
    assert set(CIFAR) | set(IMAGENET) == papers
    for name, (epochs, batch) in {**CIFAR, **IMAGENET}.items():
        args = parse_config(["--config", name, "--data-path", "/data"])
        cifar = name in CIFAR
        assert (args.epochs, args.batch_size) == (epochs, batch), name
        assert (args.lr, args.momentum, args.weight_decay) == (0.1, 0.9, 1e-4), name
        assert (args.o_end, args.seed, args.estimator) == (3.0, 1234, "reste"), name
        assert args.warmup_epochs == (5 if cifar else 0), name
        assert args.recipe == ("cifar" if cifar else "imagenet"), name
        if cifar:
            assert args.val_batch_size == 128, name  # the paper's test batch
        raw = yaml.safe_load(Path(shipped[name]).read_text())
        assert raw["model"] == args.model and timm.is_model(args.model), name
