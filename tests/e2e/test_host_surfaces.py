"""The host's surfaces, through the official Python SDK against a real `wrenn up`:
- `get_host(port)` names `<port>-<id>.localhost:<api port>` (the `domain` of create, connect and
  info), and that name reaches a server in the sandbox through the edge proxy (curl resolves
  `*.localhost` to loopback);
- a signed `/files` URL works as the SDK makes it, also when it names its sandbox by host name,
  and one signed for sandbox A is refused on sandbox B;
- with `network.allow_public_traffic=False` the sandbox's ports answer only requests carrying
  its traffic access token (403 without), while the SDK's own envd traffic works as before;
- the agent's RPC and proxy answer root on their Unix socket and nobody else;
- on TCG, the banner says that QEMU does not treat TCG as a security boundary.
"""

import subprocess
import time
import urllib.parse
import uuid

import httpx
import pytest
from e2b import Sandbox, SandboxNetworkOpts

RUN = uuid.uuid4().hex[:10]


def local_only(wrenn):
    if wrenn.external:
        pytest.skip("WRENN_E2E_URL: the test reads the local instance's state and port")


@pytest.fixture(scope="module")
def pair(wrenn):
    made = []
    try:
        for role in ("a", "b"):
            made.append(Sandbox.create(timeout=300, metadata={"suite": "surfaces", "run": RUN, "role": role}))
        yield made
    finally:
        for s in made:
            try:
                s.kill()
            except Exception:
                pass


def curl(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["curl", "-sS", "--noproxy", "*", "-m", "20", "-w", "\n%{http_code}", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_get_host_reaches_a_port_through_the_edge_proxy(wrenn, pair):
    local_only(wrenn)
    a, _ = pair
    domain = f"localhost:{wrenn.port}"
    assert a.sandbox_domain == domain
    assert Sandbox.connect(a.sandbox_id).sandbox_domain == domain
    assert Sandbox.get_info(a.sandbox_id).sandbox_domain == domain
    host = a.get_host(8123)
    assert host == f"8123-{a.sandbox_id}.{domain}"

    a.files.write("/tmp/www/hello.txt", f"hello from {a.sandbox_id}\n")
    a.commands.run("python3 -m http.server 8123 --bind 0.0.0.0 --directory /tmp/www", background=True)
    deadline = time.monotonic() + 60
    while True:
        r = curl(f"http://{host}/hello.txt")
        if r.stdout.endswith("\n200") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.stdout == f"hello from {a.sandbox_id}\n\n200", (r.stdout, r.stderr)
    # The same through httpx, which does not resolve *.localhost itself: to loopback, by name.
    got = httpx.get(f"http://127.0.0.1:{wrenn.port}/hello.txt", headers={"host": host})
    assert (got.status_code, got.text) == (200, f"hello from {a.sandbox_id}\n")
    # A port nobody listens on: the SDKs' "port is not open".
    closed = curl(f"http://{a.get_host(8124)}/")
    assert closed.stdout.endswith("\n502") and "port is not open" in closed.stdout, closed.stdout


def with_host(url: str, host: str) -> str:
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("http", host, u.path, u.query, ""))


def test_a_signed_url_names_its_sandbox(wrenn, pair):
    local_only(wrenn)
    a, b = pair
    path = "/tmp/signed.txt"
    a.files.write(path, b"belongs to a")
    b.files.write(path, b"belongs to b")
    url = a.download_url(path, user="root", use_signature_expiration=300)
    # As the SDK makes it (one E2B_SANDBOX_URL for every sandbox: it names none).
    assert urllib.parse.urlsplit(url).netloc == f"127.0.0.1:{wrenn.port}"
    r = httpx.get(url)
    assert (r.status_code, r.content) == (200, b"belongs to a")
    # Named by host, as the SDK's URL would be with the domain alone (49983-<id>.<domain>).
    mine = with_host(url, f"49983-{a.sandbox_id}.localhost:{wrenn.port}")
    got = curl(mine)
    assert got.stdout == "belongs to a\n200", (got.stdout, got.stderr)
    # A's signature on B, by host name or by header: B's envd refuses it.
    theirs = with_host(url, f"49983-{b.sandbox_id}.localhost:{wrenn.port}")
    got = curl(theirs)
    assert got.stdout.endswith("\n401"), got.stdout
    r = httpx.get(url, headers={"E2b-Sandbox-Id": b.sandbox_id})
    assert r.status_code == 401, r.text
    up = a.upload_url("/tmp/up.txt", user="root", use_signature_expiration=300)
    r = httpx.post(up, headers={"E2b-Sandbox-Id": b.sandbox_id}, files={"file": ("x", b"nope")})
    assert r.status_code == 401, r.text
    assert not b.files.exists("/tmp/up.txt")
    r = httpx.post(up, files={"file": ("x", b"yes")})
    assert r.status_code == 200, r.text
    assert a.files.read("/tmp/up.txt") == "yes"


def serve_port(sbx: Sandbox, port: int, text: str) -> None:
    sbx.files.write("/tmp/www/index.html", text)
    sbx.commands.run(f"python3 -m http.server {port} --bind 0.0.0.0 --directory /tmp/www", background=True)


def test_private_ports_need_the_traffic_token(wrenn):
    local_only(wrenn)
    sbx = Sandbox.create(
        timeout=300,
        metadata={"suite": "surfaces", "run": RUN, "role": "private"},
        network=SandboxNetworkOpts(allow_public_traffic=False),
    )
    try:
        token = sbx.traffic_access_token
        assert token and token != sbx._envd_access_token
        assert Sandbox.connect(sbx.sandbox_id).traffic_access_token == token
        assert Sandbox.get_info(sbx.sandbox_id).network["allow_public_traffic"] is False
        # envd (commands, files) needs no traffic token: the SDK sends none there.
        serve_port(sbx, 8080, "private page")
        url = f"http://{sbx.get_host(8080)}/"
        deadline = time.monotonic() + 60
        while True:
            ok = curl("-H", f"e2b-traffic-access-token: {token}", url)
            if ok.stdout.endswith("\n200") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ok.stdout == "private page\n200", (ok.stdout, ok.stderr)
        for headers in ([], ["-H", "e2b-traffic-access-token: wrong"],
                        ["-H", f"e2b-traffic-access-token: {sbx._envd_access_token}"]):
            r = curl(*headers, url)
            assert r.stdout.endswith("\n403") and "traffic access token" in r.stdout, r.stdout
        # By header routing too (the SDK's sandbox URL).
        r = httpx.get(f"http://127.0.0.1:{wrenn.port}/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8080"})
        assert r.status_code == 403, r.text
    finally:
        sbx.kill()


