"""Errors a user causes at the command line end in one clear line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [
    ["process", "call-records"], ["topics", "create"], ["tail", "keyyo.call-updates.v1", "--timeout", "2"],
])
def test_no_broker_where_pointed_is_one_line(command: list[str]) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # nothing listens on port 1
    done = subprocess.run([sys.executable, "-m", "deploy.cli", *command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "keyyo-stream: cannot reach Kafka at 127.0.0.1:1; start one with `keyyo-stream kafka start`")
