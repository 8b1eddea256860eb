"""The official E2B Python SDK, unmodified, in debug mode against a bare envd process.

Debug mode skips the control plane and sends every envd request to localhost:49983, so this
checks envd's wire compatibility (Connect JSON, /files) with the real client.
"""

import threading
import time

import httpx
import pytest
from e2b import Sandbox, FileType, CommandExitException, PtySize
from e2b.exceptions import NotFoundException


@pytest.fixture
def sbx(envd_debug):
    return Sandbox.create(debug=True)


def test_commands_foreground_with_envs_cwd_and_exit_codes(sbx, workdir):
    out = []
    r = sbx.commands.run(
        "echo $FOO; pwd; echo err >&2",
        envs={"FOO": "bar"},
        cwd=str(workdir),
        on_stdout=lambda s: out.append(s),
        timeout=30,
    )
    assert r.exit_code == 0
    assert r.stdout == f"bar\n{workdir}\n"
    assert r.stderr == "err\n"
    assert "".join(out) == r.stdout

    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("exit 3")
    assert e.value.exit_code == 3


def test_background_stdin_connect_list_and_kill(sbx):
    h = sbx.commands.run("read line; echo got:$line; sleep 600", background=True, stdin=True)
    assert h.pid > 0
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "hello\n")

    # A second client attaches to the running process and sees its end.
    ended = []

    def follow():
        h2 = sbx.commands.connect(h.pid)
        try:
            h2.wait()
        except CommandExitException as e:
            ended.append(e.exit_code)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.5)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as e:
        h.wait()
    assert "got:hello" in e.value.stdout
    t.join(10)
    assert ended == [-1]
    assert sbx.commands.kill(h.pid) is False


def test_command_timeout_kills_the_process(sbx):
    start = time.time()
    with pytest.raises(Exception):
        sbx.commands.run("sleep 30", timeout=1)
    assert time.time() - start < 15
    time.sleep(0.5)
    assert all("sleep 30" not in " ".join(p.args) for p in sbx.commands.list())


def test_pty_create_input_resize(sbx):
    data = bytearray()
    pty = sbx.pty.create(PtySize(rows=24, cols=80), timeout=60)

    def pump():
        try:
            pty.wait(on_pty=lambda d: data.extend(d))
        except CommandExitException:
            pass

    threading.Thread(target=pump, daemon=True).start()
    sbx.pty.send_stdin(pty.pid, b"stty size; echo mark-$((40+2))\n")
    deadline = time.time() + 15
    while b"mark-42" not in data and time.time() < deadline:
        time.sleep(0.05)
    assert b"24 80" in data
    sbx.pty.resize(pty.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(pty.pid, b"stty size\n")
    deadline = time.time() + 15
    while b"30 100" not in data and time.time() < deadline:
        time.sleep(0.05)
    assert b"30 100" in data
    assert sbx.pty.kill(pty.pid) is True


def test_files_write_read_list_and_metadata(sbx, workdir):
    p = f"{workdir}/a/hello.txt"
    info = sbx.files.write(p, "hello")
    assert info.path == p and info.name == "hello.txt"
    assert sbx.files.read(p) == "hello"
    assert sbx.files.read(p, format="bytes") == bytearray(b"hello")
    assert b"".join(sbx.files.read(p, format="stream")) == b"hello"

    sbx.files.write_files([
        {"path": f"{workdir}/m/1.txt", "data": "one"},
        {"path": f"{workdir}/m/2.bin", "data": b"\x00\x01"},
    ])
    names = sorted(e.name for e in sbx.files.list(f"{workdir}/m"))
    assert names == ["1.txt", "2.bin"]

    assert sbx.files.exists(p)
    assert not sbx.files.exists(f"{workdir}/nope")
    i = sbx.files.get_info(p)
    assert i.type == FileType.FILE and i.size == 5
    assert sbx.files.make_dir(f"{workdir}/d") is True
    assert sbx.files.make_dir(f"{workdir}/d") is False
    moved = sbx.files.rename(p, f"{workdir}/d/moved.txt")
    assert moved.path == f"{workdir}/d/moved.txt"
    sbx.files.remove(f"{workdir}/d")
    assert not sbx.files.exists(f"{workdir}/d")
    with pytest.raises(NotFoundException):
        sbx.files.read(f"{workdir}/gone.txt")


def test_watch_dir_sync(sbx, workdir):
    handle = sbx.files.watch_dir(str(workdir), recursive=True)
    sbx.files.write(f"{workdir}/w.txt", "x")
    time.sleep(1)
    events = handle.get_new_events()
    handle.stop()
    assert any(e.name == "w.txt" and e.type.name in ("CREATE", "WRITE") for e in events), events


def test_upload_and_download_urls(sbx, workdir):
    p = f"{workdir}/u.txt"
    up = sbx.upload_url(p)
    r = httpx.post(up, files={"file": ("u.txt", b"via-url")})
    assert r.status_code == 200, r.text
    down = sbx.download_url(p)
    assert httpx.get(down).content == b"via-url"