def test_public_ports_need_nothing(wrenn, pair):
    local_only(wrenn)
    _, b = pair
    assert b.traffic_access_token is None
    serve_port(b, 8080, "public page")
    url = f"http://{b.get_host(8080)}/"
    deadline = time.monotonic() + 60
    while True:
        r = curl(url)
        if r.stdout.endswith("\n200") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.stdout == "public page\n200", (r.stdout, r.stderr)


def test_only_root_reaches_the_agent(wrenn, pair):
    local_only(wrenn)
    a, _ = pair
    sock = wrenn.state_dir / "run" / "agent.sock"
    assert wrenn.agent_url() == f"unix:{sock}"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    rpc = ["--unix-socket", str(sock), "-X", "POST", "-H", "content-type: application/json",
           "--data", "{}", "http://agent/wrenn.agent.v1.AgentService/HostInfo"]
    proxy = ["--unix-socket", str(sock), "-H", f"E2b-Sandbox-Id: {a.sandbox_id}", "http://agent/health"]
    r = curl(*rpc)
    assert r.stdout.endswith("\n200") and '"hostId":"local"' in r.stdout, (r.stdout, r.stderr)
    r = curl(*proxy)
    assert r.stdout.endswith("\n204"), (r.stdout, r.stderr)
    for what, args in (("RPC", rpc), ("proxy", proxy)):
        r = curl(*args, user="nobody")
        assert r.returncode == 7, f"nobody reached the agent's {what}: {r.stdout} {r.stderr}"
        assert "Permission denied" in r.stderr or "Couldn't connect" in r.stderr, r.stderr


def test_the_banner_tells_tcg_apart(wrenn):
    local_only(wrenn)
    first = wrenn.banner.splitlines()[0]
    assert first.startswith("Wrenn is up on "), wrenn.banner
    if "(tcg," in first:
        assert "QEMU does not treat TCG as a security boundary" in wrenn.banner, wrenn.banner
    else:
        assert "TCG" not in wrenn.banner, wrenn.banner
    assert f"http://<port>-<sandboxID>.localhost:{wrenn.port}" in wrenn.banner, wrenn.banner
