"""The official E2B Python SDK (`e2b` 2.x), unmodified, against a real `wrenn up`: control plane,
host agent with QEMU guests and the edge proxy, all through E2B_API_URL / E2B_SANDBOX_URL.

Every step asserts a result. Sandboxes a test creates are killed in `finally` blocks; the
shared ones live in module-scoped fixtures, so the file creates few guests (each create is about
a second under TCG).
"""

import asyncio
import gzip
import hashlib
import io
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileType,
    FilesystemEventType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxState,
    TimeoutException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

RUN = uuid.uuid4().hex[:10]
TIMEOUT = 600


def wait_until(pred, timeout=20.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def kill_quietly(*sandboxes):
    for s in sandboxes:
        if s is None:
            continue
        try:
            Sandbox.kill(s.sandbox_id)
        except Exception:
            pass


def http_status(method: str, url: str, data: bytes | None = None, headers=None):
    """(status, body, headers) of a plain urllib request (which, unlike httpx, leaves a gzip
    body encoded); no exception on 4xx/5xx."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.fixture(scope="module")
def sbx(wrenn):
    s = Sandbox.create(timeout=TIMEOUT, metadata={"suite": "py-e2e", "run": RUN, "role": "main"})
    try:
        yield s
    finally:
        kill_quietly(s)


# --- two sandboxes ---------------------------------------------------------------------------


def test_two_sandboxes_alive_at_once(sbx):
    other = Sandbox.create(timeout=TIMEOUT, metadata={"suite": "py-e2e", "run": RUN, "role": "other"})
    try:
        assert other.sandbox_id != sbx.sandbox_id
        sbx.files.write("/tmp/only-in-one.txt", "one")
        other.files.write("/tmp/only-in-other.txt", "other")
        assert sbx.files.read("/tmp/only-in-one.txt") == "one"
        assert not other.files.exists("/tmp/only-in-one.txt")
        assert not sbx.files.exists("/tmp/only-in-other.txt")
        # Commands go to the right guest: each has its own hostname and boot id.
        a = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        b = other.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        assert a and b and a != b

        listed = {
            i.sandbox_id: i
            for i in Sandbox.list(query=SandboxQuery(metadata={"run": RUN})).next_items()
        }
        assert {sbx.sandbox_id, other.sandbox_id} <= set(listed)
        assert listed[other.sandbox_id].metadata["role"] == "other"
        assert listed[sbx.sandbox_id].state == SandboxState.RUNNING
        assert sbx.is_running() and other.is_running()
    finally:
        kill_quietly(other)
    assert not other.is_running()
    assert sbx.is_running()


# --- commands --------------------------------------------------------------------------------


def test_command_foreground_envs_cwd_callbacks(sbx):
    sbx.files.make_dir("/tmp/work dir")
    out, err = [], []
    r = sbx.commands.run(
        'echo "foo=$FOO"; pwd; echo to-err >&2; echo line2; echo err2 >&2',
        envs={"FOO": "bar baz"},
        cwd="/tmp/work dir",
        on_stdout=out.append,
        on_stderr=err.append,
        timeout=60,
    )
    assert r.exit_code == 0
    assert r.stdout == "foo=bar baz\n/tmp/work dir\nline2\n"
    assert r.stderr == "to-err\nerr2\n"
    assert "".join(out) == r.stdout
    assert "".join(err) == r.stderr

    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; exit 7")
    assert e.value.exit_code == 7
    assert e.value.stdout == "partial\n"


def test_command_user_root_vs_user(sbx):
    assert sbx.commands.run("id -un").stdout == "user\n"
    assert sbx.commands.run("id -un", user="user").stdout == "user\n"
    assert sbx.commands.run("id -un; echo $HOME", user="root").stdout == "root\n/root\n"
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    # The user's default working directory is its home.
    assert sbx.commands.run("pwd").stdout == "/home/user\n"


def test_command_timeout_raises_and_kills(sbx):
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; echo marker-timeout-$((6*7))", timeout=2)
    assert time.monotonic() - start < 20
    # The process is gone (envd ends it with the stream's deadline).
    assert wait_until(
        lambda: all("marker-timeout" not in " ".join(p.args) for p in sbx.commands.list()), 15
    )


def test_background_stdin_connect_list_close(sbx):
    h = sbx.commands.run(
        'echo ready; while read -r line; do echo "got:$line"; done; echo stdin-closed',
        background=True,
        stdin=True,
        envs={"BG_MARK": RUN},
        cwd="/tmp",
    )
    assert h.pid > 0
    procs = {p.pid: p for p in sbx.commands.list()}
    assert h.pid in procs
    info = procs[h.pid]
    assert info.cmd == "/bin/bash"
    assert info.args[-1].startswith("echo ready; while read -r line")
    assert info.envs.get("BG_MARK") == RUN
    assert info.cwd == "/tmp"
    assert info.tag is None  # the Python SDK has no way to set a tag

    # A second client attaches and receives the output produced after it connected.
    follower = sbx.commands.connect(h.pid, timeout=60)
    assert follower.pid == h.pid
    followed = []
    ended = threading.Event()

    def follow():
        try:
            followed.append(follower.wait(on_stdout=lambda s: None))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            followed.append(e)
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.5)
    sbx.commands.send_stdin(h.pid, "hello\n")
    h.send_stdin("world\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.exit_code == 0
    assert r.stdout == "ready\ngot:hello\ngot:world\nstdin-closed\n"
    assert ended.wait(30)
    res = followed[0]
    assert not isinstance(res, Exception), res
    assert res.exit_code == 0
    assert "got:hello\ngot:world\nstdin-closed\n" in res.stdout
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_background_kill_and_connect(sbx):
    h = sbx.commands.run(
        "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.3; done",
        background=True,
        timeout=0,
    )
    try:
        # connect() sees output written after the connection.
        c = sbx.commands.connect(h.pid, timeout=60)
        seen = []
        it_done = threading.Event()

        def read():
            try:
                for stdout, _stderr, _pty in c:
                    if stdout:
                        seen.append(stdout)
            except Exception:
                pass
            it_done.set()

        threading.Thread(target=read, daemon=True).start()
        assert wait_until(lambda: "tick-" in "".join(seen), 20), seen
        assert h.pid in [p.pid for p in sbx.commands.list()]
    finally:
        assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as e:
        h.wait()
    assert e.value.exit_code == -1  # killed by SIGKILL
    assert "tick-0" in e.value.stdout
    assert it_done.wait(20)
    assert wait_until(lambda: h.pid not in [p.pid for p in sbx.commands.list()], 10)
    assert sbx.commands.kill(h.pid) is False


# --- PTY -------------------------------------------------------------------------------------


def test_pty_create_input_resize_kill(sbx):
    data = bytearray()
    pty = sbx.pty.create(PtySize(rows=24, cols=80), timeout=120)
    ended = threading.Event()

    def pump():
        try:
            pty.wait(on_pty=lambda d: data.extend(d))
        except CommandExitException:
            pass
        except Exception:
            pass
        ended.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert pty.pid in [p.pid for p in sbx.commands.list()]
        sbx.pty.send_stdin(pty.pid, b"echo typed-$((20+22)); stty size\n")
        assert wait_until(lambda: b"typed-42" in data and b"24 80" in data, 30), bytes(data)
        # The terminal echoes the typed line itself (before the shell expands it).
        assert b"echo typed-$((20+22))" in data
        sbx.pty.resize(pty.pid, PtySize(rows=33, cols=101))
        sbx.pty.send_stdin(pty.pid, b"stty size\n")
        assert wait_until(lambda: b"33 101" in data, 30), bytes(data)
        assert sbx.commands.run("id -un").stdout == "user\n"
    finally:
        killed = sbx.pty.kill(pty.pid)
    assert killed is True
    assert ended.wait(20)
    assert wait_until(lambda: pty.pid not in [p.pid for p in sbx.commands.list()], 10)


# --- files -----------------------------------------------------------------------------------


def test_files_write_text_bytes_stream_many(sbx, tmp_path):
    base = f"/tmp/files-{RUN}"
    info = sbx.files.write(f"{base}/text.txt", "héllo\nwörld\n")
    assert info.path == f"{base}/text.txt" and info.name == "text.txt"
    assert info.type == FileType.FILE
    blob = bytes(range(256)) * 40
    sbx.files.write(f"{base}/bytes.bin", blob)
    sbx.files.write(f"{base}/stream.bin", io.BytesIO(blob[::-1]))
    local = tmp_path / "local.bin"
    local.write_bytes(b"from a file object\n" * 1000)
    with open(local, "rb") as f:
        sbx.files.write(f"{base}/fileobj.bin", f)

    many = sbx.files.write_files(
        [
            WriteEntry(path=f"{base}/many/a.txt", data="A"),
            WriteEntry(path=f"{base}/many/b.bin", data=b"\x00\x01\x02"),
            WriteEntry(path=f"{base}/many/sub/c.txt", data="C" * 5000),
        ]
    )
    assert sorted(w.path for w in many) == sorted(
        [f"{base}/many/a.txt", f"{base}/many/b.bin", f"{base}/many/sub/c.txt"]
    )

    # Read back as text, bytes and stream; and check the guest sees the same bytes.
    assert sbx.files.read(f"{base}/text.txt") == "héllo\nwörld\n"
    assert bytes(sbx.files.read(f"{base}/bytes.bin", format="bytes")) == blob
    chunks = list(sbx.files.read(f"{base}/stream.bin", format="stream"))
    assert all(isinstance(c, bytes) for c in chunks)
    assert b"".join(chunks) == blob[::-1]
    assert bytes(sbx.files.read(f"{base}/fileobj.bin", format="bytes")) == local.read_bytes()
    assert sbx.files.read(f"{base}/many/a.txt") == "A"
    assert bytes(sbx.files.read(f"{base}/many/b.bin", format="bytes")) == b"\x00\x01\x02"
    assert sbx.files.read(f"{base}/many/sub/c.txt") == "C" * 5000
    sums = sbx.commands.run(f"cd {base} && sha256sum bytes.bin stream.bin fileobj.bin").stdout
    for name, content in [
        ("bytes.bin", blob),
        ("stream.bin", blob[::-1]),
        ("fileobj.bin", local.read_bytes()),
    ]:
        assert f"{hashlib.sha256(content).hexdigest()}  {name}" in sums


def test_files_gzip_upload_and_download(sbx):
    base = f"/tmp/gzip-{RUN}"
    payload = ("compressible line\n" * 5000).encode()
    # The SDK's gzip option: octet-stream upload with Content-Encoding: gzip.
    sbx.files.write(f"{base}/sdk.txt", payload, gzip=True)
    assert sbx.commands.run(f"stat -c %s {base}/sdk.txt").stdout == f"{len(payload)}\n"
    assert bytes(sbx.files.read(f"{base}/sdk.txt", format="bytes", gzip=True)) == payload
    assert sbx.files.read(f"{base}/sdk.txt", gzip=True) == payload.decode()

    # The same over plain HTTP on signed URLs, checking the wire encoding both ways.
    up = sbx.upload_url(f"{base}/plain.txt")
    st, body, _ = http_status(
        "POST",
        up,
        gzip.compress(payload),
        {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert st == 200, body
    assert sbx.commands.run(f"stat -c %s {base}/plain.txt").stdout == f"{len(payload)}\n"
    st, body, headers = http_status(
        "GET", sbx.download_url(f"{base}/plain.txt"), headers={"Accept-Encoding": "gzip"}
    )
    assert st == 200
    assert headers.get("Content-Encoding") == "gzip"
    assert len(body) < len(payload) // 10
    assert gzip.decompress(body) == payload


def test_files_list_exists_info_mkdir_rename_remove(sbx):
    base = f"/tmp/fsops-{RUN}"
    assert sbx.files.make_dir(base) is True
    assert sbx.files.make_dir(base) is False
    assert sbx.files.make_dir(f"{base}/deep/er/dir") is True
    sbx.files.write(f"{base}/f.txt", "12345")
    sbx.files.write(f"{base}/deep/g.txt", "g")

    entries = {e.name: e for e in sbx.files.list(base)}
    assert set(entries) == {"f.txt", "deep"}
    assert entries["f.txt"].type == FileType.FILE and entries["f.txt"].size == 5
    assert entries["deep"].type == FileType.DIR
    deep = {e.path for e in sbx.files.list(base, depth=3)}
    assert {f"{base}/deep/g.txt", f"{base}/deep/er", f"{base}/deep/er/dir"} <= deep

    assert sbx.files.exists(f"{base}/f.txt")
    assert sbx.files.exists(f"{base}/deep")
    assert not sbx.files.exists(f"{base}/nope")

    i = sbx.files.get_info(f"{base}/f.txt")
    assert i.type == FileType.FILE
    assert i.size == 5
    assert i.name == "f.txt" and i.path == f"{base}/f.txt"
    assert i.owner == "user" and i.group == "user"
    assert i.permissions == "-rw-r--r--", i.permissions
    assert abs(i.modified_time - datetime.now(timezone.utc)) < timedelta(minutes=10)
    d = sbx.files.get_info(f"{base}/deep")
    assert d.type == FileType.DIR and d.permissions.startswith("d")
    sbx.commands.run(f"chmod 600 {base}/f.txt")
    assert sbx.files.get_info(f"{base}/f.txt").permissions == "-rw-------"
    # Written as root, owned by root.
    sbx.files.write(f"{base}/rootfile", "r", user="root")
    assert sbx.files.get_info(f"{base}/rootfile").owner == "root"

    moved = sbx.files.rename(f"{base}/f.txt", f"{base}/deep/moved.txt")
    assert moved.path == f"{base}/deep/moved.txt"
    assert not sbx.files.exists(f"{base}/f.txt")
    assert sbx.files.read(f"{base}/deep/moved.txt") == "12345"

    sbx.files.remove(f"{base}/deep/moved.txt")
    assert not sbx.files.exists(f"{base}/deep/moved.txt")
    sbx.files.remove(f"{base}/deep")
    assert not sbx.files.exists(f"{base}/deep")
    assert {e.name for e in sbx.files.list(base)} == {"rootfile"}
    with pytest.raises(NotFoundException):
        sbx.files.read(f"{base}/gone.txt")
    with pytest.raises(NotFoundException):
        sbx.files.list(f"{base}/gone")


def test_watch_dir_sync_and_recursive(sbx):
    base = f"/tmp/watch-{RUN}"
    sbx.files.make_dir(f"{base}/sub")
    h = sbx.files.watch_dir(base)
    try:
        sbx.files.write(f"{base}/w.txt", "x")
        sbx.files.write(f"{base}/sub/ignored.txt", "x")
        events = wait_until(lambda: [e for e in h.get_new_events() if e.name == "w.txt"] or None, 15)
    finally:
        h.stop()
    assert events, "no event for w.txt"
    assert {e.type for e in events} & {FilesystemEventType.CREATE, FilesystemEventType.WRITE}

    r = sbx.files.watch_dir(base, recursive=True)
    got = []
    try:
        sbx.files.write(f"{base}/sub/deep.txt", "y")
        sbx.files.remove(f"{base}/w.txt")

        def collect():
            got.extend(r.get_new_events())
            names = {(e.name, e.type) for e in got}
            return ("sub/deep.txt", FilesystemEventType.CREATE) in names and (
                "w.txt",
                FilesystemEventType.REMOVE,
            ) in names

        assert wait_until(collect, 15), got
    finally:
        r.stop()


def test_async_watch_dir_and_pty(sbx):
    base = f"/tmp/awatch-{RUN}"
    sbx.files.make_dir(base)

    async def main():
        a = await AsyncSandbox.connect(sbx.sandbox_id)
        events = []
        got = asyncio.Event()

        def on_event(e):
            events.append(e)
            if e.name == "async.txt":
                got.set()

        h = await a.files.watch_dir(base, on_event=on_event, timeout=60)
        try:
            await a.files.write(f"{base}/async.txt", "hi")
            await asyncio.wait_for(got.wait(), 20)
        finally:
            await h.stop()
        assert any(
            e.name == "async.txt"
            and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE)
            for e in events
        ), events

        # Async PTY with the on_data callback.
        data = bytearray()
        pty = await a.pty.create(PtySize(rows=20, cols=70), on_data=data.extend, timeout=60)
        try:
            await a.pty.send_stdin(pty.pid, b"echo async-$((3*3)); stty size\n")
            for _ in range(300):
                if b"async-9" in data and b"20 70" in data:
                    break
                await asyncio.sleep(0.1)
            assert b"async-9" in data and b"20 70" in data, bytes(data)
            await a.pty.resize(pty.pid, PtySize(rows=40, cols=120))
            await a.pty.send_stdin(pty.pid, b"stty size\n")
            for _ in range(300):
                if b"40 120" in data:
                    break
                await asyncio.sleep(0.1)
            assert b"40 120" in data, bytes(data)
        finally:
            assert await a.pty.kill(pty.pid) is True

        r = await a.commands.run("echo async-cmd $X", envs={"X": "ok"})
        assert r.stdout == "async-cmd ok\n"

    asyncio.run(main())


# --- signed URLs -----------------------------------------------------------------------------


def test_signed_upload_and_download_urls(sbx):
    # Made by the default user first, so the user's upload below may write into it.
    assert sbx.files.make_dir(f"/tmp/signed-{RUN}") is True
    path = f"/tmp/signed-{RUN}/as-root.txt"
    up = sbx.upload_url(path, user="root", use_signature_expiration=120)
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(up).query)
    assert q["path"] == [path] and q["username"] == ["root"]
    assert q["signature"][0].startswith("v1_") and "signature_expiration" in q

    r = httpx.post(up, files={"file": ("as-root.txt", b"uploaded via signed url\n")})
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == path
    assert sbx.files.get_info(path).owner == "root"
    assert sbx.commands.run(f"cat {path}", user="root").stdout == "uploaded via signed url\n"

    down = sbx.download_url(path, user="root", use_signature_expiration=120)
    st, body, _ = http_status("GET", down)
    assert st == 200 and body == b"uploaded via signed url\n"

    # Default user (no user= given) and no expiration.
    p2 = f"/tmp/signed-{RUN}/as-user.txt"
    r = httpx.post(sbx.upload_url(p2), files={"file": ("x", b"user upload")})
    assert r.status_code == 200, r.text
    assert sbx.files.get_info(p2).owner == "user"
    assert httpx.get(sbx.download_url(p2)).content == b"user upload"


def test_signed_url_expired_is_rejected(sbx):
    path = f"/tmp/signed2-{RUN}/expiring.txt"
    sbx.files.write(path, "expiring")
    # Expired a minute ago.
    st, body, _ = http_status("GET", sbx.download_url(path, use_signature_expiration=-60))
    assert st in (401, 403), (st, body)
    assert b"expiring" not in body
    up = sbx.upload_url(f"{path}.up", use_signature_expiration=-60)
    r = httpx.post(up, files={"file": ("x", b"late")})
    assert r.status_code in (401, 403), (r.status_code, r.text)
    assert not sbx.files.exists(f"{path}.up")

    # Valid for 2 s: works now, refused once that has passed (with 2.5 s to spare).
    expiring = sbx.download_url(path, use_signature_expiration=2)
    st, body, _ = http_status("GET", expiring)
    assert st == 200 and body == b"expiring"
    time.sleep(4.5)
    st, body, _ = http_status("GET", expiring)
    assert st in (401, 403), (st, body)
    assert b"expiring" not in body


def _with_query(url: str, **changes) -> str:
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    q.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def _flip(sig: str) -> str:
    return sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")


def test_signed_url_tampered_is_rejected(sbx):
    """A signed URL only works unchanged: another path, user or operation, or an altered
    signature, is refused, as E2B's envd does, with 401 ("invalid signature")."""
    d = f"/tmp/signed3-{RUN}"
    path = f"{d}/secret.txt"
    sbx.files.write(path, "secret")
    down = sbx.download_url(path)
    st, body, _ = http_status("GET", down)
    assert st == 200 and body == b"secret"
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(down).query))["signature"]

    answers = {}
    for name, url in {
        "tampered signature": _with_query(down, signature=_flip(sig)),
        "other path": _with_query(down, path="/etc/shadow"),
        "other user": _with_query(down, username="root"),
    }.items():
        st, body, _ = http_status("GET", url)
        assert st != 200 and b"secret" not in body and b"root:" not in body, (name, st, body)
        answers[name] = (st, body)

    # A read signature does not allow a write; a tampered upload URL does not write.
    st, body, _ = http_status(
        "POST", down, b"overwritten", {"Content-Type": "application/octet-stream"}
    )
    answers["read signature used to write"] = (st, body)
    up = sbx.upload_url(f"{d}/nope.txt")
    up_sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(up).query))["signature"]
    r = httpx.post(_with_query(up, signature=_flip(up_sig)), files={"file": ("x", b"no")})
    answers["tampered upload"] = (r.status_code, r.content)
    assert sbx.files.read(path) == "secret"
    assert not sbx.files.exists(f"{d}/nope.txt")

    wrong = {k: v for k, v in answers.items() if v[0] not in (401, 403)}
    assert not wrong, f"refused, but not with 401/403: {wrong}"


