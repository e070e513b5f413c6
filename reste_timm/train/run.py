"""``reste-timm train``: train a binary timm model with ReSTE (or another estimator) through accelerate.

    accelerate launch -m reste_timm train --config cifar10/resnet20_1w1a_reste
    accelerate launch --multi_gpu --num_processes 8 -m reste_timm train --config CONFIG --data-path DIR
    accelerate launch scripts/train.py --config CONFIG --resume     # the same, from a checkout

The same code runs on CPU, one GPU, many GPUs and many nodes; :func:`main` only wires the pieces of
:mod:`reste_timm.train` together, as accelerate's examples do.

Exit codes (docs/RELIABILITY.md): 0 done; 1 a failed run (non-finite loss, a write that failed);
2 bad input (config, data, weights files, an output folder in use by another run); 3 trained and
saved, but the ``--push-to-hub`` upload failed; 75 preempted by SIGTERM or SIGUSR1, with a checkpoint
saved (continue with ``--resume``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from timm.data import resolve_data_config
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..files import CheckpointError, WriteError, atomic_write, first_line
from ..hub.save import push_folder, save_pretrained
from ..nn.annealing import ExponentAnnealing, annealed_exponent
from .allocator import tune_cpu_allocator
from .checkpoints import (
    MetricsLog,
    count_failures,
    latest_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .config import PROG, ConfigError, parse_config
from .data import (
    DataError,
    EpochShuffleSampler,
    ImageTransform,
    SeededAugment,
    build_transforms,
    collate_images,
    default_recipe,
    load_splits,
)
from .device_data import DeviceImageLoader
from .lock import FolderInUse, RunLock
from .loop import (
    NonFiniteLossError,
    TrainState,
    build_lr_scheduler,
    build_model,
    build_optimizer,
    evaluate,
    train_one_epoch,
)
from .preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch, ignore_preemption_signals

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PUSH_FAILED = 0, 1, 2, 3


def make_accelerator(args) -> Accelerator:
    tracker = args.report_to if args.report_to != "none" and importlib.util.find_spec("tensorboard") else None
    # accelerate picks gloo (MULTI_CPU) for a multi-process launch only when told it runs on CPU.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu, gradient_accumulation_steps=args.grad_accum,
                       mixed_precision=args.mixed_precision, log_with=tracker, project_dir=args.output_dir)


def check_device_flags(args, accelerator) -> None:
    """Refuses flags this device cannot honour, rather than running without them.

    Raises:
        ConfigError: ``--sync-bn`` with several CPU processes (torch's SyncBatchNorm syncs CUDA tensors
            only), or ``--mixed-precision fp16`` on CPU (accelerate would run it in float32).
    """
    cpu = accelerator.device.type == "cpu"
    if args.sync_bn and cpu and accelerator.num_processes > 1:
        raise ConfigError("key 'sync_bn': torch's SyncBatchNorm synchronizes CUDA tensors only; several CPU "
                          "processes cannot use it (drop --sync-bn)")
    if args.mixed_precision == "fp16" and cpu:
        raise ConfigError("key 'mixed_precision': fp16 autocast runs on GPUs only (accelerate would train in "
                          "float32 here); use bf16 on CPU")


def plain_model(accelerator, model):
    """The model without the wrappers of accelerate (DDP) and ``torch.compile``, as it is saved."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def make_model(args, num_classes: int):
    model = build_model(args.model, num_classes, args.estimator, init=args.init)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_loaders(args, splits, data_cfg, accelerator):
    """Train loader (device-resident or ``datasets`` + DataLoader) and the validation loader."""
    recipe = args.recipe or default_recipe(args.dataset, data_cfg["input_size"])
    train_tf, val_tf = build_transforms(recipe, data_cfg["input_size"], data_cfg["mean"], data_cfg["std"],
                                        data_cfg.get("crop_pct", 0.875))
    cols = (splits.image_column, splits.label_column, splits.num_classes)
    splits.val.set_transform(ImageTransform(val_tf, *cols, skip_bad=args.skip_bad_images))
    val = DataLoader(splits.val, batch_size=args.val_batch_size, num_workers=args.workers,
                     collate_fn=collate_images, worker_init_fn=ignore_preemption_signals)
    if args.data_on_device and recipe in ("cifar", "digits"):
        train = DeviceImageLoader(splits, args.batch_size, accelerator.device, data_cfg["mean"],
                                  data_cfg["std"], size=data_cfg["input_size"][-1], flip=recipe == "cifar",
                                  seed=args.seed, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes)
        return train, accelerator.prepare(val)
    if args.streaming:
        from datasets.distributed import split_dataset_by_node
        ds = splits.train.shuffle(seed=args.seed, buffer_size=10_000)
        ds = split_dataset_by_node(ds, accelerator.process_index, accelerator.num_processes)
        train = DataLoader(ds.map(ImageTransform(train_tf, *cols, args.skip_bad_images), batched=True),
                           batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_images,
                           worker_init_fn=ignore_preemption_signals)
        return train, accelerator.prepare(val)
    splits.train.set_transform(ImageTransform(train_tf, *cols, skip_bad=args.skip_bad_images))
    sampler = EpochShuffleSampler(len(splits.train), args.seed)
    train = DataLoader(SeededAugment(splits.train, args.seed), batch_size=args.batch_size, sampler=sampler,
                       drop_last=False, num_workers=args.workers, collate_fn=collate_images,
                       worker_init_fn=ignore_preemption_signals)
    return accelerator.prepare(train), accelerator.prepare(val)


