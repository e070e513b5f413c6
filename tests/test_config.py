"""Config parsing: YAML keys are the flags, the command line wins, bad input exits 2 in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_script

from reste_timm.train.config import PROG, packaged_configs, parse_config


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(path)


def test_yaml_then_command_line(tmp_path):
    cfg = write(tmp_path, {"epochs": 7, "data-path": "/x", "lr": "1e-3", "cal_ind": True,
                           "dataset": "digits"})
    args = parse_config(["--config", cfg, "--epochs", "5"])
    assert args.epochs == 5  # command line wins
    assert args.data_path == "/x" and args.lr == pytest.approx(1e-3) and args.cal_ind is True
    assert args.output_dir.endswith("outputs/cfg")


def test_on_off_flag_from_yaml_and_command_line(tmp_path):
    assert parse_config([]).cpu_malloc_tuning is True
    cfg = write(tmp_path, {"cpu-malloc-tuning": False})
    assert parse_config(["--config", cfg]).cpu_malloc_tuning is False
    assert parse_config(["--config", cfg, "--cpu-malloc-tuning"]).cpu_malloc_tuning is True


def test_every_shipped_config_parses_to_its_own_values():
    # The paper's numbers in them: tests/test_train_flags.py::test_packaged_configs_hold_the_papers_values.
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    # Installed from a wheel (make test-min) the packaged copies live in site-packages: same
    # names, same bytes as the checkout's configs/.
    checkout = {p.relative_to(ROOT / "configs").with_suffix("").as_posix(): p for p in configs}
    packaged = packaged_configs()
    assert set(checkout) == set(packaged)
    for name, path in checkout.items():
        assert path.read_bytes() == packaged[name].read_bytes(), name
    for path in configs:
        args = parse_config(["--config", str(path), "--data-path", "/data"])
        values = yaml.safe_load(path.read_text())
        assert values, path
        for key, value in values.items():
            assert getattr(args, key.replace("-", "_")) == value, f"{path.name}: {key}"
        assert args.config == str(path) and args.output_dir == str(Path("outputs") / path.stem)


@pytest.mark.parametrize("data, where, value", [
    ({"epochs": 3, "bogus_key": 1}, "unknown key 'bogus_key'", None),
    ({"epochs": "ten"}, "key 'epochs'", "'ten'"),
    ({"epochs": 2.5}, "key 'epochs'", "2.5"),
    ({"epochs": -1}, "key 'epochs'", "-1"),
    ({"batch_size": 0}, "key 'batch_size'", "0"),
    ({"o_end": 0.5}, "key 'o_end'", "0.5"),
    ({"model": "no_such_model"}, "key 'model'", "'no_such_model'"),
    ({"estimator": "magic"}, "key 'estimator'", "'magic'"),
    ({"dataset": "nonsense"}, "key 'dataset'", "'nonsense'"),
    ({"cal_ind": "yes"}, "key 'cal_ind'", "'yes'"),
    ({"cpu_malloc_tuning": 1}, "key 'cpu_malloc_tuning'", "1"),
    ({"anneal": "hourly"}, "key 'anneal'", "'hourly'"),
    ({"anneal": None}, "key 'anneal'", "no value given"),  # a flag with choices, not a type
    ({"epochs": None}, "key 'epochs'", "no value given"),
    ("epochs: [1, 2", "not valid YAML", None),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, data, where, value):
    cfg = write(tmp_path, data)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", cfg])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    prefix = f"{PROG}: error: {cfg}: {where}"  # the file, then the key
    assert err.startswith(prefix), err
    if value is not None:
        assert value in err[len(prefix):], err  # ...and the value


def test_bad_command_line_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--epochs", "0"])
    assert exc.value.code == 2
    assert "key 'epochs'" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", str(missing)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"{PROG}: error: {missing}: config file not found")


@pytest.mark.slow
def test_train_script_rejects_bad_config_and_writes_nothing(tmp_path):
    cfg = write(tmp_path, {"epochs": 2, "o_end": 0.5})
    out = tmp_path / "out"
    proc = run_script([str(ROOT / "scripts/train.py"), "--config", cfg, "--output-dir", str(out)])
    assert proc.returncode == 2
    assert "key 'o_end'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