def test_guest_clock_follows_host(sbx):
    """The guest's clock stays with the host's (signed-URL expiry and file times use it)."""
    for _ in range(3):
        t0 = time.time()
        guest = float(sbx.commands.run("date +%s.%N").stdout)
        t1 = time.time()
        if t1 - t0 < 1:
            break
    assert t0 - 1 <= guest <= t1 + 1, f"guest clock off by {(t0 + t1) / 2 - guest:+.2f} s"


# --- sandbox API -----------------------------------------------------------------------------


def test_get_info_set_timeout_metrics(sbx):
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": "py-e2e", "run": RUN, "role": "main"}
    assert info.state == SandboxState.RUNNING
    now = datetime.now(timezone.utc)
    assert info.started_at <= now + timedelta(seconds=5)
    assert now - info.started_at < timedelta(hours=1)
    assert info.end_at > now
    assert info.cpu_count >= 1 and info.memory_mb >= 128
    assert info.envd_version

    sbx.set_timeout(1200)
    later = sbx.get_info()
    expected = datetime.now(timezone.utc) + timedelta(seconds=1200)
    assert abs(later.end_at - expected) < timedelta(seconds=30), later.end_at
    assert later.end_at > info.end_at
    sbx.set_timeout(300)
    shorter = sbx.get_info()
    assert shorter.end_at < later.end_at
    assert abs(shorter.end_at - (datetime.now(timezone.utc) + timedelta(seconds=300))) < timedelta(
        seconds=30
    )
    # The static form works too.
    Sandbox.set_timeout(sbx.sandbox_id, TIMEOUT)
    assert Sandbox.get_info(sbx.sandbox_id).end_at > shorter.end_at

    metrics = wait_until(lambda: sbx.get_metrics(), 30, 1)
    assert len(metrics) >= 1
    m = metrics[-1]
    assert m.cpu_count >= 1
    assert m.mem_total > 0 and 0 < m.mem_used <= m.mem_total
    assert m.disk_total > 0 and 0 < m.disk_used <= m.disk_total
    assert 0 <= m.cpu_used_pct <= 100 * m.cpu_count
    assert abs(m.timestamp - datetime.now(timezone.utc)) < timedelta(minutes=10)
    static = Sandbox.get_metrics(sbx.sandbox_id)
    assert len(static) >= 1 and static[-1].mem_total == m.mem_total


