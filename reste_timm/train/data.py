"""One loader on Hugging Face ``datasets`` for every data source of the training script.

Sources (``--dataset``): ``digits`` (scikit-learn's bundled 8x8 handwritten digits upscaled to
32x32 RGB; the embedded default, no download), ``cifar10-py`` (the reference code's
``cifar-10-batches-py`` folder), ``imagefolder`` (``train/`` and ``val/`` class folders), ``parquet``
and ``arrow`` files, or any Hub image-classification dataset id (``uoft-cs/cifar10``,
``ILSVRC/imagenet-1k``), optionally streamed. Every source ends as ``datasets`` splits with one image
column and one integer label column; images are decoded here (not by ``datasets``) so that a bad file
is named, and optionally skipped and counted.
"""

from __future__ import annotations

import io
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image as PILImage

__all__ = ["DataSplits", "KNOWN_SOURCES", "DataError", "is_hub_dataset_id", "load_splits",
           "build_transforms", "default_recipe", "EpochShuffleSampler", "ImageTransform", "SeededAugment",
           "collate_images", "decode_image", "digits_arrays"]

KNOWN_SOURCES = ("digits", "cifar10-py", "imagefolder", "parquet", "arrow")
_VAL_SPLITS = ("validation", "val", "test")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DataError(ValueError):
    """A data problem; the message names the source, file, split or column."""


def is_hub_dataset_id(name: str) -> bool:
    """True for ``org/name`` ids."""
    return bool(_HUB_ID.match(name))


@dataclass
class DataSplits:
    """Train and validation splits with the columns to read."""

    train: Any
    val: Any
    num_classes: int
    image_column: str
    label_column: str
    class_names: Optional[List[str]] = None


def digits_arrays(size: int = 32) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 RGB ``size`` x ``size`` images, stratified 80/20 split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``, images NHWC uint8.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # values 0..16
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8).repeat(1, 3, 1, 1)
    x = x.permute(0, 2, 3, 1).numpy()
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_tr, y_tr, x_te, y_te


def _arrays_to_dataset(x: np.ndarray, y: np.ndarray, names: List[str]):
    """Arrays into a ``datasets.Dataset`` with an ``Image`` column (PNG-encoded, as on the Hub)."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(x), "label": y.tolist()}, features=features)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches while refusing every global but numpy's array rebuilders.

    The reference's CIFAR folder is pickled; this keeps a hostile file from running code.
    """

    _ALLOWED = {(f"numpy{core}.multiarray", name) for core in (".core", "._core")
                for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing (expected a cifar-10-batches-py folder)")
    try:
        with path.open("rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({e})") from None


def _cifar10_py(folder: str) -> Tuple[Any, Any, List[str]]:
    root = Path(folder)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    meta = _read_cifar_batch(root / "batches.meta")
    names = [str(n) for n in meta["label_names"]]

    def load(files):
        batches = [_read_cifar_batch(root / f) for f in files]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        y = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        return _arrays_to_dataset(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y, names)

    train_files = sorted(p.name for p in root.glob("data_batch_*"))
    if not train_files:
        raise DataError(f"{root}: no data_batch_* files")
    return load(train_files), load(["test_batch"]), names


def _pick_split(splits, wanted: Optional[str], candidates, what: str, source: str) -> str:
    names = list(splits.keys())
    if wanted:
        if wanted not in names:
            raise DataError(f"{source}: no {what} split {wanted!r} (splits: {', '.join(names)})")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"{source}: no {what} split among {', '.join(candidates)} (splits: {', '.join(names)})")


def _load_dict(dataset: str, data_path: Optional[str], streaming: bool):
    """The source as a ``DatasetDict`` (or ``IterableDatasetDict`` when streaming)."""
    import datasets

    if dataset in ("imagefolder", "parquet", "arrow"):
        root = Path(data_path)
        if not root.exists():
            raise DataError(f"{data_path}: data path does not exist")
    if dataset == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=str(root))
    if dataset == "arrow" and root.is_dir() and (root / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(root))
    if dataset in ("parquet", "arrow"):
        ext = dataset
        files = {}
        for split in ("train",) + _VAL_SPLITS:
            found = sorted(str(p) for p in root.glob(f"**/{split}*.{ext}"))
            if found:
                files[split] = found
        if not files:
            raise DataError(f"{data_path}: no train*.{ext} / val*.{ext} / test*.{ext} files")
        return datasets.load_dataset(ext, data_files=files)
    return datasets.load_dataset(dataset, streaming=streaming)


