"""The egress lab: a fake internet in a network namespace this test run makes, which `wrenn up`
uses as its uplink, so no guest packet can ever leave the machine.

Namespace `wrenn-e2e-inet` is joined to the host by a veth pair (host end `wre2e0`,
198.51.100.1/30; namespace end 198.51.100.2/30). Inside, on its loopback:

- 198.51.100.70 and 198.51.100.71: "internet" hosts, HTTP on 80 and TLS on 443 (a certificate
  for allowed.test, denied.test and other.test), a plain TCP service on 8000;
- 198.51.100.72: an OCI registry on port 5000, plain HTTP, while a test runs one
  (tests/e2e/registry.py); 198.51.100.73: a registry host where nothing listens (a connection
  is reset at once);
- 198.51.100.100: dnsmasq, answering allowed.test and denied.test with 198.51.100.70 (one
  address, two names: only the name a connection carries tells them apart) and other.test with
  198.51.100.71;
- 10.99.0.10: a "LAN" host (private address);
- 10.99.0.20: a LAN service the operator lifts out of the always-denied ranges (every e2e
  `wrenn up` runs with `--egress-allow-range 10.99.0.16/28`);
- 169.254.169.254: a "cloud metadata" host (on port 80 and 8080);
- 100.100.100.200: a CGNAT "metadata service".

All of it is TEST-NET-2 (198.51.100.0/24) and private space: this machine reaches its package
registries at TEST-NET-3 addresses (203.0.113.0/24), so the lab must not route those.

The host routes 198.51.100.64/26, 10.99.0.0/24, 169.254.169.254/32 and 100.100.100.200/32 to
it, so every probe has a positive control: the same request from the host namespace answers.
Each HTTP answer names the address and the `Host` it was asked for, and TLS answers the SNI.
Everything is removed again on teardown (also after a failure: stale pieces are removed at
setup too).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NETNS = "wrenn-e2e-inet"
HOST_IF = "wre2e0"
HOST_IP = "198.51.100.1"
PEER_IP = "198.51.100.2"
INTERNET = "198.51.100.70"
INTERNET2 = "198.51.100.71"
DNS = "198.51.100.100"
LAN = "10.99.0.10"
LAN_SERVICE = "10.99.0.20"
LIFTED_RANGE = "10.99.0.16/28"
METADATA = "169.254.169.254"
CGNAT = "100.100.100.200"
REGISTRY = "198.51.100.72"
REGISTRY_DOWN = "198.51.100.73"
REGISTRY_PORT = 5000
# The temporary directory of a registry this suite starts (registry.py): its config names it,
# so a registry left by a crashed run is found by that.
REGISTRY_DIR_PREFIX = "wrenn-e2e-registry-"
ADDRESSES = [INTERNET, INTERNET2, DNS, LAN, LAN_SERVICE, METADATA, CGNAT, REGISTRY, REGISTRY_DOWN]
ROUTES = ["198.51.100.64/26", "10.99.0.0/24", f"{METADATA}/32", f"{CGNAT}/32"]
NAMES = {"allowed.test": INTERNET, "denied.test": INTERNET, "other.test": INTERNET2}

# The slot range of the suite's `wrenn up` (conftest), never a developer's: its namespaces are
# `wrenn-slot-<index>`, its namespace-side veth address 10.12.0.0 + 2 * index + 1, the host's
# side one less (see wrenn-hostnet's slot layout).
FIRST_SLOT = int(os.environ.get("WRENN_E2E_FIRST_SLOT", "28672"))
SLOTS = 1024
SLOT_NET_BASE = 10 << 24 | 12 << 16


def slot_indices() -> list[int]:
    """Indices of the suite's slots that exist now."""
    out = []
    for ns in sorted(Path("/run/netns").glob("wrenn-slot-*")):
        index = ns.name.rsplit("-", 1)[1]
        if index.isdigit() and FIRST_SLOT <= int(index) < FIRST_SLOT + SLOTS:
            out.append(int(index))
    return out


def slot_namespace(index: int) -> str:
    return f"wrenn-slot-{index}"


def slot_address(index: int, host_side: bool = False) -> str:
    """A slot's namespace-side veth address (where the host reaches its guest), or the host's."""
    a = SLOT_NET_BASE + 2 * index + (0 if host_side else 1)
    return f"{a >> 24}.{(a >> 16) & 0xFF}.{(a >> 8) & 0xFF}.{a & 0xFF}"