def test_list_filters_and_pagination(sbx):
    tag = f"list-{RUN}"
    created = []
    try:
        for n in range(3):
            created.append(
                Sandbox.create(timeout=TIMEOUT, metadata={"listtag": tag, "n": str(n)})
            )
            if n < 2:
                # Paused guests take no CPU: keep at most two of ours running at once.
                assert created[-1].pause() is True
        ids = {s.sandbox_id for s in created}

        pager = Sandbox.list(query=SandboxQuery(metadata={"listtag": tag}), limit=1)
        pages = []
        while pager.has_next:
            items = pager.next_items()
            pages.append([i.sandbox_id for i in items])
            assert len(pages) < 10, pages
        assert all(len(p) == 1 for p in pages), pages
        assert len(pages) == 3, pages
        assert {p[0] for p in pages} == ids
        assert pager.has_next is False

        two = Sandbox.list(query=SandboxQuery(metadata={"listtag": tag}), limit=2)
        first = two.next_items()
        assert len(first) == 2 and two.has_next and two.next_token
        rest = two.next_items()
        assert len(rest) == 1 and not two.has_next
        assert {i.sandbox_id for i in first + rest} == ids

        paused = Sandbox.list(
            query=SandboxQuery(metadata={"listtag": tag}, state=[SandboxState.PAUSED])
        ).next_items()
        assert {i.sandbox_id for i in paused} == {created[0].sandbox_id, created[1].sandbox_id}
        assert all(i.state == SandboxState.PAUSED for i in paused)
        running = Sandbox.list(
            query=SandboxQuery(metadata={"listtag": tag}, state=[SandboxState.RUNNING])
        ).next_items()
        assert [i.sandbox_id for i in running] == [created[2].sandbox_id]
        assert running[0].metadata == {"listtag": tag, "n": "2"}
        both = Sandbox.list(
            query=SandboxQuery(
                metadata={"listtag": tag}, state=[SandboxState.RUNNING, SandboxState.PAUSED]
            )
        ).next_items()
        assert {i.sandbox_id for i in both} == ids
        # Metadata filters are ANDed.
        one = Sandbox.list(query=SandboxQuery(metadata={"listtag": tag, "n": "1"})).next_items()
        assert [i.sandbox_id for i in one] == [created[1].sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"listtag": tag + "-none"})).next_items() == []
    finally:
        kill_quietly(*created)
    assert Sandbox.list(query=SandboxQuery(metadata={"listtag": tag})).next_items() == []


