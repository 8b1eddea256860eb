"""Fixtures for SDK tests: a real envd process the official SDKs talk to."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def envd_binary() -> Path:
    path = Path(os.environ.get("WRENN_ENVD_BIN", ROOT / "target" / "debug" / "envd"))
    if not path.exists():
        raise RuntimeError(f"{path} not found: build it with `cargo build -p envd`")
    return path


@pytest.fixture(scope="session")
def envd_debug():
    """envd on 127.0.0.1:49983, where the SDKs' debug mode sends envd traffic."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 49983)) == 0:
            raise RuntimeError("port 49983 is taken; the SDK debug mode needs it")
    proc = subprocess.Popen(
        [str(envd_binary()), "--listen", "127.0.0.1:49983", "--no-cgroups", "--no-port-forward"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on"), line
        yield "http://127.0.0.1:49983"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def workdir(tmp_path):
    return tmp_path