def _detect_columns(features, image_column: Optional[str], label_column: Optional[str], source: str):
    from datasets import ClassLabel, Image

    cols = list(features.keys())
    for name in (image_column, label_column):
        if name and name not in cols:
            raise DataError(f"{source}: no column {name!r} (columns: {', '.join(cols)})")
    image_column = image_column or next((c for c in cols if isinstance(features[c], Image)), None)
    label_column = label_column or next((c for c in cols if isinstance(features[c], ClassLabel)), None) \
        or next((c for c in ("label", "labels") if c in cols), None)
    if image_column is None or label_column is None:
        raise DataError(f"{source}: cannot tell the image and label columns (columns: {', '.join(cols)}); "
                        "name them with --image-column / --label-column")
    return image_column, label_column


def load_splits(dataset: str, data_path: Optional[str] = None, image_column: Optional[str] = None,
                label_column: Optional[str] = None, train_split: str = "train",
                val_split: Optional[str] = None, streaming: bool = False) -> DataSplits:
    """Loads train and validation splits of any supported source.

    Raises:
        DataError: a missing path, split or column, or an empty split; the message names it.
    """
    from datasets import ClassLabel, Image

    if dataset == "digits":
        x_tr, y_tr, x_te, y_te = digits_arrays()
        names = [str(i) for i in range(10)]
        train, val = _arrays_to_dataset(x_tr, y_tr, names), _arrays_to_dataset(x_te, y_te, names)
    elif dataset == "cifar10-py":
        if not data_path or not Path(data_path).exists():
            raise DataError(f"{data_path}: data path does not exist")
        train, val, names = _cifar10_py(data_path)
    else:
        source = data_path or dataset
        try:
            splits = _load_dict(dataset, data_path, streaming)
        except (OSError, ValueError, ConnectionError) as e:
            if isinstance(e, DataError):
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            what = "a split is empty" if "corresponds to no data" in first else "cannot load"
            raise DataError(f"{source}: {what} ({first})") from None
        train = splits[_pick_split(splits, train_split, (), "train", source)]
        val = splits[_pick_split(splits, val_split, _VAL_SPLITS, "validation", source)]
    image_column, label_column = _detect_columns(train.features, image_column, label_column,
                                                 data_path or dataset)
    label_feature = train.features[label_column]
    if isinstance(label_feature, ClassLabel):
        num_classes, names = label_feature.num_classes, list(label_feature.names)
    elif streaming:
        raise DataError(f"{dataset}: streaming needs a ClassLabel column to know the number of classes")
    else:
        num_classes, names = int(max(train[label_column])) + 1, None
    for split_name, split in (("train", train), ("validation", val)):
        if not streaming and len(split) == 0:
            raise DataError(f"{data_path or dataset}: the {split_name} split is empty")
    if isinstance(train.features[image_column], Image):
        # Decode ourselves: a corrupt file can then be named, and optionally skipped.
        train = train.cast_column(image_column, Image(decode=False))
        val = val.cast_column(image_column, Image(decode=False))
    return DataSplits(train, val, num_classes, image_column, label_column, names)


def decode_image(value: Any) -> PILImage.Image:
    """A PIL image from what a ``datasets`` image column holds (bytes, a path, an array or an image)."""
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return PILImage.open(io.BytesIO(value["bytes"]))
        return PILImage.open(value["path"])
    return PILImage.fromarray(np.asarray(value, dtype=np.uint8))


def _describe(value: Any, index: Any) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"example {index}"