# --- pause / resume --------------------------------------------------------------------------

HOLDER = r"""
secret=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "secret:$secret"
trap 'echo "dump:$secret"; echo "$secret" > /tmp/dumped-secret' USR1
while true; do sleep 1 & wait $!; done
"""


def test_pause_then_resume_keeps_file_and_process_memory(wrenn):
    s = Sandbox.create(timeout=TIMEOUT, metadata={"suite": "py-e2e", "run": RUN, "role": "pause"})
    try:
        s.files.write("/home/user/before-pause.txt", "kept across pause")
        h = s.commands.run(HOLDER, background=True, timeout=0)
        # CommandHandle only delivers callbacks while iterated: read until the secret shows.
        out = []

        def read():
            try:
                for stdout, _e, _p in h:
                    if stdout:
                        out.append(stdout)
            except Exception:
                pass

        threading.Thread(target=read, daemon=True).start()
        assert wait_until(lambda: "secret:" in "".join(out), 20), out
        secret = "".join(out).split("secret:")[1].split("\n")[0]
        assert len(secret) == 24
        pid = h.pid
        # The secret lives only in the shell's memory.
        assert not s.files.exists("/tmp/dumped-secret")

        assert s.pause() is True
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.PAUSED
        assert not s.is_running()
        paused = Sandbox.list(
            query=SandboxQuery(metadata={"run": RUN, "role": "pause"}, state=[SandboxState.PAUSED])
        ).next_items()
        assert [i.sandbox_id for i in paused] == [s.sandbox_id]

        resumed = Sandbox.connect(s.sandbox_id, timeout=TIMEOUT)
        assert resumed.sandbox_id == s.sandbox_id
        assert resumed.is_running()
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
        assert resumed.files.read("/home/user/before-pause.txt") == "kept across pause"
        procs = {p.pid: p for p in resumed.commands.list()}
        assert pid in procs, procs
        assert "secret=$(head" in procs[pid].args[-1]

        # Attach to the same process and make it print what it holds in memory.
        c = resumed.commands.connect(pid, timeout=60)
        after = []

        def read_after():
            try:
                for stdout, _e, _p in c:
                    if stdout:
                        after.append(stdout)
            except Exception:
                pass

        threading.Thread(target=read_after, daemon=True).start()
        time.sleep(0.5)
        resumed.commands.run(f"kill -USR1 {pid}")
        assert wait_until(lambda: f"dump:{secret}" in "".join(after), 20), after
        assert resumed.files.read("/tmp/dumped-secret") == secret + "\n"
        # A new command still works and the guest clock moved on.
        assert resumed.commands.run("echo alive").stdout == "alive\n"
        assert resumed.commands.kill(pid) is True
    finally:
        kill_quietly(s)


