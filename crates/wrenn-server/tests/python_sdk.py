"""Control-plane calls of the official Python SDK against a Wrenn control plane.

Run by tests/python_sdk.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set. envd calls
are out of scope here (the host agent is a test double); signed URLs are checked through the
edge proxy, whose test-double agent proxy echoes the routed sandbox ID.
"""
import json
import os
import urllib.error
import urllib.request
import uuid

from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
)

sbx = Sandbox.create(timeout=120, metadata={"suite": "py"}, envs={"A": "1"})
other = Sandbox.create(metadata={"suite": "py", "n": "2"})
info = sbx.get_info()
assert info.sandbox_id == sbx.sandbox_id, info
assert info.state == SandboxState.RUNNING, info
assert info.metadata == {"suite": "py"}, info
assert str(info.envd_version) == "0.6.4", info

sbx.set_timeout(30)
info2 = sbx.get_info()
assert (info2.end_at - info2.started_at).total_seconds() < 60, info2

# List with a metadata filter and pagination.
pager = Sandbox.list(query=SandboxQuery(metadata={"suite": "py"}), limit=1)
seen = []
while pager.has_next:
    seen.extend(s.sandbox_id for s in pager.next_items())
assert sorted(seen) == sorted([sbx.sandbox_id, other.sandbox_id]), seen
only = Sandbox.list(query=SandboxQuery(metadata={"n": "2"})).next_items()
assert [s.sandbox_id for s in only] == [other.sandbox_id], only
# Keys and values with characters the SDK percent-encodes before form-encoding the filter.
odd = {"step": "pause:saved", "path/key": "a/b c%41&d=e"}
third = Sandbox.create(metadata=odd)
found = Sandbox.list(query=SandboxQuery(metadata=odd)).next_items()
assert [s.sandbox_id for s in found] == [third.sandbox_id], found
assert found[0].metadata == odd, found[0].metadata
assert Sandbox.list(query=SandboxQuery(metadata={"step": "pause%3Asaved"})).next_items() == []
third.kill()

metrics = sbx.get_metrics()
assert metrics and metrics[0].cpu_count == 2, metrics

# Signed download URL routed by its signature alone.
url = sbx.download_url("/home/user/a.txt")
assert "signature=v1_" in url, url
with urllib.request.urlopen(url) as r:
    echoed = json.load(r)
assert echoed["sandboxId"] == sbx.sandbox_id, echoed

# Pause (409 the second time -> False), then connect resumes.
assert sbx.beta_pause() in (True, None)
assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
assert resumed.sandbox_id == sbx.sandbox_id
assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING

# Lifecycle: what `lifecycle=` sends is stored and read back. Paused, a sandbox with
# auto-resume is woken by its traffic (the test-double agent proxy answers /health), one
# without it is not running; pausing a paused sandbox is False.
assert sbx.get_info().lifecycle == {"on_timeout": "kill", "auto_resume": False}
lc = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True})
assert lc.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
no_wake = Sandbox.create(timeout=60, lifecycle={"on_timeout": {"action": "pause", "mode": "full"}})
assert no_wake.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
for s in [lc, no_wake]:
    assert s.pause() is True
    assert s.pause() is False
    assert s.get_info().state == SandboxState.PAUSED
assert no_wake.is_running() is False
assert no_wake.get_info().state == SandboxState.PAUSED
assert lc.is_running() is True
assert lc.get_info().state == SandboxState.RUNNING
# Filesystem-only: taken, paused as asked, resumed (also by `on_resume="reboot"`).
fs = Sandbox.create(timeout=60, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
assert fs.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
assert fs.pause(mode="filesystem") is True
assert fs.pause(mode="filesystem") is False
assert fs.get_info().state == SandboxState.PAUSED
Sandbox.connect(fs.sandbox_id, on_resume="reboot")
assert fs.get_info().state == SandboxState.RUNNING
lc.kill()
no_wake.kill()
fs.kill()

assert Sandbox.kill(sbx.sandbox_id) is True
assert Sandbox.kill(sbx.sandbox_id) is False
try:
    Sandbox.get_info(sbx.sandbox_id)
    raise AssertionError("get_info after kill should raise")
except NotFoundException:
    pass
other.kill()

# Idempotency-Key: the same key returns the same sandbox, another key another one.
key = str(uuid.uuid4())
first = Sandbox.create(idempotency_key=key, metadata={"suite": "idem"})
again = Sandbox.create(idempotency_key=key, metadata={"suite": "idem"})
assert again.sandbox_id == first.sandbox_id, (first.sandbox_id, again.sandbox_id)
# A plain-HTTP retry of the same request (no `envVars: {}` as the SDK sends) is the same one.
retry = urllib.request.Request(
    os.environ["E2B_API_URL"] + "/v2/sandboxes",
    data=json.dumps({"templateID": "base", "metadata": {"suite": "idem"}}).encode(),
    method="POST",
    headers={"X-API-KEY": os.environ["E2B_API_KEY"], "Idempotency-Key": key,
             "Content-Type": "application/json"},
)
with urllib.request.urlopen(retry) as r:
    assert r.status == 201, r.status
    assert json.load(r)["sandboxID"] == first.sandbox_id
fresh = Sandbox.create(idempotency_key=str(uuid.uuid4()), metadata={"suite": "idem"})
assert fresh.sandbox_id != first.sandbox_id
ids = sorted(s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "idem"})).next_items())
assert ids == sorted([first.sandbox_id, fresh.sandbox_id]), ids
try:
    Sandbox.create(idempotency_key="Not_Valid")
    raise AssertionError("the SDK checks keys itself")
