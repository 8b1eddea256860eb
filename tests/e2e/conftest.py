"""End-to-end fixtures: a real `wrenn up` (control plane, host agent with QEMU guests, proxy)
that the official E2B SDKs talk to, on SQLite or, with WRENN_E2E_DATABASE=postgres, on a fresh
PostgreSQL database.

`WRENN_E2E_URL` + `E2B_API_KEY` point the suite at an already running instance instead (for
development); tests that restart the process are skipped then. `WRENN_E2E_FIRST_SLOT` moves the
suite's slot range (1024 slots from 28672 by default), so two suites can run side by side.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import netlab

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = float(os.environ.get("WRENN_E2E_START_TIMEOUT", "1200"))
FIRST_SLOT = netlab.FIRST_SLOT


def wrenn_binary() -> Path:
    path = Path(os.environ.get("WRENN_BIN", ROOT / "target" / "debug" / "wrenn"))
    if not path.exists():
        raise RuntimeError(f"{path} not found: build it with `cargo build -p wrenn`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psql(sql: str, db: str = "wrenn") -> None:
    base = os.environ.get("WRENN_E2E_PG_ADMIN", "postgres://wrenn:wrenn@127.0.0.1")
    subprocess.run(["psql", f"{base}/{db}", "-qAtc", sql], check=True, capture_output=True)


class Wrenn:
    """A `wrenn up` process; `restart()` stops it (SIGTERM) and starts it again on the same
    state directory, database and port."""

    def __init__(self, state_dir: Path, database_url: str | None):
        self.state_dir = state_dir
        self.database_url = database_url
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.log = state_dir.parent / "wrenn-up.log"
        self.external = False
        # What the current process printed on stdout up to its environment (the banner).
        self.banner = ""
        # No hot pool by default: tests that count the host's QEMU processes, slots and
        # directories see only what the API shows and the warm pool (test_hot_pool.py restarts
        # with one).
        self.extra_args: list[str] = ["--hot-pool", "0"]

    def start(self, env: dict[str, str] | None = None) -> None:
        """Starts `wrenn up`; `env` adds to its environment (e.g. a `WRENN_FAULT` point)."""
        args = [
            str(wrenn_binary()), "up",
            "--state-dir", str(self.state_dir),
            "--listen", f"127.0.0.1:{self.port}",
            "--progress", "plain",
            # Its own slot range: never the one a developer's `wrenn up` uses.
            "--first-slot", str(FIRST_SLOT), "--slots", str(netlab.SLOTS),
            # Often, so the suite also runs with the reconciler racing every operation.
            "--reconcile-interval", "2",
            # Released template versions go a few seconds after nothing uses them (default
            # 2 min), so tests can see them collected.
            "--template-release-grace", "3",
            # Guests leave only into the lab's fake internet (tests/e2e/netlab.py), never by
            # the machine's own interfaces.
            "--uplink", netlab.HOST_IF,
            "--dns-upstream", netlab.DNS,
            # One LAN service lifted out of the always-denied private ranges.
            "--egress-allow-range", netlab.LIFTED_RANGE,
            # Image builds pull over plain HTTP from the lab's registry (tests/e2e/registry.py)
            # and try the lab's registry host where nothing listens; one at a private address
            # (the lab's LAN host) stays refused.
            "--insecure-registry", f"{netlab.REGISTRY}:{netlab.REGISTRY_PORT}",
            "--insecure-registry", f"{netlab.REGISTRY_DOWN}:{netlab.REGISTRY_PORT}",
        ]
        if self.database_url:
            args += ["--database-url", self.database_url]
        args += self.extra_args
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}
        )
        env: dict[str, str] = {}
        lines: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        # Read stdout on a thread so a hung start cannot block past the deadline.
        done = threading.Event()

        def reader():
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith("export "):
                    k, _, v = line[len("export "):].strip().partition("=")
                    env[k] = v
                    if k == "E2B_API_KEY":
                        done.set()
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        while not done.wait(1):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"wrenn up did not start in {START_TIMEOUT}s; log: {self.log}")
        if "E2B_API_KEY" not in env:
            code = self.proc.wait(10)
            tail = self.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"wrenn up exited ({code}) before it was ready:\n{''.join(lines)}\n{tail}")
        self.env = env
        self.banner = "".join(lines)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def crash_restart(self, env: dict[str, str] | None = None) -> None:
        """SIGKILL (no clean stop: QEMU processes outlive it), then start again."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.start(env)

    def wait_died(self, timeout: float = 120) -> int:
        """Waits for the process to end on its own (a fault point killed it)."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def restart(self) -> None:
        code = self.stop()
        assert code == 0, f"wrenn up exited with {code} on SIGTERM; log: {self.log}"
        self.start()

    def agent_url(self) -> str:
        """The agent's RPC URL (`unix:/path` of its root-only socket), from the log of the
        current process's start."""
        url = None
        for line in self.log.read_text(errors="replace").splitlines():
            if "agent RPC and sandbox proxy listening" in line and "url=" in line:
                url = line.split("url=", 1)[1].split()[0]
        assert url, f"no agent URL in {self.log}"
        return url

    @property
    def api_url(self) -> str:
        return self.env["E2B_API_URL"]

    @property
    def api_key(self) -> str:
        return self.env["E2B_API_KEY"]


