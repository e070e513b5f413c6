"""Every data source loads small data that the tests make; bad data gives errors that name it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from reste_timm.train.data import (
    DataError,
    ImageTransform,
    build_transforms,
    collate_images,
    digits_arrays,
    load_splits,
)
from reste_timm.train.device_data import DeviceImageLoader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def batch_of(splits, n=4, split="train", skip_bad=False):
    _, tf = build_transforms("cifar", (3, 32, 32), MEAN, STD)
    ds = getattr(splits, split)
    ds.set_transform(ImageTransform(tf, splits.image_column, splits.label_column, splits.num_classes,
                                    skip_bad=skip_bad))
    return collate_images([ds[i] for i in range(min(n, len(ds)))])


def test_digits_split_is_stratified_and_real():
    from sklearn.datasets import load_digits

    x_tr, y_tr, x_te, y_te = digits_arrays()
    assert x_tr.shape == (1437, 32, 32, 3) and x_te.shape == (360, 32, 32, 3) and x_tr.dtype == np.uint8
    digits = load_digits()
    per_class = np.bincount(digits.target)
    assert np.array_equal(np.bincount(y_tr, minlength=10) + np.bincount(y_te, minlength=10), per_class)
    # stratified 80/20: every class holds its 20% share of the test split, to within one image
    assert np.abs(np.bincount(y_te, minlength=10) - 0.2 * per_class).max() <= 1
    assert x_tr.max() == 255 and x_tr.min() == 0
    # real: at 8 px (no resampling) each image is a scikit-learn digit with its label, and all are there
    real = {np.round(img / 16 * 255).astype(np.uint8).tobytes(): [] for img in digits.images}
    for img, label in zip(digits.images, digits.target, strict=True):
        real[np.round(img / 16 * 255).astype(np.uint8).tobytes()].append(int(label))
    small = digits_arrays(8)
    for x, y in ((small[0], small[1]), (small[2], small[3])):
        assert all(int(label) in real[img[:, :, 0].tobytes()] for img, label in zip(x, y, strict=True))
    assert {img[:, :, 0].tobytes() for img in np.concatenate([small[0], small[2]])} == set(real)
    again = digits_arrays()
    assert np.array_equal(again[0], x_tr) and np.array_equal(again[3], y_te)  # fixed split


def test_digits_source():
    splits = load_splits("digits")
    assert splits.num_classes == 10 and len(splits.train) == 1437 and len(splits.val) == 360
    batch = batch_of(splits)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.long


def test_image_folder_source(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    splits = load_splits("imagefolder", str(root))
    assert splits.num_classes == 2 and len(splits.train) == 12 and len(splits.val) == 7
    assert batch_of(splits, split="val")["pixel_values"].shape == (4, 3, 32, 32)


def _write_parquet(root, n_val=3):
    from datasets import ClassLabel, Dataset, Features, Image

    feats = Features({"picture": Image(), "target": ClassLabel(names=["a", "b", "c"])})
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", n_val)):
        imgs = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
        Dataset.from_dict({"picture": imgs, "target": [i % 3 for i in range(n)]},
                          features=feats).to_parquet(str(root / f"{split}-00000.parquet"))


def test_parquet_source_detects_columns(tmp_path):
    _write_parquet(tmp_path)
    splits = load_splits("parquet", str(tmp_path))
    assert (splits.image_column, splits.label_column, splits.num_classes) == ("picture", "target", 3)
    assert len(splits.val) == 3
    assert batch_of(splits, 3)["label"].tolist() == [0, 1, 2]


def test_arrow_source(tmp_path):
    from datasets import DatasetDict

    splits = load_splits("digits")
    DatasetDict({"train": splits.train.select(range(10)), "validation": splits.val.select(range(5))}) \
        .save_to_disk(str(tmp_path / "arrow"))
    loaded = load_splits("arrow", str(tmp_path / "arrow"))
    assert len(loaded.train) == 10 and len(loaded.val) == 5 and loaded.num_classes == 10


def _write_cifar_py(root, n=5):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, obj):
        with open(root / name, "wb") as f:
            pickle.dump(obj, f)

    dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        dump(name, {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                    "labels": list(rng.integers(0, 10, n))})


def test_cifar10_batches_py_source(tmp_path):
    _write_cifar_py(tmp_path / "cifar-10-batches-py")
    splits = load_splits("cifar10-py", str(tmp_path))
    assert len(splits.train) == 10 and len(splits.val) == 5 and splits.num_classes == 10
    assert splits.class_names[3] == "c3"
    assert batch_of(splits)["pixel_values"].shape == (4, 3, 32, 32)


def test_cifar_py_refuses_code_in_pickles(tmp_path):
    _write_cifar_py(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": Evil()}, f)
    with pytest.raises(DataError, match=r"batches.meta: not a readable CIFAR batch .*builtins.print"):
        load_splits("cifar10-py", str(tmp_path))


@pytest.mark.parametrize("source", ["imagefolder", "parquet", "arrow", "cifar10-py"])
def test_missing_path(tmp_path, source):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(source, str(tmp_path / "nowhere"))


def test_unknown_column_is_named(tmp_path):
    _write_parquet(tmp_path)
    with pytest.raises(DataError, match=r"no column 'img' \(columns: picture, target\)"):
        load_splits("parquet", str(tmp_path), image_column="img")


def test_empty_split(tmp_path):
    _write_parquet(tmp_path, n_val=0)
    with pytest.raises(DataError, match="empty"):
        load_splits("parquet", str(tmp_path))


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    bad = root / "val" / "class0" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    splits = load_splits("imagefolder", str(root))
    with pytest.raises(DataError, match=r"0\.png: unreadable image"):
        batch_of(splits, n=7, split="val")
    batch = batch_of(splits, n=7, split="val", skip_bad=True)
    assert int(batch["skipped"]) == 1 and batch["pixel_values"].shape[0] == 6


def test_label_outside_num_classes(tmp_path):
    splits = load_splits("digits")
    _, tf = build_transforms("digits", (3, 32, 32), MEAN, STD)
    splits.val.set_transform(ImageTransform(tf, splits.image_column, splits.label_column, num_classes=3))
    with pytest.raises(DataError, match=r"label \d outside \[0, 3\)"):
        collate_images([splits.val[i] for i in range(40)])


def test_device_loader_is_deterministic_and_sharded():
    splits = load_splits("digits")
    kw = dict(batch_size=100, device=torch.device("cpu"), mean=MEAN, std=STD, seed=3)
    a = DeviceImageLoader(splits, **kw)
    b = DeviceImageLoader(splits, **kw)
    first = [x["label"] for x in a]
    assert len(first) == len(a) == 15 and sum(len(y) for y in first) == 1437
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b, strict=True))
    b.skip = 4  # a resumed epoch continues with exactly the same batches
    rest = list(b)
    assert len(rest) == 11 and torch.equal(rest[0]["pixel_values"], list(a)[4]["pixel_values"])
    a.set_epoch(1)
    assert not torch.equal(next(iter(a))["label"], first[0])
    # Which images a loader yields: with the labels replaced by the images' indices, each batch's
    # "label" names the images it holds.
    a.labels = torch.arange(len(a.labels))
    assert sorted(torch.cat([x["label"] for x in a]).tolist()) == list(range(1437))  # each image once
    ranks = [DeviceImageLoader(splits, **kw, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.labels = torch.arange(len(r.labels))
    yielded = [torch.cat([x["label"] for x in r]).tolist() for r in ranks]
    seen = [set(indices) for indices in yielded]
    assert len(yielded[0]) == len(seen[0]) == len(yielded[1]) == len(seen[1]) == 718  # 1437 // 2, none twice
    assert not seen[0] & seen[1]  # disjoint shards...
    assert len(seen[0] | seen[1]) == 1436 and seen[0] | seen[1] <= set(range(1437))  # ...covering all but one


def test_device_loader_matches_cpu_recipe_statistics():
    splits = load_splits("digits")
    loader = DeviceImageLoader(splits, batch_size=1437, device=torch.device("cpu"), mean=MEAN, std=STD,
                               flip=False, padding=0)
    x = next(iter(loader))["pixel_values"]
    ref = batch_of(splits, n=8)["pixel_values"]  # eval transform of the CPU path: normalise only
    # Without padding the device path is a pure normalisation of the same images.
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x.amin(dim=(0, 2, 3)), lo, atol=1e-5)
    assert torch.allclose(ref.amin(dim=(0, 2, 3)), lo, atol=1e-5)