except InvalidArgumentException:
    pass
first.kill()
fresh.kill()

# Snapshots: unnamed and named, a taken name, the list with its filters and pages, a create
# from one, deletion (True, then False).
src = Sandbox.create(metadata={"suite": "snap"}, envs={"A": "1"})
snap = src.create_snapshot()
assert snap.snapshot_id.endswith(":default") and snap.names == [], snap
named = Sandbox.create_snapshot(src.sandbox_id, name="py-snap")
assert any("py-snap" in n for n in named.names), named
try:
    src.create_snapshot(name="py-snap")
    raise AssertionError("a taken name is refused")
except SandboxException as e:
    assert "409" in str(e), e
pager = Sandbox.list_snapshots(limit=1)
seen = []
while pager.has_next:
    seen.extend(s.snapshot_id for s in pager.next_items())
assert sorted(seen) == sorted([snap.snapshot_id, named.snapshot_id]), seen
assert [s.snapshot_id for s in Sandbox.list_snapshots(name="py-snap").next_items()] == [
    named.snapshot_id
]
assert Sandbox.list_snapshots(name="py-snap-nope").next_items() == []
assert len(src.list_snapshots().next_items()) == 2
child = Sandbox.create(named.snapshot_id, timeout=60)
assert child.sandbox_id != src.sandbox_id
assert Sandbox.get_info(child.sandbox_id).state == SandboxState.RUNNING
assert Sandbox.delete_snapshot(named.snapshot_id) is True
assert Sandbox.delete_snapshot(named.snapshot_id) is False
assert Sandbox.delete_snapshot(snap.snapshot_id) is True
try:
    Sandbox.create(named.snapshot_id)
    raise AssertionError("a deleted snapshot is no template")
except SandboxException as e:
    assert "404" in str(e), e

# Fork: children with their own IDs and the source's metadata; the source runs on.
forks = src.fork(count=2, timeout=60)
assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks), forks
fork_ids = {f.sandbox_id for f in forks}
assert len(fork_ids) == 2 and src.sandbox_id not in fork_ids, fork_ids
assert Sandbox.get_info(forks[0].sandbox_id).metadata == {"suite": "snap"}
assert Sandbox.get_info(src.sandbox_id).state == SandboxState.RUNNING
(one,) = Sandbox.fork(src.sandbox_id)
assert isinstance(one, Sandbox), one
assert Sandbox.list_snapshots().next_items() == [], "a fork's snapshot is never listed"
# The count is checked by the server too (the JS SDK sends whatever it was given).
bad = urllib.request.Request(
    os.environ["E2B_API_URL"] + f"/sandboxes/{src.sandbox_id}/fork",
    data=json.dumps({"count": 21}).encode(),
    method="POST",
    headers={"X-API-KEY": os.environ["E2B_API_KEY"], "Content-Type": "application/json"},
)
try:
    urllib.request.urlopen(bad)
    raise AssertionError("count 21 is refused")
except urllib.error.HTTPError as e:
    assert e.code == 400 and json.load(e)["code"] == 400, e
for s in [child, one, *forks, src]:
    s.kill()
try:
    Sandbox.fork(src.sandbox_id)
    raise AssertionError("a killed sandbox cannot be forked")
except SandboxNotFoundException:
    pass
print("python sdk: ok")
