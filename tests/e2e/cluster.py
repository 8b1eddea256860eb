"""A Wrenn cluster on this machine: PostgreSQL (a fresh database), `wrenn server` replicas on
loopback ports, and `wrenn agent`s, each in a network namespace of its own acting as a separate
host (its slots, uplink table and sandbox proxy inside it).

Agent `i` lives in namespace `wrenn-c<i>`, joined to the host by a veth pair (host end
`wrc<i>h` 172.31.<i>.1/30, namespace end 172.31.<i>.2/30): the replicas listen on all addresses,
so agents reach them at 172.31.<i>.1, and the replicas reach agent `i` at 172.31.<i>.2:5007.
Guests reach nothing outside their slot (`--uplink none`; DNS forwarded to a closed port on the
agent's own loopback). The agents share one template cache (`--template-cache`): the first to
start builds `base` there, the others wait for its lock and open it; and one shared store
(`--shared-store`) their paused sandboxes are copied to: a bucket of a real S3-compatible
server (moto's, from PyPI, listening on the host; agents reach it at 172.31.<i>.1), or a
directory when moto is not installed.

Everything is removed on `teardown()`, also after a failure, and stale pieces of an earlier
run at `setup()`.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from conftest import ROOT, free_port, psql, wrenn_binary

AGENTS = 3
REPLICAS = 2
AGENT_PORT = 5007
# Slot ranges of the agents: apart from the suite's `wrenn up` (28672..) and the upstream
# runner's (24576..).
FIRST_SLOT = 26624
SLOTS_PER_AGENT = 32
SLOT_STRIDE = 64
# Heartbeats every second; unhealthy after 3 s of silence, lost after 8 s.
HEARTBEAT = 1
UNHEALTHY_AFTER = 3
LOST_AFTER = 8
START_TIMEOUT = float(os.environ.get("WRENN_E2E_START_TIMEOUT", "1200"))


def netns(i: int) -> str:
    return f"wrenn-c{i}"


def host_ip(i: int) -> str:
    return f"172.31.{i}.1"


def agent_ip(i: int) -> str:
    return f"172.31.{i}.2"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Process:
    """A `wrenn server` or `wrenn agent` with its log file."""

    def __init__(self, name: str, args: list[str], log: Path, ready: str, env: dict | None = None):
        self.name, self.args, self.log, self.ready = name, args, log, ready
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        seen = threading.Event()
        out: list[str] = []

        def reader():
            for line in self.proc.stdout:
                out.append(line)
                if self.ready in line:
                    seen.set()
            seen.set()

        threading.Thread(target=reader, daemon=True).start()
        if not seen.wait(START_TIMEOUT) or self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} did not start: {''.join(out)}\n{tail}")

    def stop(self, timeout: float = 180) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no clean stop (an agent's QEMUs outlive it)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="wrenn-cluster-", dir="/var/tmp"))
        self.db = f"wrenn_cluster_{uuid.uuid4().hex[:10]}"
        base = os.environ.get("WRENN_E2E_PG_ADMIN", "postgres://wrenn:wrenn@127.0.0.1")
        self.database_url = f"{base}/{self.db}"
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.servers: list[Process] = []
        self.agents: list[Process] = []
        self.api_key = ""
        self.admin_token = ""
        self.join_token = ""
        # The shared store: a real S3-compatible server (moto's, from PyPI) when installed,
        # else a directory.
        server = os.environ.get("WRENN_TEST_MOTO_SERVER", str(ROOT / ".venv" / "bin" / "moto_server"))
        self.moto_bin = server if Path(server).exists() else None
        self.s3_port = free_port()
        self.moto: subprocess.Popen | None = None

    # Network.

    def _remove_network(self) -> None:
        for i in range(1, AGENTS + 1):
            sh("ip", "netns", "del", netns(i), check=False)
            sh("ip", "link", "del", f"wrc{i}h", check=False)

    def _make_network(self) -> None:
        for i in range(1, AGENTS + 1):
            ns = netns(i)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"wrc{i}h", "type", "veth", "peer", "name", f"wrc{i}a")
            sh("ip", "link", "set", f"wrc{i}a", "netns", ns)
            sh("ip", "addr", "add", f"{host_ip(i)}/30", "dev", f"wrc{i}h")
            sh("ip", "link", "set", f"wrc{i}h", "up")
            sh("ip", "-n", ns, "addr", "add", f"{agent_ip(i)}/30", "dev", f"wrc{i}a")
            sh("ip", "-n", ns, "link", "set", f"wrc{i}a", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    # Processes.

    def server_url(self, r: int) -> str:
        return f"http://127.0.0.1:{self.ports[r]}"

    def _server(self, r: int) -> Process:
        state = self.work / f"server{r}"
        return Process(
            f"server{r}",
            [
                str(wrenn_binary()), "server",
                "--listen", f"0.0.0.0:{self.ports[r]}",
                "--public-url", self.server_url(r),
                "--state-dir", str(state),
                "--database-url", self.database_url,
                "--heartbeat-interval", str(HEARTBEAT),
                "--host-unhealthy-after", str(UNHEALTHY_AFTER),
                "--host-lost-after", str(LOST_AFTER),
                "--reconcile-interval", "2",
                # Records a dead replica left mid-operation settle within the test.
                "--settle-grace", "20",
                "--expire-lease", "10",
            ],
            self.work / f"server{r}.log",
            "export E2B_API_KEY=",
        )

    def agent_state(self, i: int) -> Path:
        return self.work / f"agent{i}"

    def _agent(self, i: int) -> Process:
        servers = ",".join(f"http://{host_ip(i)}:{p}" for p in self.ports)
        first = FIRST_SLOT + (i - 1) * SLOT_STRIDE
        return Process(
            f"agent{i}",
            [
                # Only the network namespace: the agent keeps the host's mounts (cgroups).
                "nsenter", f"--net=/run/netns/{netns(i)}", "--",
                str(wrenn_binary()), "agent",
                "--server", servers,
                "--join-token", self.join_token,
                "--host-id", f"host{i}",
                "--listen", f"{agent_ip(i)}:{AGENT_PORT}",
                "--state-dir", str(self.agent_state(i)),
                "--template-cache", str(self.work / "templates"),
                "--shared-store", self.shared_store(),
                "--first-slot", str(first), "--slots", str(SLOTS_PER_AGENT),
                "--uplink", "none", "--dns-upstream", "127.0.0.1:9",
                "--no-code-interpreter", "--hot-pool", "0",
                "--vcpus", "1",
                "--progress", "plain",
            ],
            self.work / f"agent{i}.log",
            "wrenn agent host",
            env=self.s3_env(i),
        )

    BUCKET = "wrenn-cluster"

    def shared_store(self) -> str:
        if self.moto_bin:
            return f"s3://{self.BUCKET}/copies"
        return str(self.work / "store")

    def s3_env(self, i: int) -> dict:
        """What agent `i` reaches the S3 server with (from its namespace, at the host's end of
        its veth); static test credentials, so nothing looks for others."""
        if not self.moto_bin:
            return {}
        return {
            "AWS_ENDPOINT_URL": f"http://{host_ip(i)}:{self.s3_port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }

    def _start_s3(self) -> None:
        if not self.moto_bin:
            return
        log = open(self.work / "moto.log", "ab")
        self.moto = subprocess.Popen(
            [self.moto_bin, "-H", "0.0.0.0", "-p", str(self.s3_port)],
            stdout=log, stderr=log, start_new_session=True,
        )
        url = f"http://127.0.0.1:{self.s3_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.put(f"{url}/{self.BUCKET}", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def setup(self) -> "Cluster":
        self._remove_network()
        self._make_network()
        psql(f"CREATE DATABASE {self.db}")
        self._start_s3()
        for r in range(REPLICAS):
            s = self._server(r)
            s.start()
            self.servers.append(s)
            if r == 0:
                state = self.work / "server0"
                self.join_token = (state / "join-token").read_text().strip()
                self.admin_token = (state / "admin-token").read_text().strip()
                env = (state / "env").read_text()
                self.api_key = re.search(r"E2B_API_KEY=(\S+)", env).group(1)
        # The first agent builds the shared template, the others open it.
        for i in range(1, AGENTS + 1):
            a = self._agent(i)
            a.start()
            self.agents.append(a)
        self.wait_hosts(lambda hs: sum(h["health"] == "healthy" and h["schedulable"] for h in hs) == AGENTS)
        return self

    def agent(self, i: int) -> Process:
        return self.agents[i - 1]

    def restart_agent(self, i: int) -> None:
        a = self._agent(i)
        a.start()
        self.agents[i - 1] = a

    def restart_server(self, r: int) -> None:
        s = self._server(r)
        s.start()
        self.servers[r] = s

    # Reading the cluster.

    def hosts(self, r: int = 0) -> list[dict]:
        res = httpx.get(
            f"{self.server_url(r)}/admin/hosts",
            headers={"X-Admin-Token": self.admin_token},
            timeout=10,
        )
        res.raise_for_status()
        return res.json()

    def wait_hosts(self, pred, timeout: float = 60, r: int = 0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            hs = self.hosts(r)
            if pred(hs):
                return hs
            if time.monotonic() > deadline:
                raise AssertionError(f"hosts never got there: {hs}")
            time.sleep(0.5)

    def holds(self, i: int, sandbox_id: str) -> bool:
        """Whether agent `i`'s state directory holds the sandbox (its record names it; the
        directory of one made from a warm VM is named after that VM)."""
        for record in (self.agent_state(i) / "sandboxes").glob("*/sandbox.json"):
            try:
                if f'"{sandbox_id}"' in record.read_text():
                    return True
            except FileNotFoundError:
                pass
        return False

    def host_of(self, sandbox_id: str, exclude: int | None = None) -> int | None:
        """The agent that holds the sandbox (`exclude`: not that one, e.g. a dead agent whose
        directory still has it)."""
        for i in range(1, AGENTS + 1):
            if i != exclude and self.holds(i, sandbox_id):
                return i
        return None

    def store_has(self, sandbox_id: str) -> bool:
        """Whether the shared store holds a complete copy of the paused sandbox."""
        if self.moto_bin:
            import boto3  # moto's own dependency
            import botocore.exceptions

            s3 = boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{self.s3_port}",
                aws_access_key_id="test",
                aws_secret_access_key="test",
                region_name="us-east-1",
            )
            try:
                s3.head_object(Bucket=self.BUCKET, Key=f"copies/paused/{sandbox_id}/complete")
                return True
            except botocore.exceptions.ClientError:
                return False
        return (self.work / "store" / "paused" / sandbox_id / "complete").exists()

    def qemu_pids(self, i: int) -> list[int]:
        out = sh("pgrep", "-f", f"qemu-system.*{self.agent_state(i)}", check=False).stdout
        return [int(p) for p in out.split()]

    def opts(self, r: int) -> dict:
        """SDK connection options for replica `r`."""
        url = self.server_url(r)
        return {"api_key": self.api_key, "api_url": url, "sandbox_url": url}

    # Teardown.

    def teardown(self) -> None:
        for a in self.agents:
            try:
                a.stop()
            except Exception:
                pass
        for s in self.servers:
            try:
                s.stop(timeout=30)
            except Exception:
                pass
        # Whatever a killed agent left: its QEMUs, then its slots' namespaces and cgroups go
        # with the agent that is started and stopped once more on its state directory.
        for i in range(1, AGENTS + 1):
            for pid in self.qemu_pids(i):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        first, last = FIRST_SLOT, FIRST_SLOT + AGENTS * SLOT_STRIDE
        for ns in Path("/run/netns").glob("wrenn-slot-*"):
            index = ns.name.rsplit("-", 1)[1]
            if index.isdigit() and first <= int(index) < last:
                sh("ip", "netns", "del", ns.name, check=False)
        self._remove_network()
        if self.moto:
            self.moto.kill()
            self.moto.wait()
        try:
            psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        except subprocess.CalledProcessError:
            pass
        if not os.environ.get("WRENN_E2E_KEEP"):
            shutil.rmtree(self.work, ignore_errors=True)
