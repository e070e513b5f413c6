"""The ``reste-timm`` command's front door: its listing, its errors, and a reader that goes away."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, run_script

from reste_timm.cli import COMMANDS
from reste_timm.train.config import packaged_configs


def test_usage_lists_every_command():
    proc = run_script([sys.executable, "-m", "reste_timm", "--help"])
    assert proc.returncode == 0
    for name in COMMANDS:
        assert f"\n  {name} " in proc.stdout


def test_unknown_command_exits_2_with_one_line():
    proc = run_script([sys.executable, "-m", "reste_timm", "trian"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"reste-timm: error: unknown command 'trian' (commands: {', '.join(COMMANDS)})"]


def test_configs_lists_the_packaged_configs_and_prints_one():
    listing = run_script([sys.executable, "-m", "reste_timm", "configs"])
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines()[:len(packaged_configs())]]
    assert names == list(packaged_configs())
    one = run_script([sys.executable, "-m", "reste_timm", "configs", "digits/resnet20_1w1a_reste"])
    assert one.returncode == 0
    assert one.stdout == (ROOT / "configs" / "digits" / "resnet20_1w1a_reste.yaml").read_text()


def test_a_closed_stdout_stops_the_command_quietly():
    """``reste-timm configs | head -1``: the reader is gone before the listing is written. The command
    stops with status 1 and says nothing (no BrokenPipeError traceback, no "Exception ignored")."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child starts: its first write fails, every time
    try:
        proc = subprocess.run([sys.executable, "-m", "reste_timm", "configs"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""
