"""Fork and named snapshots through the official Python SDK, against a real `wrenn up`: a live
sandbox (a file, and a process holding a secret only in its memory) copied N times, a paused
one forked and left paused, a named snapshot outliving its source and starting sandboxes any
number of times, and a snapshot of a snapshot's child storing only its own disk changes.

The process's secret lives in a shell variable; `kill -USR1` makes the shell write it to a file,
so a copy that prints the parent's secret has the parent's memory, not just its disk.
"""

import json
import time
import uuid
from pathlib import Path

import pytest
from e2b import Sandbox, SandboxState

RUN = uuid.uuid4().hex[:8]
TIMEOUT = 600

HOLDER = r"""
secret=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$secret" > /tmp/holder-started
trap 'echo "$secret" > /tmp/dumped-secret' USR1
while true; do sleep 1 & wait $!; done
"""


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
        try:
            s.kill()
        except Exception:
            pass


def start_holder(s: Sandbox) -> tuple[int, str]:
    """Starts the secret-holding shell in `s`; its pid and its secret (read once, from the
    file it wrote at start, which the test then removes: afterwards only its memory has it)."""
    h = s.commands.run(HOLDER, background=True, timeout=0)
    assert wait_until(lambda: s.files.exists("/tmp/holder-started"), 30)
    secret = s.files.read("/tmp/holder-started").strip()
    s.commands.run("rm -f /tmp/holder-started")
    assert len(secret) == 24, secret
    return h.pid, secret


def dumped_secret(s: Sandbox, pid: int) -> str:
    """What process `pid` holds in memory, as it writes it on USR1."""
    s.commands.run(f"rm -f /tmp/dumped-secret; kill -USR1 {pid}")
    assert wait_until(lambda: s.files.exists("/tmp/dumped-secret"), 20), "no dump"
    return s.files.read("/tmp/dumped-secret").strip()


def random_bytes(s: Sandbox) -> str:
    return s.commands.run("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout


def test_fork_copies_a_live_sandbox_three_times(wrenn):
    """Fork into 3: each child has the parent's file and its process with the secret in
    memory; a child's change is invisible to its siblings and the parent; IDs and the kernel
    RNG's output all differ; the parent keeps running with its state."""
    parent = Sandbox.create(timeout=TIMEOUT, metadata={"run": RUN, "role": "fork-parent"})
    children = []
    try:
        parent.files.write("/home/user/state.txt", "parent state")
        pid, secret = start_holder(parent)
        started = time.monotonic()
        forks = parent.fork(count=3, timeout=TIMEOUT)
        print(f"fork of 3 took {time.monotonic() - started:.2f} s")
        errors = [f for f in forks if isinstance(f, Exception)]
        assert not errors, errors
        children = forks
        assert len(children) == 3
        ids = {c.sandbox_id for c in children}
        assert len(ids) == 3 and parent.sandbox_id not in ids
        for c in children:
            assert c.is_running()
            assert c.files.read("/home/user/state.txt") == "parent state"
            assert dumped_secret(c, pid) == secret
        children[0].files.write("/home/user/state.txt", "changed in child 0")
        for other in children[1:] + [parent]:
            assert other.files.read("/home/user/state.txt") == "parent state"
        rng = {random_bytes(s) for s in children + [parent]}
        assert len(rng) == 4, rng
        assert parent.is_running()
        assert Sandbox.get_info(parent.sandbox_id).state == SandboxState.RUNNING
        assert dumped_secret(parent, pid) == secret
    finally:
        kill_quietly(*children, parent)


def test_fork_of_a_paused_sandbox_leaves_it_paused(wrenn):
    """A paused sandbox forked into 2: both children have its file and process memory, and
    the source is still paused afterwards, and resumable with its state."""
    src = Sandbox.create(timeout=TIMEOUT, metadata={"run": RUN, "role": "fork-paused"})
    children = []
    try:
        src.files.write("/home/user/paused.txt", "from the paused source")
        pid, secret = start_holder(src)
        assert src.pause() is True
        forks = Sandbox.fork(src.sandbox_id, count=2, timeout=TIMEOUT)
        errors = [f for f in forks if isinstance(f, Exception)]
        assert not errors, errors
        children = forks
        for c in children:
            assert c.files.read("/home/user/paused.txt") == "from the paused source"
            assert dumped_secret(c, pid) == secret
        assert Sandbox.get_info(src.sandbox_id).state == SandboxState.PAUSED
        resumed = Sandbox.connect(src.sandbox_id, timeout=TIMEOUT)
        assert resumed.files.read("/home/user/paused.txt") == "from the paused source"
        assert dumped_secret(resumed, pid) == secret
    finally:
        kill_quietly(*children, src)


def snapshot_dirs(wrenn) -> dict[str, dict]:
    """The agent's snapshots on disk: ID to its info file (the suite's own `wrenn up` only)."""
    root = wrenn.state_dir / "snapshots"
    out = {}
    for d in root.glob("*"):
        info = d / "snapshot.json"
        if info.exists():
            out[d.name] = json.loads(info.read_text())
    return out


def test_named_snapshot_outlives_its_source_and_starts_sandboxes(wrenn):
    """A named snapshot: listed by name, its source killed, then 2 sandboxes start from it
    with its file and process memory; deleting it works (and a second delete says it is
    gone) once its sandboxes are gone."""
    name = f"e2e-snap-{RUN}"
    src = Sandbox.create(timeout=TIMEOUT, metadata={"run": RUN, "role": "snap-src"})
    made = []
    snap = None
    try:
        src.files.write("/home/user/snap.txt", "in the snapshot")
        pid, secret = start_holder(src)
        started = time.monotonic()
        snap = src.create_snapshot(name=name)
        print(f"snapshot of a running sandbox took {time.monotonic() - started:.2f} s")
        assert snap.snapshot_id and any(name in n for n in snap.names), snap
        # The source keeps running with its state.
        assert dumped_secret(src, pid) == secret
        listed = Sandbox.list_snapshots(name=name).next_items()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id], listed
        src.kill()
        for _ in range(2):
            s = Sandbox.create(snap.snapshot_id, timeout=TIMEOUT)
            made.append(s)
            assert s.files.read("/home/user/snap.txt") == "in the snapshot"
            assert dumped_secret(s, pid) == secret
        made[0].files.write("/home/user/snap.txt", "changed")
        assert made[1].files.read("/home/user/snap.txt") == "in the snapshot"
        assert made[0].sandbox_id != made[1].sandbox_id
    finally:
        kill_quietly(*made, src)
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    assert Sandbox.list_snapshots(name=name).next_items() == []