class ImageTransform:
    """``datasets`` batch transform: decode, check the label, apply torchvision transforms.

    Args:
        transform: torchvision/timm transform from a PIL image to a tensor.
        image_column: Column holding the images.
        label_column: Column holding integer labels.
        num_classes: Labels must lie in ``[0, num_classes)``.
        skip_bad: Return None for an unreadable image instead of raising; the collate counts them.
    """

    def __init__(self, transform: Callable, image_column: str, label_column: str, num_classes: int,
                 skip_bad: bool = False):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.num_classes = num_classes
        self.skip_bad = skip_bad

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        images, labels = [], []
        for i, (value, label) in enumerate(zip(batch[self.image_column], batch[self.label_column],
                                               strict=True)):
            if not 0 <= int(label) < self.num_classes:
                raise DataError(f"{_describe(value, i)}: label {label} outside [0, {self.num_classes})")
            try:
                image = decode_image(value).convert("RGB")
                images.append(self.transform(image))
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise DataError(f"{_describe(value, i)}: unreadable image ({e}); "
                                    "--skip-bad-images skips and counts such files") from None
                images.append(None)
            labels.append(int(label))
        return {"pixel_values": images, "label": labels}


def collate_images(examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stacks examples, dropping the unreadable ones (None) and counting them in ``skipped``."""
    kept = [e for e in examples if e["pixel_values"] is not None]
    if not kept:
        return {"pixel_values": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                "skipped": torch.tensor(len(examples))}
    return {"pixel_values": torch.stack([e["pixel_values"] for e in kept]),
            "label": torch.tensor([e["label"] for e in kept], dtype=torch.long),
            "skipped": torch.tensor(len(examples) - len(kept))}


def default_recipe(dataset: str, input_size: Tuple[int, int, int]) -> str:
    """``digits`` for the digits, ``cifar`` for inputs up to 64 px, else ``imagenet``."""
    if dataset == "digits":
        return "digits"
    return "cifar" if input_size[-1] <= 64 else "imagenet"


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation drawn from ``seed + epoch``: the order of an epoch never depends on the past,
    so a resumed run shuffles exactly like an uninterrupted one. Call ``set_epoch`` every epoch
    (accelerate's prepared loader forwards its own ``set_epoch`` here)."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class SeededAugment(torch.utils.data.Dataset):
    """A map-style dataset whose examples draw their random augmentation from ``(seed, epoch, index)``.

    torchvision and timm transforms draw from the global torch and ``random`` generators, so an
    example's crop would depend on everything drawn before it, including the batch a DataLoader
    prefetches before a checkpoint. Seeding each example on its own makes it independent of that:
    a run resumed mid-epoch (its loader skipping the batches already done) sees exactly the batches
    of an uninterrupted one, on any number of workers. The global generators are restored after.

    Args:
        dataset: The dataset, with its transform set (e.g. :class:`ImageTransform`).
        seed: Base seed of the run.
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)) % (2**63)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(python_state)

    def __getitems__(self, indices: List[int]) -> List[Any]:
        return [self[i] for i in indices]


def build_transforms(recipe: str, input_size: Tuple[int, int, int], mean, std,
                     crop_pct: float = 0.875) -> Tuple[Callable, Callable]:
    """Train and eval transforms of docs/method.md section 6, from torchvision and timm helpers.

    ``cifar``: random crop with 4-pixel padding, horizontal flip, normalise. ``digits``: the same
    without the flip (a mirrored digit is another glyph). ``imagenet``: timm's RandomResizedCrop with
    scale (0.08, 1.25) and flip; eval resizes to size/crop_pct and center-crops.
    """
    import torchvision.transforms as T
    from timm.data import create_transform

    size = input_size[-1]
    if recipe == "imagenet":
        train = create_transform(input_size, is_training=True, scale=(0.08, 1.25), hflip=0.5,
                                 color_jitter=None, interpolation="bilinear", mean=mean, std=std)
        val = create_transform(input_size, is_training=False, crop_pct=crop_pct,
                               interpolation="bilinear", mean=mean, std=std)
        return train, val
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [T.Resize((size, size))]
    flip = [T.RandomHorizontalFlip()] if recipe == "cifar" else []
    train = T.Compose(resize + [T.RandomCrop(size, padding=4)] + flip + norm)
    return train, T.Compose(resize + norm)