# --- kill ------------------------------------------------------------------------------------


def test_kill_then_not_found(wrenn):
    s = Sandbox.create(timeout=TIMEOUT, metadata={"suite": "py-e2e", "run": RUN, "role": "kill"})
    try:
        assert s.commands.run("echo up").stdout == "up\n"
        assert s.is_running()
    finally:
        s.kill()
    assert s.is_running() is False
    # Control-plane calls: 404 -> SandboxNotFoundException.
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(s.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(s.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        s.get_info()
    with pytest.raises(SandboxNotFoundException):
        s.set_timeout(100)
    with pytest.raises(SandboxNotFoundException):
        s.get_metrics()
    with pytest.raises(SandboxNotFoundException):
        s.pause()
    assert Sandbox.kill(s.sandbox_id) is False
    assert s.kill() is False
    # envd calls on the old handle: the proxy answers 502 "The sandbox <id> was not found",
    # which the SDK reports as SandboxNotRunningException.
    for op in (
        lambda: s.commands.run("echo gone"),
        lambda: s.commands.list(),
        lambda: s.files.read("/etc/hostname"),
        lambda: s.files.write("/tmp/x", "x"),
        lambda: s.files.list("/"),
    ):
        with pytest.raises(SandboxNotRunningException) as e:
            op()
        assert f"The sandbox {s.sandbox_id} was not found" in str(e.value)
    assert s.sandbox_id not in [i.sandbox_id for i in Sandbox.list().next_items()]
    assert Sandbox.list(query=SandboxQuery(metadata={"run": RUN, "role": "kill"})).next_items() == []