def test_a_snapshot_of_a_snapshots_child_stores_only_its_own_changes(wrenn):
    """A snapshot of a sandbox started from a snapshot is layered on it: its disk layer holds
    the child's own writes (1 MiB), not the parent snapshot's (16 MiB), and its memory diff
    the pages the child changed, not the parent snapshot's (16 MiB more in /dev/shm)."""
    if wrenn.external:
        pytest.skip("reads the agent's snapshot files")
    src = Sandbox.create(timeout=TIMEOUT, metadata={"run": RUN, "role": "layers"})
    child = None
    snaps = []
    try:
        src.commands.run(
            "head -c 16777216 /dev/urandom > /home/user/big.bin && sync"
            " && head -c 16777216 /dev/urandom > /dev/shm/big.bin"
        )
        snaps.append(src.create_snapshot())
        child = Sandbox.create(snaps[0].snapshot_id, timeout=TIMEOUT)
        child.commands.run("head -c 1048576 /dev/urandom > /home/user/small.bin && sync")
        snaps.append(child.create_snapshot())
        on_disk = snapshot_dirs(wrenn)
        by_source = {i["source_sandbox_id"]: (sid, i) for sid, i in on_disk.items()}
        first_id, first = by_source[src.sandbox_id]
        second_id, second = by_source[child.sandbox_id]
        print(
            f"snapshot disk layers: source {first['disk_bytes']} B, child {second['disk_bytes']} B;"
            f" memory diffs: source {first['memory_bytes']} B, child {second['memory_bytes']} B"
        )
        assert first["disk_bytes"] > 16 << 20, first
        assert second["disk_bytes"] < 8 << 20, second
        assert second["parent"] == first_id, second
        assert first["memory_bytes"] > 16 << 20, first
        assert second["memory_bytes"] < 8 << 20, second
        # The child's layer really sits on the first snapshot's disk.
        root = Path(wrenn.state_dir) / "snapshots"
        assert (root / first_id / "rootfs.qcow2").exists()
        assert (root / second_id / "rootfs.qcow2").exists()
    finally:
        kill_quietly(*(x for x in [child, src] if x))
        for s in reversed(snaps):
            Sandbox.delete_snapshot(s.snapshot_id)
