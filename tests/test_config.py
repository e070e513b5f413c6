"""Config parsing: YAML keys are the flags, the command line wins, bad input exits 2 in one line."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, run_script

from reste_timm.train.config import parse_config


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


def test_every_shipped_config_parses():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(configs) >= 15
    for path in configs:
        args = parse_config(["--config", str(path), "--data-path", "/data"])
        assert args.epochs > 0 and args.o_end >= 1


@pytest.mark.parametrize("data, needle", [
    ({"epochs": 3, "bogus_key": 1}, "unknown key 'bogus_key'"),
    ({"epochs": "ten"}, "key 'epochs'"),
    ({"epochs": 2.5}, "key 'epochs'"),
    ({"epochs": -1}, "key 'epochs'"),
    ({"batch_size": 0}, "key 'batch_size'"),
    ({"o_end": 0.5}, "key 'o_end'"),
    ({"model": "no_such_model"}, "unknown model 'no_such_model'"),
    ({"estimator": "magic"}, "unknown estimator 'magic'"),
    ({"dataset": "nonsense"}, "unknown dataset 'nonsense'"),
    ({"cal_ind": "yes"}, "key 'cal_ind'"),
    ({"cpu_malloc_tuning": 1}, "key 'cpu_malloc_tuning'"),
    ({"anneal": "hourly"}, "key 'anneal'"),
    ("epochs: [1, 2", "not valid YAML"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, data, needle):
    cfg = write(tmp_path, data)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", cfg])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    if "YAML" not in needle:
        assert cfg in err or "unknown" in err  # names the file


def test_bad_command_line_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--epochs", "0"])
    assert exc.value.code == 2
    assert "key 'epochs'" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_train_script_rejects_bad_config_and_writes_nothing(tmp_path):
    cfg = write(tmp_path, {"epochs": 2, "o_end": 0.5})
    out = tmp_path / "out"
    proc = run_script([str(ROOT / "scripts/train.py"), "--config", cfg, "--output-dir", str(out)])
    assert proc.returncode == 2
    assert "key 'o_end'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