SERVER = r'''
import http.server, socket, socketserver, ssl, sys, threading

cert, key = sys.argv[1], sys.argv[2]
addrs = sys.argv[3:]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = self.headers.get("Host", "")
        body = f"lab {self.server.server_address[0]} host={host}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # Not HTTPServer's: it looks up the address's name (getfqdn), a DNS query to the
        # host's resolver that would leave through the host's real interface.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

def serve(addr, port, tls=False):
    s = Server((addr, port), Handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()

class Echo(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(f"tcp {self.server.server_address[0]}\n".encode())

for a in addrs:
    serve(a, 80)
    serve(a, 8080)
    serve(a, 443, tls=True)
    t = Echo((a, 8000), EchoHandler)
    threading.Thread(target=t.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''


def dns_a(server: str, name: str, timeout: float = 1.0) -> str | None:
    """The first A record for `name` from `server` (a minimal DNS client: one UDP query)."""
    import random
    import socket
    import struct

    qid = random.randrange(1 << 16)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q, (server, 53))
            r = s.recv(512)
        except OSError:
            return None
    rid, flags, _, ancount = struct.unpack(">HHHH", r[:8])
    if rid != qid or flags & 0xF or ancount == 0:
        return None
    i = len(q)
    for _ in range(ancount):
        i += 2 if r[i] & 0xC0 == 0xC0 else r.index(b"\0", i) + 1 - i
        rtype, _, _, rdlen = struct.unpack(">HHIH", r[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(r[i:i + 4])
        i += rdlen
    return None


def kill_stale_registries() -> None:
    """Kills the registries (registry.py) of earlier runs and removes their directories: inside
    the lab's namespace (also killed with it) or left without one (its name deleted under them).
    Only processes whose command line names a directory of ours."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(Path(a).name == "docker-registry" for a in argv):
            continue
        dirs = [Path(a).parent for a in argv if f"/{REGISTRY_DIR_PREFIX}" in a]
        if not dirs:
            continue
        try:
            os.kill(int(proc.name), signal.SIGKILL)
        except ProcessLookupError:
            pass
        for d in dirs:
            if d.name.startswith(REGISTRY_DIR_PREFIX):
                shutil.rmtree(d, ignore_errors=True)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def in_ns(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", NETNS, *args, check=check)


class NetLab:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wrenn-netlab-"))
        self.procs: list[subprocess.Popen] = []

    def setup(self) -> "NetLab":
        self.teardown(quiet=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        run("ip", "netns", "add", NETNS)
        run("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", NETNS)
        run("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        run("ip", "link", "set", HOST_IF, "up")
        in_ns("ip", "addr", "add", f"{PEER_IP}/30", "dev", "eth0")
        in_ns("ip", "link", "set", "eth0", "up")
        in_ns("ip", "link", "set", "lo", "up")
        for a in ADDRESSES:
            in_ns("ip", "addr", "add", f"{a}/32", "dev", "lo")
        in_ns("ip", "route", "add", "default", "via", HOST_IP)
        for r in ROUTES:
            run("ip", "route", "add", r, "via", PEER_IP, "dev", HOST_IF)
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        san = ",".join(f"DNS:{n}" for n in NAMES)
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=allowed.test", "-addext", f"subjectAltName={san}",
            "-keyout", str(key), "-out", str(cert))
        server = self.dir / "server.py"
        server.write_text(SERVER)
        web = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, sys.executable, str(server), str(cert), str(key),
             INTERNET, INTERNET2, LAN, LAN_SERVICE, METADATA, CGNAT],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs.append(web)
        assert web.stdout is not None and web.stdout.readline().strip() == "ready"
        dns_args = ["--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                    f"--listen-address={DNS}", "--except-interface=eth0",
                    f"--pid-file={self.dir / 'dnsmasq.pid'}", "--log-facility=-"]
        dns_args += [f"--address=/{n}/{a}" for n, a in NAMES.items()]
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", NETNS, "dnsmasq", *dns_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.resolve_from_host("allowed.test") == INTERNET:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("the lab's DNS server did not answer")
        return self

    @staticmethod
    def resolve_from_host(name: str) -> str | None:
        """The positive control of every DNS probe: the lab's server, asked from the host."""
        return dns_a(DNS, name)

    @staticmethod
    def fetch_from_host(url: str, resolve: str | None = None) -> str | None:
        """The positive control of every HTTP probe: the same request from the host."""
        args = ["curl", "-sS", "-k", "--max-time", "5", "--noproxy", "*"]
        if resolve:
            args += ["--resolve", resolve]
        out = run(*args, url, check=False)
        return out.stdout if out.returncode == 0 else None

    def teardown(self, quiet: bool = False) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        kill_stale_registries()
        for r in ROUTES:
            run("ip", "route", "del", r, check=False)
        run("ip", "link", "del", HOST_IF, check=False)
        if os.path.exists(f"/run/netns/{NETNS}"):
            # Whatever still runs inside (a server of a crashed run) goes with it.
            pids = run("ip", "netns", "pids", NETNS, check=False).stdout.split()
            for pid in pids:
                run("kill", "-9", pid, check=False)
            run("ip", "netns", "del", NETNS, check=False)
        if not quiet:
            shutil.rmtree(self.dir, ignore_errors=True)
