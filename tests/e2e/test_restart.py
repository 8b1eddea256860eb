"""Restarting `wrenn up` loses nothing: paused sandboxes stay resumable with their memory, a
sandbox that was running at the stop is paused to disk and resumes too, killed ones stay gone,
and every record survives (SQLite or PostgreSQL)."""

import secrets

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException

MEMORY_PROG = (
    "import sys, time\n"
    "value = sys.argv[1]\n"
    "open('/tmp/ready', 'w').write('ok')\n"
    "while True:\n"
    "    try:\n"
    "        req = open('/tmp/ask').read()\n"
    "    except FileNotFoundError:\n"
    "        time.sleep(0.05)\n"
    "        continue\n"
    "    open('/tmp/answer', 'w').write(value)\n"
    "    import os; os.remove('/tmp/ask')\n"
)


def start_memory_holder(sbx: Sandbox, value: str) -> int:
    """A process that keeps `value` only in its memory and writes it out when asked."""
    sbx.files.write("/tmp/holder.py", MEMORY_PROG)
    handle = sbx.commands.run(f"python3 /tmp/holder.py {value}", background=True)
    sbx.commands.run("for i in $(seq 100); do test -f /tmp/ready && break; sleep 0.1; done; test -f /tmp/ready")
    return handle.pid


def ask_memory(sbx: Sandbox) -> str:
    sbx.commands.run("rm -f /tmp/answer; touch /tmp/ask")
    out = sbx.commands.run(
        "for i in $(seq 100); do test -s /tmp/answer && break; sleep 0.1; done; cat /tmp/answer"
    )
    return out.stdout.strip()


@pytest.mark.restarts_wrenn
def test_restart_keeps_paused_and_running_sandboxes(wrenn):
    if wrenn.external:
        pytest.skip("WRENN_E2E_URL: the suite does not own the wrenn up process")
    tag = secrets.token_hex(4)
    meta = {"suite": "restart", "tag": tag}
    paused = Sandbox.create(metadata=meta, timeout=600)
    running = Sandbox.create(metadata=meta, timeout=600)
    killed = Sandbox.create(metadata=meta, timeout=600)
    try:
        values = {}
        pids = {}
        for sbx in (paused, running):
            values[sbx.sandbox_id] = secrets.token_hex(8)
            sbx.files.write("/home/user/kept.txt", f"file of {sbx.sandbox_id}")
            pids[sbx.sandbox_id] = start_memory_holder(sbx, values[sbx.sandbox_id])
        paused.pause()
        killed.kill()

        wrenn.restart()

        listed = Sandbox.list(query=SandboxQuery(metadata=meta), limit=100).next_items()
        states = {s.sandbox_id: s.state for s in listed}
        # The running one was paused by the clean stop; the killed one is gone.
        assert states == {
            paused.sandbox_id: SandboxState.PAUSED,
            running.sandbox_id: SandboxState.PAUSED,
        }, states
        for sbx in (paused, running):
            again = Sandbox.connect(sbx.sandbox_id, timeout=600)
            assert again.is_running()
            text = again.files.read("/home/user/kept.txt")
            assert text == f"file of {sbx.sandbox_id}"
            assert ask_memory(again) == values[sbx.sandbox_id]
            assert pids[sbx.sandbox_id] in [p.pid for p in again.commands.list()]
        with pytest.raises(NotFoundException):
            Sandbox.connect(killed.sandbox_id)
        info = Sandbox.get_info(paused.sandbox_id)
        assert info.metadata == meta
        assert info.template_id == "base"
    finally:
        for sbx in (paused, running, killed):
            try:
                Sandbox.kill(sbx.sandbox_id)
            except Exception:
                pass


@pytest.mark.restarts_wrenn
def test_crash_keeps_running_sandboxes_running(wrenn):
    """After `wrenn up` is SIGKILLed, the next start takes the still-running QEMUs over: the
    sandbox is running (never paused), its processes and memory intact, and it can be paused
    and resumed as before; a paused one stays resumable."""
    if wrenn.external:
        pytest.skip("WRENN_E2E_URL: the suite does not own the wrenn up process")
    tag = secrets.token_hex(4)
    meta = {"suite": "crash", "tag": tag}
    live = Sandbox.create(metadata=meta, timeout=600)
    paused = Sandbox.create(metadata=meta, timeout=600)
    try:
        value = secrets.token_hex(8)
        pid = start_memory_holder(live, value)
        boot_id = live.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
        paused.files.write("/home/user/kept.txt", "paused before the crash")
        paused.pause()

        wrenn.crash_restart()

        listed = Sandbox.list(query=SandboxQuery(metadata=meta), limit=100).next_items()
        assert {s.sandbox_id: s.state for s in listed} == {
            live.sandbox_id: SandboxState.RUNNING,
            paused.sandbox_id: SandboxState.PAUSED,
        }
        again = Sandbox.connect(live.sandbox_id, timeout=600)
        assert ask_memory(again) == value
        assert pid in [p.pid for p in again.commands.list()]
        # The same boot: taken over, not restored from a snapshot.
        assert again.commands.run("cat /proc/sys/kernel/random/boot_id").stdout == boot_id
        # Still fully managed: pause and resume work on the taken-over VM.
        again.pause()
        back = Sandbox.connect(live.sandbox_id, timeout=600)
        assert ask_memory(back) == value
        p2 = Sandbox.connect(paused.sandbox_id, timeout=600)
        assert p2.files.read("/home/user/kept.txt") == "paused before the crash"
    finally:
        for sbx in (live, paused):
            try:
                Sandbox.kill(sbx.sandbox_id)
            except Exception:
                pass