def epoch_batches(loader, accelerator, epoch: int, skip: int):
    """The loader for one epoch, skipping ``skip`` batches already done (mid-epoch resume)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if isinstance(getattr(loader, "dataset", None), SeededAugment):
        loader.dataset.set_epoch(epoch)  # accelerate forwards set_epoch to the sampler only
    if skip and isinstance(loader, DeviceImageLoader):
        loader.skip = skip
    elif skip:
        skipped = accelerator.skip_first_batches(loader, skip)
        if hasattr(skipped, "set_epoch"):
            skipped.set_epoch(epoch)  # accelerate before 1.15 starts the skipping loader at epoch 0
        return skipped
    return loader


def write_config(args, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))


def resume_state(args, accelerator, checkpoints: Path, state: TrainState) -> bool:
    """Loads the latest complete checkpoint when ``--resume``; False when starting fresh.

    The ``.tmp-*`` folders of a run killed while writing a checkpoint are never loaded; they are
    deleted here, once no process can still be writing them.
    """
    if not args.resume:
        return False
    if accelerator.is_main_process:
        for name in remove_partial_checkpoints(checkpoints):
            accelerator.print(f"--resume: removed the partial checkpoint {checkpoints / name}")
    accelerator.wait_for_everyone()
    ckpt = latest_checkpoint(checkpoints)
    if ckpt is None:
        accelerator.print(f"--resume: no checkpoint under {checkpoints}, starting from scratch")
        return False
    accelerator.load_state(str(ckpt))
    accelerator.print(f"resumed from {ckpt} (epoch {state.epoch}, step {state.step_in_epoch} of it, "
                      f"global step {state.global_step})")
    return True


def log_epoch(accelerator, metrics_log, record) -> None:
    if accelerator.is_main_process:
        metrics_log.write(record)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["epoch"])
    accelerator.print(json.dumps(record))


def export_weights(args, accelerator, model, folder: Path, metrics, **card) -> None:
    """The main process saves ``folder`` (:func:`save_pretrained`); every process learns whether it worked.

    Raises:
        WriteError: The save failed (a full disk), on every process; the folder keeps its old files.
    """
    error = None
    if accelerator.is_main_process:
        try:
            save_pretrained(plain_model(accelerator, model), folder, metrics=metrics, train_config=vars(args),
                            dataset=args.dataset, **card)
        except Exception as e:  # noqa: BLE001  (re-raised below, once the other processes know)
            error = e
    if count_failures(accelerator, error):  # also the barrier: no process waits for a failed one
        if error is not None:
            raise error
        raise WriteError(folder, "not written: the save failed on the main process")


def step_hook(args, accelerator, state: TrainState, checkpoints: Path, watch: PreemptionWatch):
    """Runs after each step: ``--checkpoint-every``'s checkpoint, then, after each optimizer step, the
    preemption check (a collective), which saves a step checkpoint and raises :class:`Preempted`."""

    def on_step():
        name, saved = f"step_{state.global_step:08d}", None
        if args.checkpoint_every and state.global_step % args.checkpoint_every == 0:
            saved = save_checkpoint(accelerator, checkpoints, name, args.keep_checkpoints)
        if not accelerator.sync_gradients:  # between the micro-batches of one step: nothing to save yet
            return
        signal_name = watch.agreed(accelerator)
        if signal_name:
            saved = saved or save_checkpoint(accelerator, checkpoints, name, args.keep_checkpoints)
            raise Preempted(signal_name, state.epoch, state.step_in_epoch, saved)

    return on_step


def run_epochs(args, accelerator, model, optimizer, scheduler, annealing, state, loaders, output_dir, watch):
    """The epochs from ``state`` on: train, evaluate, export ``best/``, log, checkpoint.

    Raises:
        Preempted: A preemption signal arrived; a checkpoint was saved after the current step (or,
            when it came during evaluation, after the epoch).
    """
    train_loader, val_loader = loaders
    checkpoints = output_dir / "checkpoints"
    on_step = step_hook(args, accelerator, state, checkpoints, watch)
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resume_epoch=state.epoch if args.resume else None)
    last = state.epoch + args.stop_after_epochs if args.stop_after_epochs else args.epochs
    for epoch in range(state.epoch, min(last, args.epochs)):
        if state.step_in_epoch == 0:
            annealing.start_epoch(epoch)
        batches = epoch_batches(train_loader, accelerator, epoch, state.step_in_epoch)
        bar = tqdm(total=len(train_loader), initial=state.step_in_epoch, desc=f"epoch {epoch}",
                   disable=not accelerator.is_local_main_process, leave=False)

        # o at the epoch's start, computed: a mid-epoch resume restores the step's o (--anneal step)
        lr, o = optimizer.param_groups[0]["lr"], annealed_exponent(epoch, args.epochs, args.o_end)
        try:
            train = train_one_epoch(model, batches, optimizer, accelerator, annealing, state,
                                    channels_last=args.channels_last, skip_nonfinite=args.skip_nonfinite,
                                    cal_ind=args.cal_ind, o_end=args.o_end, max_steps=args.max_train_steps,
                                    on_step=on_step, progress=bar)
        finally:
            bar.close()  # clears the bar's line, so that an error message starts a line of its own
        val = evaluate(model, val_loader, accelerator, args.channels_last)
        scheduler.step()
        state.epoch, state.step_in_epoch = epoch + 1, 0
        record = dict(epoch=epoch, lr=lr, o=o, **train, **val, world_size=accelerator.num_processes,
                      skipped_nonfinite=state.skipped_nonfinite, skipped_images=state.skipped_images)
        if args.cal_ind:
            state.est_error_sum += train["estimating_error"]
            state.stability_sum += train["gradient_stability"] or 0.0
            state.ind_epochs += 1
            record.update(mean_estimating_error=state.est_error_sum / state.ind_epochs,
                          sum_gradient_stability=state.stability_sum)
        if val["val_top1"] > state.best_top1:
            state.best_top1, state.best_epoch = val["val_top1"], epoch
            export_weights(args, accelerator, model, output_dir / "best", {"top1": val["val_top1"],
                                                                           "top5": val["val_top5"]})
        log_epoch(accelerator, metrics_log, record)
        saved = save_checkpoint(accelerator, checkpoints, f"epoch_{epoch + 1:05d}", args.keep_checkpoints)
        signal_name = watch.agreed(accelerator)  # a signal met during evaluation: stop after the epoch
        if signal_name:
            raise Preempted(signal_name, state.epoch, 0, saved)


def finish(args, accelerator, model, val_loader, output_dir: Path, state) -> int:
    """Saves the final weights, reloads them through timm's ``local-dir:``, reports and pushes them.

    Returns:
        0, or 3 when the ``--push-to-hub`` upload failed (``final/`` is saved all the same).
    """
    final = output_dir / "final"
    val = evaluate(model, val_loader, accelerator, args.channels_last)
    card = {"repo_id": args.push_to_hub} if args.push_to_hub else {}  # the card's usage names the repo
    export_weights(args, accelerator, model, final, {"top1": val["val_top1"], "top5": val["val_top5"]},
                   **card)
    reloaded = timm.create_model(f"local-dir:{final}", pretrained=True).to(accelerator.device)
    check = evaluate(accelerator.prepare(reloaded), val_loader, accelerator)
    summary = dict(final_top1=check["val_top1"], final_top5=check["val_top5"], best_top1=state.best_top1,
                   best_epoch=state.best_epoch, weights=str(final), best_weights=str(output_dir / "best"))
    if accelerator.is_main_process:
        text = json.dumps(summary, indent=2)
        atomic_write(output_dir / "results.json", lambda p: p.write_text(text))
    accelerator.print(f"final test top-1 {check['val_top1']:.2f}% (top-5 {check['val_top5']:.2f}%) "
                      f"of the weights reloaded from local-dir:{final}; best {state.best_top1:.2f}% at epoch "
                      f"{state.best_epoch} in {output_dir / 'best'}")
    if args.push_to_hub and accelerator.is_main_process:
        return push_final(accelerator, final, args.push_to_hub)
    return EXIT_OK


def push_final(accelerator, final: Path, repo_id: str) -> int:
    """Uploads ``final/`` exactly as saved; on failure one line saying how to retry, and exit code 3."""
    try:
        info = push_folder(final, repo_id, commit_message="Add ReSTE model (reste-timm train)")
    except Exception as e:  # noqa: BLE001  (network and Hub errors have many types; all mean "not uploaded")
        return fail(accelerator, f"trained, but the upload of {final} to {repo_id} failed ({first_line(e)}); "
                    f"the model stays in {final}: retry with `reste-timm push {final} {repo_id}` "
                    f"(in Python: reste_timm.hub.push_folder({str(final)!r}, {repo_id!r}))", EXIT_PUSH_FAILED)
    accelerator.print(f"uploaded {final} to {getattr(info, 'commit_url', None) or repo_id}")
    return EXIT_OK


def fail(accelerator, message: str, code: int, every_rank: bool = False) -> int:
    """Prints one ``reste-timm train: error:`` line on stderr and returns the exit code.

    Setup errors are the same on every process and printed once; an error met during training may
    be one process's alone (its shard of the data), so with ``every_rank`` each prints its own.
    """
    if every_rank and accelerator.num_processes > 1:
        _write_line(f"{PROG}: error: [rank {accelerator.process_index}] {message}")
    elif accelerator.is_main_process:
        _write_line(f"{PROG}: error: {message}")
    return code


def _write_line(line: str) -> None:
    """Writes ``line`` and its newline to stderr in one write: processes that share stderr (every rank's
    error at once) then cannot interleave a line with another's (``print`` writes the two apart)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def setup(args, accelerator):
    """Data, model, loaders, optimiser, schedule, annealing and train state; writes nothing.

    Raises:
        DataError: A missing path, split or column, or an empty split.
        CheckpointError: ``--init`` weights that are missing, pickled, corrupt or mismatched.
    """
    check_device_flags(args, accelerator)
    splits = load_splits(args.dataset, args.data_path, args.image_column, args.label_column,
                         args.train_split, args.val_split, args.streaming)
    model = make_model(args, args.num_classes or splits.num_classes)
    data_cfg = resolve_data_config(model=model)
    loaders = make_loaders(args, splits, data_cfg, accelerator)
    optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay)
    scheduler = build_lr_scheduler(optimizer, args.epochs, args.warmup_epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.compile:
        model = torch.compile(model)
    annealing = ExponentAnnealing(model, args.epochs, args.o_end, len(loaders[0]), args.anneal == "step")
    state = TrainState()
    for obj in (scheduler, annealing, state):
        accelerator.register_for_checkpointing(obj)
    return model, optimizer, scheduler, annealing, state, loaders


def last_good(output_dir: Path) -> str:
    """Where a failed run can be continued from, for its error line."""
    ckpt = latest_checkpoint(output_dir / "checkpoints")
    return f"the last good checkpoint, {ckpt}, is kept (continue with --resume)" if ckpt else \
        "no checkpoint had been saved yet"


def lock_output(accelerator, output_dir: Path, argv) -> tuple:
    """The main process takes the output folder's lock; every process learns the outcome.

    Returns:
        The lock (None on the other processes) and None, or None and ``(exit code, message)`` when
        the folder is in use by a live run (2) or cannot be created (1).
    """
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir, argv)
            lock.acquire()
        except FolderInUse as e:
            lock, refused = None, (EXIT_BAD_INPUT, str(e))
        except WriteError as e:
            lock, refused = None, (EXIT_FAILED, str(e))
        if lock is not None and lock.took_over:
            _write_line(f"{PROG}: {output_dir} was locked by {lock.took_over}, which has ended: "
                        "lock taken over")
    if accelerator.num_processes > 1:
        refused = broadcast_object_list([refused])[0]  # no process starts a run the main one refused
    return lock, refused