def _leftover_qemu(state_dir: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if str(state_dir) in l]


@pytest.fixture(scope="session")
def lab():
    """The fake internet every `wrenn up` of the suite uses as its uplink."""
    if os.environ.get("WRENN_E2E_URL"):
        pytest.skip("the egress lab needs the suite's own wrenn up")
    lab = netlab.NetLab()
    try:
        yield lab.setup()
    finally:
        lab.teardown()


@pytest.fixture(scope="session")
def wrenn(request):
    external = os.environ.get("WRENN_E2E_URL")
    if external:
        w = Wrenn(Path(tempfile.gettempdir()) / "wrenn-e2e-external", None)
        w.external = True
        w.env = {
            "E2B_API_URL": external,
            "E2B_SANDBOX_URL": os.environ.get("E2B_SANDBOX_URL", external),
            "E2B_API_KEY": os.environ["E2B_API_KEY"],
        }
        _apply_env(w)
        yield w
        return
    request.getfixturevalue("lab")
    work = Path(tempfile.mkdtemp(prefix="wrenn-e2e-", dir="/var/tmp"))
    database_url = None
    pg_db = None
    if os.environ.get("WRENN_E2E_DATABASE") == "postgres":
        pg_db = f"wrenn_e2e_{uuid.uuid4().hex[:10]}"
        psql(f"CREATE DATABASE {pg_db}")
        base = os.environ.get("WRENN_E2E_PG_ADMIN", "postgres://wrenn:wrenn@127.0.0.1")
        database_url = f"{base}/{pg_db}"
    w = Wrenn(work / "state", database_url)
    try:
        w.start()
        _apply_env(w)
        yield w
    finally:
        code = w.stop()
        left = _leftover_qemu(w.state_dir)
        if pg_db:
            try:
                psql(f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")
            except subprocess.CalledProcessError:
                pass
        keep = os.environ.get("WRENN_E2E_KEEP")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        assert code in (0, None), f"wrenn up exited with {code} on SIGTERM"
        assert not left, f"QEMU processes left after wrenn up stopped: {left}"


def _apply_env(w: Wrenn) -> None:
    for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        os.environ[k] = w.env[k]
    os.environ.pop("E2B_DEBUG", None)
    os.environ.pop("E2B_DOMAIN", None)


def pytest_collection_modifyitems(config, items):
    """Tests that restart `wrenn up` run last, so the rest of the suite shares one process.
    Tests marked `one_database` run only on SQLite: what they check (guests, images, the
    network, memory and disk across pauses) does not depend on the database, whose own part
    (the records they write) the other tests and the ring-2 store tests cover on PostgreSQL."""
    items.sort(key=lambda item: item.get_closest_marker("restarts_wrenn") is not None)
    if os.environ.get("WRENN_E2E_DATABASE") == "postgres":
        skip = pytest.mark.skip(reason="database-independent: run in the SQLite pass")
        for item in items:
            if item.get_closest_marker("one_database"):
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "restarts_wrenn: stops and starts the wrenn up process")
    config.addinivalue_line(
        "markers", "cluster: starts its own wrenn server replicas and agents (tests/e2e/cluster.py)"
    )
    config.addinivalue_line(
        "markers", "one_database: independent of the database; runs in the SQLite pass only"
    )
