"""A guest that lies to the host: root inside replaces envd with a server whose every answer
is an endless body. The agent keeps sampling it (`GET /metrics` every 5 s) and must hang up
after its cap (64 KiB) each time instead of buffering what the guest sends.

The jail's probes (uid, seccomp, cgroup limits, console flood, fork bomb, memory hog, disk
filler, the template's hashes) are the VM test `crates/wrenn-agent/tests/jail_lab.rs`.
"""

import time
import urllib.request

import pytest
from e2b import Sandbox

import netlab

# Guest, image and network paths: the same on either database (see conftest).
pytestmark = pytest.mark.one_database

FAKE_ENVD = r'''#!/usr/bin/python3
import socketserver

served = {"requests": 0, "bytes": 0}
CHUNK = b'{"cpu_count":2,"mem_total":1},' * 2048

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().decode(errors="replace")
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
        if path == "/served":
            body = f'{served["requests"]} {served["bytes"]}'.encode()
            head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.wfile.write(head + body)
            return
        served["requests"] += 1
        # No length: the body ends when the connection does, which this server never ends.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
        try:
            while True:
                self.wfile.write(CHUNK)
                served["bytes"] += len(CHUNK)
        except OSError:
            pass

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

Server(("0.0.0.0", 49983), Handler).serve_forever()
'''


# Never through a proxy the environment names: the request goes to the slot, on this host.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def vm_rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def served_by_fake(timeout: float) -> tuple[str, int, int]:
    """Finds the fake envd through the slots' addresses (where the host reaches a guest's
    envd) and returns (address, requests, bytes) it served so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for index in netlab.slot_indices():
            ip = netlab.slot_address(index)
            try:
                with DIRECT.open(f"http://{ip}:49983/served", timeout=2) as r:
                    requests, sent = r.read().decode().split()
                    return ip, int(requests), int(sent)
            except (OSError, ValueError):
                continue
        time.sleep(1)
    raise AssertionError("the fake envd never answered")


def test_an_endless_body_from_a_replaced_envd_does_not_grow_the_agent(wrenn):
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.files.write("/tmp/fake-envd", FAKE_ENVD)
        agent = wrenn.proc.pid
        before = vm_rss_kib(agent)
        # The guest's init restarts /usr/bin/envd when it exits: swap the binary, then end
        # the real one a moment after this command has returned.
        sbx.commands.run(
            "install -m 0755 /tmp/fake-envd /usr/local/bin/fake-envd && "
            "mv /usr/bin/envd /usr/bin/envd.real && ln -s /usr/local/bin/fake-envd /usr/bin/envd && "
            "(setsid sh -c 'sleep 1; pkill -x envd' >/dev/null 2>&1 &)",
            user="root",
            timeout=30,
        )
        _, requests0, _ = served_by_fake(timeout=30)
        # Six sampler rounds against the endless body.
        time.sleep(32)
        _, requests, sent = served_by_fake(timeout=10)
        after = vm_rss_kib(agent)
        assert requests - requests0 >= 4, (requests0, requests)
        # The agent hung up early each time: what the guest got out per request stays near
        # the cap plus socket buffers, not what a 3 s read timeout would have let through.
        assert sent / requests < 8 << 20, (requests, sent)
        assert after - before < 32 << 10, f"agent grew from {before} to {after} KiB"
        # The host is unharmed: its API still answers, and so does a new sandbox.
        other = Sandbox.create(timeout=120)
        try:
            assert other.commands.run("echo ok", timeout=30).stdout.strip() == "ok"
        finally:
            other.kill()
    finally:
        sbx.kill()
