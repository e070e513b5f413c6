"""Saving, loading through timm (local-dir:, hf-hub: via the Hub cache, registry name) and bad files."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import run_script
from huggingface_hub import ModelCard, hf_hub_download

import reste_timm  # noqa: F401  (registers the models)
from reste_timm.hub import (
    CheckpointError,
    check_folder,
    load_model,
    push_to_hub,
    save_pretrained,
)
from reste_timm.models import strict_pretrained_filter

MODEL = "resnet20_1w1a_reste"
REPO = "my-org/resnet20-ste"
REGISTERED_REPO = "reste-timm/resnet20_1w1a_reste.cifar10"  # the registered cfg's hf_hub_id
METRICS = {"top1": 86.75, "top5": 99.41}
FILES = {"config.json", "model.safetensors", "README.md"}


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Gives BN statistics non-default values, so that a lost buffer would show in the outputs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.num_batches_tracked.fill_(123)
    return model.eval()


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return _trained_like(timm.create_model(MODEL, estimator="ste"))


@pytest.fixture(scope="module")
def folder(source, tmp_path_factory):
    return save_pretrained(source, tmp_path_factory.mktemp("saved") / "r20", metrics=METRICS,
                           train_config={"epochs": 1000, "lr": 0.1, "estimator": "ste"})


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_same(model, source, images, skip=()):
    a, b = model.state_dict(), source.state_dict()
    assert set(a) == set(b)
    for key in a:
        if not key.startswith(skip):
            assert torch.equal(a[key], b[key]), key
    if not skip:
        with torch.no_grad():
            assert torch.equal(model.eval()(images), source.eval()(images))


def test_local_dir_round_trip(source, folder, images):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    _assert_same(model, source, images)
    layer = model.layer2[0].conv1
    assert (layer.estimator, layer.binarize_input) == ("ste", True)  # from config.json, not passed
    assert check_folder(folder)["model_args"]["estimator"] == "ste"


def test_folder_holds_no_pickle(folder):
    assert {p.name for p in folder.iterdir()} == FILES  # no temp file left over either
    for path in folder.iterdir():
        head = path.read_bytes()[:8]
        assert not head.startswith(b"\x80"), path  # pickle protocol 2+
        assert not head.startswith(b"PK\x03\x04"), path  # torch.save zip archive
    header_len = int.from_bytes(folder.joinpath("model.safetensors").read_bytes()[:8], "little")
    header = json.loads(folder.joinpath("model.safetensors").read_bytes()[8:8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}


def test_config_alone_rebuilds_the_model(source, folder):
    config = json.loads((folder / "config.json").read_text())
    assert {"architecture", "num_classes", "num_features", "pretrained_cfg", "model_args"} <= set(config)
    assert config["model_args"]["estimator"] == "ste" and config["model_args"]["binarize_input"] is True
    model = timm.create_model(config["architecture"], **config["model_args"])
    assert model.layer1[0].conv1.estimator == "ste"
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    model.load_state_dict(weights, strict=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in source.state_dict().items()}


def test_settings_are_read_from_the_layers(tmp_path, images):
    # Built without timm.create_model: no recorded kwargs, no pretrained_cfg; the layers are the truth.
    source = _trained_like(reste_timm.models.CifarResNet(estimator="ste", binarize_input=False))
    with pytest.raises(ValueError, match="model_name"):
        save_pretrained(source, tmp_path / "nameless")
    save_pretrained(source, tmp_path / "r20", model_name=f"{MODEL}.cifar10")
    assert not hasattr(source, "pretrained_cfg")  # the export cfg was only lent to timm's writer
    model = timm.create_model(f"local-dir:{tmp_path / 'r20'}", pretrained=True)
    assert {(m.estimator, m.binarize_input) for m in reste_timm.binary_layers(model)} == {("ste", False)}
    _assert_same(model, source, images)


def test_fp_model_round_trip_has_no_estimator(tmp_path, images):
    source = _trained_like(timm.create_model("resnet20_cifar_fp"))
    save_pretrained(source, tmp_path)
    assert "estimator" not in json.loads((tmp_path / "config.json").read_text())["model_args"]
    _assert_same(timm.create_model(f"local-dir:{tmp_path}", pretrained=True), source, images)


def test_model_card(folder):
    text = (folder / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "timm"
    assert {"image-classification", "timm", "binary-neural-network", "reste"} <= set(card.data.tags)
    assert card.data.datasets == ["cifar10"] and card.data.license == "apache-2.0"
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == \
        {"Top-1 accuracy": 86.75, "Top-5 accuracy": 99.41}
    assert "pip install reste-timm" in text
    # the plugin import must come before create_model, or the Hub's generic timm snippet fails
    assert text.index("import reste_timm") < text.index(f'timm.create_model("hf-hub:{REGISTERED_REPO}"')
    assert "lr: 0.1" in text and "@inproceedings{wu2023estimator" in text and "86.75" in text


@pytest.mark.parametrize("name,classifier", [(MODEL, "linear"), ("vgg_small_fp", "fc")])
def test_num_classes_replaces_only_the_classifier(name, classifier, tmp_path, source):
    src = source if name == MODEL else _trained_like(timm.create_model(name))
    save_pretrained(src, tmp_path)
    for model in (timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5),
                  load_model(f"local-dir:{tmp_path}", num_classes=5)):
        head = model.get_submodule(classifier)
        assert head.weight.shape == (5, src.get_submodule(classifier).in_features)
        assert model.num_classes == 5
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(classifier + ".")}
        assert state and all(torch.equal(v, src.state_dict()[k]) for k, v in state.items())


def test_in_chans_adapted_as_timm_does(source, folder):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, in_chans=1)
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.linear.weight, source.linear.weight)


def test_pretrained_cfg_overlay_file(source, folder, images):
    model = timm.create_model(MODEL, pretrained=True, estimator="ste",
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))
    _assert_same(model, source, images)


# ------------------------------------------------------------------------- the Hub (fake, on HF_ENDPOINT)

def _publish(hub, repo: str, folder: Path) -> str:
    """Puts a saved folder on the fake Hub as ``repo``; returns its commit sha."""
    return hub.add_repo(repo, {p.name: p.read_bytes() for p in folder.iterdir()})


def test_hub_download_fills_the_cache_as_huggingface_hub_lays_it_out(hub, folder, tmp_path):
    repo = "my-org/cache-layout"
    commit = _publish(hub, repo, folder)
    for name in ("config.json", "model.safetensors"):
        hf_hub_download(repo, name, cache_dir=tmp_path)
    snapshot = tmp_path / "models--my-org--cache-layout" / "snapshots" / commit
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors"}
    assert (tmp_path / "models--my-org--cache-layout" / "refs" / "main").read_text() == commit


def test_hf_hub_spec_loads_then_loads_offline_from_the_cache(hub, source, folder, images):
    _publish(hub, REPO, folder)
    for model in (timm.create_model(f"hf-hub:{REPO}", pretrained=True), load_model(f"hf-hub:{REPO}")):
        _assert_same(model, source, images)
        assert model.layer3[0].conv2.estimator == "ste"
    hub.reset()
    code = ("import timm, torch, reste_timm\n"
            f"m = reste_timm.load_model('hf-hub:{REPO}')\n"
            "print(m.layer3[0].conv2.estimator, float(m.linear.weight.detach().sum()))")
    proc = run_script([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ste", str(float(source.linear.weight.detach().sum()))]
    assert hub.requests() == []  # offline: everything came from the cache


def test_registered_name_loads_its_hf_hub_id_once_weights_are_published(hub, source, folder, images):
    hub.add_repo(REGISTERED_REPO, {})  # the reserved repo exists, but holds no weights yet
    try:
        with pytest.raises(reste_timm.models.WeightsUnavailableError):
            timm.create_model(MODEL, pretrained=True)
        _publish(hub, REGISTERED_REPO, folder)  # weights appear: loading works unchanged
        model = timm.create_model(MODEL, pretrained=True)
        _assert_same(model, source, images)  # estimator only changes gradients: outputs are equal
        _assert_same(load_model(MODEL, num_classes=3), source, images, skip=("linear.",))
    finally:
        hub.remove_repo(REGISTERED_REPO)


def test_registered_name_offline_finds_its_weights_in_the_given_cache_dir(hub, folder, tmp_path):
    # check_published looks in the cache timm was given, not only the default one
    hub.add_repo(REGISTERED_REPO, {})
    try:
        _publish(hub, REGISTERED_REPO, folder)
        timm.create_model(MODEL, pretrained=True, cache_dir=tmp_path / "cache")  # downloads there
        code = ("import timm, reste_timm\n"
                f"timm.create_model({MODEL!r}, pretrained=True, cache_dir={str(tmp_path / 'cache')!r})\n"
                "print('loaded')")
        proc = run_script([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0 and proc.stdout.split() == ["loaded"], proc.stderr[-2000:]
    finally:
        hub.remove_repo(REGISTERED_REPO)


@pytest.mark.parametrize("status", [404, 401])
@pytest.mark.parametrize("load", ["create_model", "load_model"])
def test_unpublished_pretrained_fails_within_seconds_naming_the_model(hub, status, load):
    hub.missing_repo_status = status  # 401 is what the real Hub answers an anonymous client
    start = time.perf_counter()
    call = timm.create_model if load == "create_model" else load_model
    with pytest.raises(reste_timm.models.WeightsUnavailableError) as info:
        call("vgg_small_1w1a_reste", pretrained=True)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    for needle in ("vgg_small_1w1a_reste", "no weights are published for it yet",
                   "reste-timm train --config cifar10/vgg_small_1w1a_reste", "hf-hub:<your repo>",
                   "local-dir:<folder>"):
        assert needle in message, needle
    assert hub.requests("HEAD") == [("HEAD", "/reste-timm/vgg_small_1w1a_reste.cifar10/resolve/main/"
                                             "model.safetensors")]  # asked once, no retries


def test_unpublished_pretrained_offline_says_so(hub, tmp_path):
    # An empty Hub cache of its own: tests/test_readme.py downloads these weights from the fake Hub into
    # the session's cache, and the suite's workers run the files in any order.
    code = ("import timm, reste_timm\n"
            "try:\n    timm.create_model('resnet18_1w1a_reste', pretrained=True)\n"
            "except reste_timm.models.WeightsUnavailableError as e:\n    print(e)")
    proc = run_script([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert "resnet18_1w1a_reste.in1k: pretrained=True, but not in the local Hub cache, and HF_HUB_OFFLINE" \
        in proc.stdout, proc.stderr[-2000:]
    assert "reste-timm train --config imagenet/resnet18_1w1a_reste" in proc.stdout
    assert hub.requests() == []


def test_missing_hub_repo_or_file_names_it(hub, folder):
    with pytest.raises(CheckpointError, match=r"hf-hub:nobody/missing/model\.safetensors"):
        load_model("hf-hub:nobody/missing")
    hub.add_repo("my-org/only-config", {"config.json": (folder / "config.json").read_bytes()})
    with pytest.raises(CheckpointError, match=r"hf-hub:my-org/only-config/model\.safetensors"):
        load_model("hf-hub:my-org/only-config")


def test_push_to_hub_uploads_exactly_the_saved_files(hub, source, folder):
    repo = "my-org/pushed"
    push_to_hub(source, repo, metrics=METRICS, private=True, revision="v1", commit_message="msg",
                token="fake")
    uploaded = hub.files(repo, "v1")
    assert set(uploaded) == FILES | {".gitattributes"}  # the Hub's own file of a new repo
    for name in ("model.safetensors", "config.json"):
        assert uploaded[name] == (folder / name).read_bytes(), name
    assert f'timm.create_model("hf-hub:{repo}"'.encode() in uploaded["README.md"]
    assert ("POST", "/api/models/my-org/pushed/branch/v1") in hub.requests("POST")
    # the pushed repo loads back through timm like any other
    model = timm.create_model(f"hf-hub:{repo}@v1", pretrained=True)
    assert torch.equal(model.linear.weight, source.linear.weight)


# ------------------------------------------------------------------------------------------- bad files

def _rewrite_weights(folder: Path, edit) -> None:
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    edit(weights)
    safetensors.torch.save_file(weights, folder / "model.safetensors")


def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


BAD = {
    "truncated": (_truncate, "model.safetensors", None),
    "unknown_arch": (_edit_config(architecture="resnet99_nope"), "config.json", "architecture"),
    "bad_estimator": (_edit_config(model_args={"estimator": "nope"}), "config.json", "model_args"),
    "missing_key": (lambda f: _rewrite_weights(f, lambda w: w.pop("layer2.1.conv1.weight")),
                    "model.safetensors", "layer2.1.conv1.weight"),
    "extra_key": (lambda f: _rewrite_weights(f, lambda w: w.update(extra=torch.zeros(1))),
                  "model.safetensors", "extra"),
    "wrong_shape": (lambda f: _rewrite_weights(f, lambda w: w.update({"bn1.weight": torch.ones(8)})),
                    "model.safetensors", "bn1.weight"),
    "no_config": (lambda f: (f / "config.json").unlink(), "config.json", None),
    "bad_json": (lambda f: (f / "config.json").write_text("{not json"), "config.json", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_name_file_and_key(case, folder, tmp_path):
    corrupt, filename, key = BAD[case]
    bad = shutil.copytree(folder, tmp_path / "bad")
    corrupt(bad)
    spec = f"local-dir:{bad}"
    for call in (lambda: load_model(spec), lambda: load_model(spec, num_classes=5),
                 lambda: check_folder(bad)):
        with pytest.raises(CheckpointError) as info:
            call()
        assert Path(info.value.file) == bad / filename and info.value.key == key
        assert str(bad / filename) in str(info.value) and (key is None or key in str(info.value))


def test_bad_overlay_file_names_it(folder, tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        load_model(MODEL, pretrained_cfg_overlay=dict(file=str(bad)))


def test_interrupted_save_keeps_the_previous_folder_loadable(source, folder, tmp_path, monkeypatch):
    target = shutil.copytree(folder, tmp_path / "r20")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(source, target)
    # every file is staged before any is replaced: the old files, no staging folder or temp file left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert set(before) == FILES
    load_model(f"local-dir:{target}")


def test_strict_filter_refuses_what_timm_would_load_partially(source, folder, tmp_path):
    bad = shutil.copytree(folder, tmp_path / "bad")
    _rewrite_weights(bad, lambda w: w.pop("layer2.1.conv1.weight"))
    overlay = dict(file=str(bad / "model.safetensors"))
    # timm alone: the classifier is being replaced, so it loads non-strictly and only logs the hole
    model = timm.create_model(MODEL, num_classes=5, pretrained_cfg_overlay=overlay)
    timm.models.load_pretrained(model, num_classes=5)
    with pytest.raises(CheckpointError) as info:
        timm.models.load_pretrained(model, num_classes=5, filter_fn=strict_pretrained_filter)
    assert (info.value.file, info.value.key) == (overlay["file"], "layer2.1.conv1.weight")
    # a good file still adapts: new classifier, one input channel
    model = timm.create_model(MODEL, num_classes=5, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))
    timm.models.load_pretrained(model, num_classes=5, in_chans=1, filter_fn=strict_pretrained_filter)
    assert torch.equal(model.layer2[1].conv1.weight, source.layer2[1].conv1.weight)
