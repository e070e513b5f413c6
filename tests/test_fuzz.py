"""A seeded sweep of bad input: config files, safetensors files and config.json files of saved folders.

Each case is one mutated file, read the way a user's command reads it: ``parse_config`` for a
config file (what ``reste-timm train --config`` runs first), ``load_model("local-dir:...")`` and
``load_packed`` for a saved folder. A case passes when it ends in one clear error: SystemExit(2) with
one ``reste-timm train: error:`` line naming the config file, or a ``CheckpointError`` naming the
file; a mutation that leaves the file valid may also load. Never a traceback from deep inside,
never a hang (each case is timed), never a large allocation (peak RSS is checked). The sweep is
deterministic (``SEED``); each test prints its case count (``pytest -s``).

``KNOWN`` lists what the sweep still finds in code outside reste_timm/hub/packed.py, reste_timm/files.py
and the training command, with the fix each needs; those cases are counted, not failed, and a known
finding that no longer occurs fails its sweep, so that the list is emptied as the fixes land.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import resource
import shutil
import struct
import sys
import time
import traceback
from pathlib import Path

import pytest
import timm
import torch
import yaml

from reste_timm.files import CheckpointError
from reste_timm.hub import export_packed, load_model, load_packed, save_pretrained
from reste_timm.train.config import build_parser, packaged_configs, parse_config

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # num_classes 0

SEED = 16
MODEL = "resnet20_1w1a_reste"
MAX_CASE_S = 5.0  # a case is a parse or a header read: a slower one is a hang in the making
MAX_RSS_GROWTH_MB = 300  # the largest honest allocation is one model (~1 MB of weights)

# Sweep -> {regex over "case: outcome": the file to fix, and how}.
KNOWN: dict = {
    # Empty: the findings of the first sweep were fixed in train/config.py (null values, integers past
    # Python's 4,300-digit limit, non-UTF-8 files, the whole of a huge value repeated in the message)
    # and hub/check.py (a non-string architecture, deep nesting, non-UTF-8 JSON, null model_args,
    # non-string first_conv/classifier, a float tensor stored as integers).
}


def _peak_rss_mb() -> float:
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _failure(e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-1:-5:-1]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames)
    return f"{type(e).__name__}: {str(e)[:300]} (at {where})"


class Sweep:
    """Runs cases, times them, and collects every one that did not end as it should."""

    def __init__(self, name: str):
        self.name, self.known, self.seen = name, KNOWN.get(name, {}), set()
        self.counts = {"refused": 0, "accepted": 0, "known": 0}
        self.bad, self.slowest, self.rss_before = [], 0.0, _peak_rss_mb()

    def run(self, what: str, judge) -> None:
        """``judge()`` returns "refused" or "accepted", or a description of a bad ending."""
        start = time.monotonic()
        try:
            outcome = judge()
        except Exception as e:  # noqa: BLE001  (anything a judge did not expect is a finding)
            outcome = _failure(e)
        self.slowest = max(self.slowest, time.monotonic() - start)
        wrongly_accepted = outcome == "accepted" and what.startswith("must refuse")
        if outcome in ("refused", "accepted") and not wrongly_accepted:
            self.counts[outcome] += 1
            return
        finding = f"{what}: {outcome}"
        matched = {pattern for pattern in self.known if re.search(pattern, finding)}
        self.seen |= matched
        self.counts["known"] += bool(matched)
        if not matched:
            self.bad.append(finding)

    def check(self) -> None:
        growth = _peak_rss_mb() - self.rss_before
        print(f"{self.name}: {sum(self.counts.values()) + len(self.bad)} cases, {self.counts}, "
              f"slowest {self.slowest:.2f} s, peak RSS +{growth:.0f} MB")
        assert not self.bad, f"{len(self.bad)} bad endings:\n" + "\n".join(self.bad[:20])
        fixed = [self.known[p] for p in self.known if p not in self.seen]
        assert not fixed, "known findings that no longer occur (remove them from KNOWN):\n" + "\n".join(fixed)
        assert self.slowest < MAX_CASE_S
        assert growth < MAX_RSS_GROWTH_MB


# ----------------------------------------------------------------------------------------- config files

def _random_value(rng: random.Random, depth: int = 0):
    pool = [0, 1, -1, 3, 2**31, 2**64, 10**100, -(10**18), 0.5, -0.0, 1e-300, 1e308, float("nan"),
            float("inf"), "", "x", "cifar", "reste", "digits", "resnet20_1w1a_reste", "hf-hub:a/b",
            "local-dir:/nonexistent", "1e-4", "ü" * 3, "a" * 300, "\t", "null", True, False, None]
    kind = rng.random()
    if depth < 3 and kind < 0.1:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and kind < 0.2:
        return {str(_random_value(rng, depth + 1)): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return rng.choice(pool)


def _random_config(rng: random.Random, keys) -> str:
    data = {}
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(keys) if rng.random() < 0.85 else rng.choice(["nope", "lr ", "LR", "", "model.x"])
        data[key.replace("_", "-") if rng.random() < 0.3 else key] = _random_value(rng)
    return yaml.safe_dump(data, allow_unicode=True)


_SYNTAX = ["[", "]", "{", "}", ":", ": :", "\t", "'", '"', "&a", "*a", "*nope", "!", "%YAML 9.9", "@", "`",
           "!!python/object:os.system", "---", "...", "- ", "\n  ", "? ", "|", ">", "#", ",", "\\", "\x00",
           "\x85"]


def _mutated_text(rng: random.Random, base: str) -> str:
    text = base
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        choice = rng.random()
        if choice < 0.6:
            text = text[:at] + rng.choice(_SYNTAX) + text[at:]
        elif choice < 0.8:
            text = text[:at] + text[at + rng.randint(1, 20):]
        else:
            text = text[:at]
    return text


_SPECIAL_CONFIGS = [
    "", "\n", "~", "[]", "- a\n- b", "42", "'just a string'", "a: 1\na: 2", "---\nlr: 1\n---\nlr: 2\n",
    "lr: !!python/object/apply:os.system ['echo pwned']", "model: !!binary aGVsbG8=",
    "epochs: 2024-01-01", "? [a, b]\n: 1", "null: 1", "true: 1", "1: 2", "epochs: 0x10", "epochs: 1_000",
    "lr: .nan", "lr: -.inf",
    "epochs: " + "9" * 5000, "model: " + "x" * 100_000, "batch_size: &a 5\nval_batch_size: *a",
    "data_path: {a: {b: {c: {d: 1}}}}", "\ufeffepochs: 1", "epochs: 1\r\nlr: 0.1\r\n",
    # an alias bomb: 9**6 references to one list, which a message would expand
    "model: [" + ", ".join(['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] +
                           [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 6)]) + "]",
]
_NOT_UTF8 = [b"model: \xff\xfe\n", b"\xff\xfe\x00e\x00p\x00", b"epochs: 1\nmodel: \xc3\x28\n"]


def _config_cases(rng: random.Random, keys, bases):
    for text in _SPECIAL_CONFIGS:
        yield f"special {text[:40]!r}", text.encode()
    for data in _NOT_UTF8:
        yield f"special {data!r}", data
    for i in range(300):
        yield f"random mapping #{i}", _random_config(rng, keys).encode()
    for i in range(300):
        yield f"mutated YAML #{i}", _mutated_text(rng, rng.choice(bases)).encode("utf-8", "surrogatepass")


def _judge_config(path: Path, capsys):
    def judge():
        try:
            parse_config(["--config", str(path)])
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            if e.code != 2 or len(err) != 1 or not err[0].startswith("reste-timm train: error: ") \
                    or str(path) not in err[0] or len(err[0]) > 2000:
                return f"exit {e.code} with {[line[:200] for line in err]}"
            return "refused"
        capsys.readouterr()
        return "accepted"
    return judge


def test_fuzz_config_files(tmp_path, capsys):
    rng = random.Random(SEED)
    keys = sorted({a.dest for a in build_parser()._actions if a.dest not in ("help", "config")})
    bases = [p.read_text() for p in packaged_configs().values()]
    sweep, path = Sweep("config files"), tmp_path / "fuzz.yaml"
    for what, data in _config_cases(rng, keys, bases):
        path.write_bytes(data)
        sweep.run(what, _judge_config(path, capsys))
    with capsys.disabled():
        sweep.check()


# ------------------------------------------------------------------------------- saved folders: weights

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("fuzz")
    model = timm.create_model(MODEL)
    return {"saved": save_pretrained(model, root / "saved"), "packed": export_packed(model, root / "packed")}


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


_DTYPES = ["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL", "F64", "F8_E4M3", "F33", "", "f32", "STRING", 7]
_SHAPES = [[2**40], [2**62, 2**62], [-1], [0], [], [1.5], ["3"], [2**64], None, [1] * 200]


def _header_mutation(rng: random.Random, header: dict) -> dict:
    header = json.loads(json.dumps(header))
    keys = [k for k in header if k != "__metadata__"]
    key, kind = rng.choice(keys), rng.randrange(9)
    entry = header[key]
    if kind == 0:
        entry["dtype"] = rng.choice(_DTYPES)
    elif kind == 1:
        entry["shape"] = rng.choice(_SHAPES)
    elif kind == 2:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[-8, end], [start, start - 4], [0, end], [start, 2**63],
                                            [start + 4, end + 4], [end, start], [start], "0-4"])
    elif kind == 3:
        del header[key]
    elif kind == 4:
        header[key + ".extra"] = dict(entry)
    elif kind == 5:
        header[key] = rng.choice([None, [], "x", 3, {}])
    elif kind == 6:
        header["__metadata__"] = rng.choice([{"packing": "reste-timm-packed"}, {"format": 3}, [], "x",
                                             {"packing": "reste-timm-packed", "format": "pt"}])
    elif kind == 7:
        header[rng.choice(keys)] = dict(entry)  # two tensors over the same bytes
    else:
        entry["shape"], entry["dtype"] = [entry["data_offsets"][1] - entry["data_offsets"][0]], "U8"
    return header


def _weights_cases(rng: random.Random, data: bytes):
    header, body = _split(data)
    size = len(data)
    for i in range(40):
        yield f"truncated #{i}", data[:rng.randint(0, size - 1)]
    for n in (size, size - 7, 2**63, 2**64 - 1, 0, 1, 7, 100_000_001):
        yield f"header length {n}", struct.pack("<Q", n) + data[8:]
    for junk in (b"", b"{", b"[]", b"null", b"\xff\xfe" * 10, b'{"a": ' * 5000, b"{}" + b"\x00" * 6):
        yield f"header {junk[:12]!r}", _join(junk, body, pad=False)
    yield "deeply nested header", _join(b"[" * 100_000 + b"]" * 100_000, body)
    yield "duplicate key", _join(json.dumps(header).replace("{", '{"linear.bias": 1, ', 1).encode(), body)
    same_size = {"F32": "I32", "F16": "I16", "BF16": "I16"}
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] in same_size)
    wrong = {**header, key: {**header[key], "dtype": same_size[header[key]["dtype"]]}}
    yield f"must refuse {key} as {wrong[key]['dtype']}", _join(wrong, body)
    for i in range(120):
        yield f"header mutation #{i}", _join(_header_mutation(rng, header), body)
    for _ in range(20):
        flipped = bytearray(data)
        at = rng.randrange(8, size)
        flipped[at] ^= 1 << rng.randrange(8)
        yield f"bit flip at {at}", bytes(flipped)


def _judge_folder(folder: Path, loader):
    files = {str(folder / "model.safetensors"), str(folder / "config.json")}

    def judge():
        try:
            loader(folder)
        except CheckpointError as e:
            return "refused" if e.file in files and "Traceback" not in str(e) else f"names {e.file}: {e}"
        return "accepted"
    return judge


_LOADERS = {"saved": lambda f: load_model(f"local-dir:{f}"), "packed": load_packed}


@pytest.mark.parametrize("kind", ["saved", "packed"])
def test_fuzz_safetensors_files(folders, kind, tmp_path):
    rng = random.Random(f"{SEED}-{kind}")
    folder = shutil.copytree(folders[kind], tmp_path / kind)
    weights, data = folder / "model.safetensors", (folders[kind] / "model.safetensors").read_bytes()
    sweep = Sweep(f"safetensors files ({kind})")
    for what, mutated in _weights_cases(rng, data):
        weights.write_bytes(mutated)
        with contextlib.redirect_stderr(io.StringIO()):  # timm logs what it loads
            sweep.run(what, _judge_folder(folder, _LOADERS[kind]))
    sweep.check()


# ---------------------------------------------------------------------------- saved folders: config.json

_ABSURD = [None, True, 0, -1, 2**31, 10**12, 2**63, 10**100, 1.5, float("nan"), "", "10", "resnet", [], [3],
           {}, {"a": 1}, [3, 2**20, 2**20], [3, -32, 32], [1, 1, 1, 1, 1]]


def _config_json_mutation(rng: random.Random, config: dict):
    config = json.loads(json.dumps(config))
    paths = [(config, k) for k in config] + [(config[k], j) for k in ("pretrained_cfg", "model_args")
                                            if isinstance(config.get(k), dict) for j in config[k]]
    target, key = rng.choice(paths)
    kind = rng.random()
    if kind < 0.3:
        del target[key]
    elif kind < 0.8:
        target[key] = rng.choice(_ABSURD)
    else:
        section = config.setdefault("model_args", {})
        section[rng.choice(["in_chans", "num_classes", "estimator", "binarize_input", "drop_rate", "nope",
                            "pretrained", "global_pool"])] = rng.choice(_ABSURD + ["avg", "ste", "reste"])
    return config


def _config_json_cases(rng: random.Random, text: str):
    config = json.loads(text)
    for value in ("nope_net", "resnet50", "", None, 3, "hf-hub:x/y", "resnet20_1w1a_reste.nope"):
        yield f"architecture {value!r}", json.dumps({**config, "architecture": value}).encode()
    for key, value in (("num_classes", 10**12), ("num_classes", -5), ("in_chans", 10**9), ("in_chans", 0)):
        args = {**config.get("model_args", {}), key: value}
        yield f"model_args {key}={value}", json.dumps({**config, "model_args": args}).encode()
    for junk in (b"", b"[]", b"3", b'"x"', b"null", b"\xff\xfe{}", b"{" * 50_000 + b"}" * 50_000,
                 b"[" * 100_000 + b"]" * 100_000, b'{"architecture": NaN}', text.encode()[:-1]):
        yield f"config.json {junk[:12]!r}", junk
    for i in range(200):
        yield f"config.json mutation #{i}", json.dumps(_config_json_mutation(rng, config)).encode()


@pytest.mark.parametrize("kind", ["saved", "packed"])
def test_fuzz_config_json(folders, kind, tmp_path):
    rng = random.Random(f"{SEED}-json-{kind}")
    folder = shutil.copytree(folders[kind], tmp_path / kind)
    text = (folders[kind] / "config.json").read_text()
    sweep = Sweep(f"config.json ({kind})")
    for what, data in _config_json_cases(rng, text):
        (folder / "config.json").write_bytes(data)
        with contextlib.redirect_stderr(io.StringIO()):
            sweep.run(what, _judge_folder(folder, _LOADERS[kind]))
    sweep.check()
