"""Lifecycle through the official Python SDK, against a real `wrenn up`: a sandbox created with
`lifecycle={"on_timeout": "pause", "auto_resume": True}` is paused by its timeout and resumed by
the next request on its old handle, with its files and memory; `on_timeout: "kill"` is gone
after its timeout; a paused sandbox without auto-resume answers "not running" to envd traffic
and an already-paused pause answers as E2B does.
"""

import time
import uuid

import pytest
from e2b import Sandbox, SandboxState
from e2b.exceptions import NotFoundException, SandboxException

RUN = uuid.uuid4().hex[:8]

HOLDER = r"""
secret=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$secret" > /tmp/holder-started
trap 'echo "$secret" > /tmp/dumped-secret' USR1
while true; do sleep 1 & wait $!; done
"""


def wait_until(pred, timeout=20.0, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def state_of(sandbox_id: str):
    try:
        return Sandbox.get_info(sandbox_id).state
    except (NotFoundException, SandboxException):
        return None


def test_a_timeout_pauses_and_the_next_request_resumes(wrenn):
    """`on_timeout: pause` with `auto_resume`: the timeout pauses the sandbox (not kills it);
    a command on the old handle then resumes it transparently, with its file and the memory
    of its process; get_info reports the lifecycle back."""
    sbx = Sandbox.create(
        timeout=10,
        lifecycle={"on_timeout": "pause", "auto_resume": True},
        metadata={"run": RUN, "role": "auto-resume"},
    )
    try:
        info = sbx.get_info()
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}, info.lifecycle
        sbx.files.write("/home/user/kept.txt", "kept across the timeout")
        h = sbx.commands.run(HOLDER, background=True, timeout=0)
        assert wait_until(lambda: sbx.files.exists("/tmp/holder-started"), 30)
        secret = sbx.files.read("/tmp/holder-started").strip()
        assert wait_until(lambda: state_of(sbx.sandbox_id) == SandboxState.PAUSED, 120), (
            "the timeout did not pause the sandbox"
        )
        # The old handle: the request resumes the sandbox and is answered.
        out = sbx.commands.run("cat /home/user/kept.txt", timeout=120)
        assert out.stdout == "kept across the timeout"
        assert state_of(sbx.sandbox_id) == SandboxState.RUNNING
        sbx.commands.run(f"rm -f /tmp/dumped-secret; kill -USR1 {h.pid}")
        assert wait_until(lambda: sbx.files.exists("/tmp/dumped-secret"), 20)
        assert sbx.files.read("/tmp/dumped-secret").strip() == secret
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


def test_on_timeout_kill_is_gone_after_its_timeout(wrenn):
    """`on_timeout: kill`: the sandbox is gone once its timeout passed."""
    sbx = Sandbox.create(timeout=5, lifecycle={"on_timeout": "kill"})
    assert sbx.get_info().lifecycle == {"on_timeout": "kill", "auto_resume": False}
    assert wait_until(lambda: state_of(sbx.sandbox_id) is None, 120), "still there"
    assert not sbx.is_running()


def test_a_paused_sandbox_without_auto_resume_is_not_running(wrenn):
    """Without auto-resume a paused sandbox takes no envd traffic (the SDK sees it as not
    running), a second pause answers "already paused" (False), and connect resumes it."""
    sbx = Sandbox.create(timeout=300, metadata={"run": RUN, "role": "no-auto-resume"})
    try:
        sbx.files.write("/home/user/f.txt", "x")
        assert sbx.pause() is True
        assert not sbx.is_running()
        assert sbx.pause() is False
        assert state_of(sbx.sandbox_id) == SandboxState.PAUSED
        with pytest.raises(Exception):
            sbx.commands.run("true", timeout=30)
        assert state_of(sbx.sandbox_id) == SandboxState.PAUSED
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=300)
        assert resumed.files.read("/home/user/f.txt") == "x"
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


@pytest.mark.one_database
def test_filesystem_pauses_and_reboots_keep_only_the_disk(wrenn):
    """`pause(mode="filesystem")` keeps only the disk: the resume is a cold boot (a new kernel
    boot ID) with the files written before the pause and none of the processes or memory; a
    full pause resumed with `on_resume="reboot"` boots cold the same way; a timeout with
    `{"action": "pause", "mode": "filesystem"}` pauses filesystem-only."""
    # Created first, so that its timeout passes while the rest runs.
    timed = Sandbox.create(
        timeout=15,
        lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}},
        metadata={"run": RUN, "role": "timeout-filesystem"},
    )
    sbx = Sandbox.create(timeout=300, metadata={"run": RUN, "role": "filesystem"})
    try:
        timed.files.write("/home/user/timed.txt", "timed")
        boot_timed = timed.commands.run(BOOT_ID).stdout.strip()
        sbx.files.write("/home/user/disk.txt", "on disk")
        sbx.commands.run("echo in-memory > /dev/shm/mem")
        sbx.commands.run("sleep 4242", background=True, timeout=0)
        boot0 = sbx.commands.run(BOOT_ID).stdout.strip()

        assert sbx.pause(mode="filesystem") is True
        assert sbx.pause(mode="filesystem") is False, "already paused"
        assert state_of(sbx.sandbox_id) == SandboxState.PAUSED
        cold = Sandbox.connect(sbx.sandbox_id, timeout=300)
        boot1 = cold.commands.run(BOOT_ID).stdout.strip()
        assert boot1 != boot0, "the resume of a filesystem-only pause is a new boot"
        assert cold.files.read("/home/user/disk.txt") == "on disk"
        assert not cold.files.exists("/dev/shm/mem")
        assert cold.commands.run("pgrep -f 'sleep 424[2]' || echo none").stdout.strip() == "none"

        # A full pause keeps the memory; `on_resume="reboot"` drops it anyway.
        cold.commands.run("echo again > /dev/shm/mem2")
        assert cold.pause() is True
        rebooted = Sandbox.connect(sbx.sandbox_id, timeout=300, on_resume="reboot")
        assert rebooted.commands.run(BOOT_ID).stdout.strip() not in (boot0, boot1)
        assert not rebooted.files.exists("/dev/shm/mem2")
        assert rebooted.files.read("/home/user/disk.txt") == "on disk"

        assert wait_until(lambda: state_of(timed.sandbox_id) == SandboxState.PAUSED, 120), (
            "the timeout did not pause the sandbox"
        )
        woken = Sandbox.connect(timed.sandbox_id, timeout=300)
        assert woken.commands.run(BOOT_ID).stdout.strip() != boot_timed
        assert woken.files.read("/home/user/timed.txt") == "timed"
    finally:
        for s in (sbx, timed):
            try:
                s.kill()
            except Exception:
                pass
