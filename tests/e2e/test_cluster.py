"""Many hosts: two `wrenn server` replicas on one PostgreSQL database and three `wrenn agent`s,
each in a network namespace of its own acting as a separate host (tests/e2e/cluster.py), driven
by the official Python SDK through either replica.

- Sandboxes spread over the agents, and each answers (commands, files) through both replicas.
- A snapshot taken through one replica starts sandboxes through the other, on its host.
- A replica killed with SIGKILL during traffic: the other keeps serving, and of 20 sandboxes
  with short timeouts each is paused or killed exactly once (counted on the agents).
- An agent killed with SIGKILL: its running sandboxes are reported lost through the API within
  the heartbeat window, creates go to the other agents, and its paused sandbox, copied to the
  shared store (a bucket of a real S3-compatible server) after its pause, resumes on another
  agent with its memory,
  processes and files; when the agent comes back the written-off sandboxes and its stale copy
  of the moved one are killed on it.
"""

import re
import subprocess
import threading
import time

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import NotFoundException

import cluster as lab

pytestmark = [pytest.mark.one_database, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster(request):
    if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode != 0:
        pytest.skip("the cluster test needs a local PostgreSQL server")
    # The suite's `wrenn up` has built the Debian image in the shared image cache: agents in
    # their namespaces have no way out to fetch its packages.
    w = request.getfixturevalue("wrenn")
    if w.external:
        pytest.skip("the cluster test starts its own processes")
    c = lab.Cluster()
    try:
        yield c.setup()
    finally:
        c.teardown()


def kill_all(sbxs):
    for s in sbxs:
        try:
            s.kill()
        except Exception:
            pass


def test_sandboxes_spread_over_agents_and_answer_through_either_replica(cluster):
    hosts = cluster.hosts(1)
    assert sorted(h["id"] for h in hosts) == ["host1", "host2", "host3"]
    for h in hosts:
        assert h["health"] == "healthy" and h["schedulable"], h
        assert h["templates"] == ["base"], h
        assert h["url"].startswith("http://172.31."), h
    sbxs = []
    try:
        for n in range(9):
            sbxs.append(Sandbox.create(timeout=300, **cluster.opts(n % 2)))
        where = {s.sandbox_id: cluster.host_of(s.sandbox_id) for s in sbxs}
        assert set(where.values()) == {1, 2, 3}, where
        for n, s in enumerate(sbxs):
            other = (n + 1) % 2
            via_other = Sandbox.connect(s.sandbox_id, **cluster.opts(other))
            via_other.files.write("/tmp/who", f"replica {other}")
            assert s.files.read("/tmp/who") == f"replica {other}"
            r = via_other.commands.run("cat /tmp/who && echo ok")
            assert r.stdout == f"replica {other}ok\n"
            assert s.commands.run("echo again").stdout == "again\n"
    finally:
        kill_all(sbxs)


def test_a_snapshot_starts_sandboxes_through_the_other_replica(cluster):
    src = Sandbox.create(timeout=300, **cluster.opts(0))
    child = None
    try:
        src.commands.run("echo in-memory > /dev/shm/mark && echo on-disk > /home/user/mark")
        snap = src.create_snapshot()
        child = Sandbox.create(template=snap.snapshot_id, timeout=300, **cluster.opts(1))
        assert cluster.host_of(child.sandbox_id) == cluster.host_of(src.sandbox_id)
        assert child.files.read("/dev/shm/mark") == "in-memory\n"
        assert child.files.read("/home/user/mark") == "on-disk\n"
        Sandbox.delete_snapshot(snap.snapshot_id, **cluster.opts(1))
    finally:
        kill_all([s for s in (src, child) if s])


def agent_events(cluster, sandbox_id: str) -> list[str]:
    """The lifecycle steps the agents logged for a sandbox (`paused`, `killed`)."""
    out = []
    for a in cluster.agents:
        for line in a.text().splitlines():
            if f"sandbox_id={sandbox_id}" in line:
                m = re.search(r"wrenn_agent::controller: (paused|killed)\s*$", line)
                if m:
                    out.append(m.group(1))
    return out


def state_of(cluster, r: int, sandbox_id: str) -> str:
    res = httpx.get(
        f"{cluster.server_url(r)}/sandboxes/{sandbox_id}",
        headers={"X-API-KEY": cluster.api_key},
        timeout=10,
    )
    if res.status_code == 404:
        return "gone"
    res.raise_for_status()
    return res.json()["state"]


def test_a_replica_dies_during_traffic_and_every_timeout_fires_once(cluster):
    steady = Sandbox.create(timeout=600, **cluster.opts(1))
    results: list[tuple[float, int, bool]] = []
    errors: list[str] = []
    stop = threading.Event()

    def traffic(r: int):
        sbx = Sandbox.connect(steady.sandbox_id, **cluster.opts(r))
        while not stop.is_set():
            try:
                # Generous: 20 creates share the two cores with this guest meanwhile.
                ok = sbx.commands.run("echo ok", request_timeout=30).stdout == "ok\n"
            except Exception as e:
                ok = False
                errors.append(f"replica {r}: {e!r}")
            results.append((time.monotonic(), r, ok))
            time.sleep(0.2)

    threads = [threading.Thread(target=traffic, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    short = []
    try:
        for n in range(20):
            kwargs = dict(timeout=45, **cluster.opts(n % 2))
            if n % 2 == 0:
                kwargs["lifecycle"] = {"on_timeout": "pause"}
            short.append(Sandbox.create(**kwargs))
        # In the middle of the wave of timeouts: some fire before the kill, the rest after,
        # and those the dead replica had claimed are taken over when its lease ends.
        first_end = min(s.get_info().end_at for s in short).timestamp()
        time.sleep(max(0.0, first_end - time.time() + 5))
        # A request through replica 0 that fails because of the kill can end before `kill()`
        # returns (it waits for the process): "before" is before the signal.
        kill_sent = time.monotonic()
        cluster.servers[0].kill()
        killed_at = time.monotonic()

        deadline = time.monotonic() + 180
        want = {s.sandbox_id: ("paused" if n % 2 == 0 else "gone") for n, s in enumerate(short)}
        while True:
            now = {i: state_of(cluster, 1, i) for i in want}
            if now == want or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert now == want
        for n, s in enumerate(short):
            events = agent_events(cluster, s.sandbox_id)
            assert events == (["paused"] if n % 2 == 0 else ["killed"]), (s.sandbox_id, events)
        stop.set()
        for t in threads:
            t.join(30)
        after = [ok for (t, r, ok) in results if r == 1 and t > killed_at + 1]
        assert len(after) >= 5 and all(after), (after, errors)
        before = [ok for (t, r, ok) in results if t < kill_sent]
        assert before and all(before), errors
    finally:
        stop.set()
        kill_all([steady] + short)
        cluster.restart_server(0)


def test_a_killed_agent_is_written_off_and_its_paused_sandbox_resumes_elsewhere(cluster):
    sbxs = [Sandbox.create(timeout=600, **cluster.opts(n % 2)) for n in range(6)]
    later = []
    victim = None
    try:
        where = {s.sandbox_id: cluster.host_of(s.sandbox_id) for s in sbxs}
        # The agent with the most of them goes; one of its sandboxes is paused first, with a
        # process, a file and memory to keep.
        victim = max((1, 2, 3), key=lambda i: list(where.values()).count(i))
        on_victim = [s for s in sbxs if where[s.sandbox_id] == victim]
        assert len(on_victim) >= 2, where
        paused = on_victim[0]
        paused.files.write("/home/user/kept", "paused on the lost host")
        paused.commands.run("echo 41 > /dev/shm/counter")
        paused.commands.run("sleep 3600", background=True)
        paused.pause()
        deadline = time.monotonic() + 60
        while not cluster.store_has(paused.sandbox_id):
            assert time.monotonic() < deadline, "the paused sandbox never reached the shared store"
            time.sleep(0.5)
        lost = on_victim[1:]
        survivors = [s for s in sbxs if where[s.sandbox_id] != victim]

        cluster.agent(victim).kill()
        killed_at = time.monotonic()
        deadline = killed_at + lab.LOST_AFTER + 10
        while any(state_of(cluster, 1, s.sandbox_id) != "gone" for s in lost):
            assert time.monotonic() < deadline, "the lost host's sandboxes still look alive"
            time.sleep(0.5)
        for s in lost:
            res = httpx.get(
                f"{cluster.server_url(0)}/sandboxes/{s.sandbox_id}",
                headers={"X-API-KEY": cluster.api_key},
                timeout=10,
            )
            assert res.status_code == 404
            assert f"its host host{victim} stopped answering" in res.json()["message"]
            with pytest.raises(NotFoundException):
                Sandbox.connect(s.sandbox_id, **cluster.opts(1))
        health = {h["id"]: h["health"] for h in cluster.hosts(1)}
        assert health[f"host{victim}"] == "lost", health
        listed = {i.sandbox_id for i in Sandbox.list(**cluster.opts(0)).next_items()}
        assert not listed & {s.sandbox_id for s in lost}
        assert state_of(cluster, 0, paused.sandbox_id) == "paused"
        for s in survivors:
            assert s.commands.run("echo alive").stdout == "alive\n"
        for n in range(4):
            later.append(Sandbox.create(timeout=300, **cluster.opts(n % 2)))
        assert victim not in {cluster.host_of(s.sandbox_id) for s in later}

        # The paused one resumes on another host, from the shared store, with its memory,
        # processes and files; the store's copy goes.
        moved = Sandbox.connect(paused.sandbox_id, **cluster.opts(1))
        new_host = cluster.host_of(paused.sandbox_id, exclude=victim)
        assert new_host is not None
        assert moved.files.read("/home/user/kept") == "paused on the lost host"
        assert moved.commands.run("cat /dev/shm/counter").stdout == "41\n"
        assert "sleep 3600" in moved.commands.run("ps -eo args").stdout
        deadline = time.monotonic() + 30
        while cluster.store_has(paused.sandbox_id):
            assert time.monotonic() < deadline, "the copy of a resumed sandbox stayed"
            time.sleep(0.5)

        # Back: its QEMUs are taken over at start, then killed, since the control plane wrote
        # them off; its stale copy of the moved sandbox goes too, which keeps running.
        cluster.restart_agent(victim)
        cluster.wait_hosts(lambda hs: all(h["health"] == "healthy" for h in hs))
        deadline = time.monotonic() + 60
        while any(cluster.holds(victim, s.sandbox_id) for s in lost + [paused]):
            assert time.monotonic() < deadline, "written-off sandboxes kept on the agent"
            time.sleep(1)
        assert cluster.host_of(paused.sandbox_id) == new_host
        assert moved.commands.run("cat /home/user/kept").stdout == "paused on the lost host"
        # And it pauses and resumes again where it is now.
        moved.pause()
        again = Sandbox.connect(paused.sandbox_id, **cluster.opts(0))
        assert again.commands.run("cat /dev/shm/counter").stdout == "41\n"
        assert cluster.host_of(paused.sandbox_id) == new_host
    finally:
        kill_all(sbxs + later)
        # The later tests need every agent.
        if victim and cluster.agent(victim).proc is None:
            cluster.restart_agent(victim)


def test_an_agent_stopped_with_sigterm_pauses_its_sandboxes_and_loses_none(cluster):
    sbxs = [Sandbox.create(timeout=600, **cluster.opts(n % 2)) for n in range(3)]
    try:
        where = {s.sandbox_id: cluster.host_of(s.sandbox_id) for s in sbxs}
        host = where[sbxs[0].sandbox_id]
        mine = [s for s in sbxs if where[s.sandbox_id] == host]
        for s in mine:
            s.commands.run(f"echo {s.sandbox_id} > /dev/shm/who")
        assert cluster.agent(host).stop() == 0
        # Paused to disk and recorded so before it stopped; it stays down past the lost
        # window, and nothing is written off.
        for s in mine:
            assert state_of(cluster, 0, s.sandbox_id) == "paused"
            assert cluster.store_has(s.sandbox_id)
        health = {h["id"]: h for h in cluster.hosts(1)}[f"host{host}"]
        assert not health["schedulable"], health
        time.sleep(lab.LOST_AFTER + 3)
        for s in mine:
            assert state_of(cluster, 1, s.sandbox_id) == "paused"
        cluster.restart_agent(host)
        cluster.wait_hosts(lambda hs: all(h["health"] == "healthy" and h["schedulable"] for h in hs))
        for s in mine:
            back = Sandbox.connect(s.sandbox_id, **cluster.opts(1))
            assert back.commands.run("cat /dev/shm/who").stdout == f"{s.sandbox_id}\n"
    finally:
        kill_all(sbxs)