def train(args, accelerator, watch: PreemptionWatch) -> int:
    """Setup, the epochs and the final export, each failure turned into one line and its exit code."""
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    try:
        model, optimizer, scheduler, annealing, state, loaders = setup(args, accelerator)
    except (ConfigError, DataError, CheckpointError) as e:
        return fail(accelerator, str(e), EXIT_BAD_INPUT)  # before anything is written
    try:
        if accelerator.is_main_process:
            write_config(args, output_dir)
        accelerator.init_trackers(output_dir.name, config={k: str(v) for k, v in vars(args).items()})
        resume_state(args, accelerator, output_dir / "checkpoints", state)
        signal_name = watch.agreed(accelerator)  # met during setup: stop before the first step
        if signal_name:
            raise Preempted(signal_name, state.epoch, state.step_in_epoch, None)
        run_epochs(args, accelerator, model, optimizer, scheduler, annealing, state, loaders, output_dir,
                   watch)
        code = finish(args, accelerator, model, loaders[1], output_dir, state) \
            if state.epoch >= args.epochs else EXIT_OK
    except Preempted as e:
        if accelerator.is_main_process:
            _write_line(f"{PROG}: {e}")
        code = EXIT_PREEMPTED
    except NonFiniteLossError as e:
        code = fail(accelerator, f"{e}; {last_good(output_dir)}", EXIT_FAILED)
    except DataError as e:
        code = fail(accelerator, f"{e}; {last_good(output_dir)}", EXIT_BAD_INPUT, every_rank=True)
    except OSError as e:  # WriteError (a full disk), or a log file that could not be written
        code = fail(accelerator, f"{e}; {last_good(output_dir)}", EXIT_FAILED, every_rank=True)
    accelerator.end_training()
    return code


@record  # under torchrun/accelerate launch, the failing rank's exception goes into the failure summary
def main(argv=None) -> int:
    """Runs ``reste-timm train``; returns the exit code (0, 1, 2, 3 or 75: see the module's docstring).

    SIGTERM and SIGUSR1 are handled while it runs (:class:`PreemptionWatch`), the output folder is
    locked (:class:`RunLock`); both are undone on every way out.
    """
    args = parse_config(argv)
    with PreemptionWatch() as watch:
        accelerator = make_accelerator(args)
        if args.cpu_malloc_tuning and accelerator.device.type == "cpu":
            tune_cpu_allocator()
        command = list(sys.argv) if argv is None else [PROG, *argv]
        lock, refused = lock_output(accelerator, Path(args.output_dir), command)
        if refused:
            return fail(accelerator, refused[1], refused[0])
        try:
            return train(args, accelerator, watch)
        finally:
            if lock is not None:
                lock.release()
