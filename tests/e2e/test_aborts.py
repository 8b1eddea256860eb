"""Creates whose caller goes away leave nothing behind:
- 50 `Sandbox.create()` calls whose client gives up at a random moment between 0 and 2 s;
- 50 agent `Create` calls with `Connect-Timeout-Ms: 1` (straight to the agent's RPC on its
  Unix socket, as a control plane whose deadline ran out would make them).
Afterwards the host's sandbox list and capacity are back to the baseline (every sandbox the
API shows can be killed; the agent's orphans are reconciled away), and no QEMU process,
sandbox directory or network namespace is left over.
"""

import concurrent.futures
import http.client
import json
import random
import secrets
import socket
import subprocess
import time

import pytest
from e2b import Sandbox, SandboxQuery

from test_faults import netns_count, qemu_count, sandbox_dirs

N = 50


def agent_call(url: str, method: str, body: dict, timeout_ms: int | None = None) -> tuple[int, dict]:
    assert url.startswith("unix:"), url
    data = json.dumps(body).encode()
    head = [
        f"POST /wrenn.agent.v1.AgentService/{method} HTTP/1.1",
        "Host: agent",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if timeout_ms is not None:
        head.append(f"Connect-Timeout-Ms: {timeout_ms}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(url.removeprefix("unix:"))
    try:
        # One write: with a 1 ms deadline the agent may answer and close before it reads the
        # body, which http.client's second write (the body) then met as a broken pipe.
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        r = http.client.HTTPResponse(sock)
        r.begin()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        sock.close()


def agent_ids(url: str) -> set[str]:
    status, body = agent_call(url, "List", {})
    assert status == 200, body
    return {s["sandboxId"] for s in body.get("sandboxes", [])}


def settle(check, what: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while True:
        problem = check()
        if not problem:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {problem}")
        time.sleep(0.5)


def host_matches_api(wrenn, before_ids: set[str]) -> str | None:
    """Empty when the host holds exactly what the API shows plus the warm pool."""
    api = {s.sandbox_id for s in Sandbox.list(limit=100).next_items()}
    agent = agent_ids(wrenn.agent_url())
    if agent != api:
        return f"agent has {sorted(agent - api)} the API does not, API {sorted(api - agent)}"
    if api != before_ids:
        return f"API lists {sorted(api - before_ids)} beyond the baseline"
    dirs = sandbox_dirs(wrenn)
    unknown = [n for n, o in dirs.items() if not o.startswith("vm:") and o not in api]
    if unknown or "" in dirs.values():
        return f"directories left: {unknown or dirs}"
    running = len([s for s in Sandbox.list(limit=100).next_items() if s.state.value == "running"])
    warm = len([o for o in dirs.values() if o == "vm:warm"])
    if qemu_count(wrenn) != running + warm:
        return f"{qemu_count(wrenn)} QEMU processes for {running} running and {warm} warm"
    return None


def one_create(meta: dict, give_up: float) -> str | None:
    try:
        return Sandbox.create(metadata=meta, timeout=120, request_timeout=give_up).sandbox_id
    except Exception:
        return None


def test_aborted_creates_leave_nothing_behind(wrenn):
    if wrenn.external:
        pytest.skip("WRENN_E2E_URL: the test reads the host's state directory")
    tag = secrets.token_hex(4)
    meta = {"suite": "aborts", "tag": tag}
    before = {s.sandbox_id for s in Sandbox.list(limit=100).next_items()}
    settle(lambda: host_matches_api(wrenn, before), "baseline")
    base_netns = netns_count()

    rng = random.Random(int(tag, 16))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda t: one_create(meta, t), [rng.uniform(0.01, 2.0) for _ in range(N)]))
    print(f"{sum(1 for m in made if m)} of {N} creates answered before their client gave up")

    # Creates whose client left run to their end: their sandboxes are listed like any other
    # and can be killed; none stays half-made.
    def tagged():
        items = Sandbox.list(query=SandboxQuery(metadata=meta), limit=100).next_items()
        return {s.sandbox_id for s in items}

    time.sleep(3)
    for _ in range(3):
        for sid in tagged():
            Sandbox.kill(sid)
        time.sleep(2)
    assert tagged() == set()
    settle(lambda: host_matches_api(wrenn, before), "after client aborts")

    # The agent asked with a 1 ms deadline: each call is answered deadline_exceeded (or, once
    # the host is full, refused), the creates run on, and the control plane kills the VMs it
    # never recorded.
    url = wrenn.agent_url()
    codes = {}
    for i in range(N):
        status, body = agent_call(
            url,
            "Create",
            {"sandbox": {"sandboxId": f"abort-{tag}-{i}", "templateId": "base"}},
            timeout_ms=1,
        )
        codes.setdefault(body.get("code", status), 0)
        codes[body.get("code", status)] += 1
    print(f"agent answers with a 1 ms deadline: {codes}")
    assert codes.get("deadline_exceeded", 0) > 0, codes
    settle(lambda: [i for i in agent_ids(url) if i.startswith(f"abort-{tag}")] or None, "agent orphans")
    settle(lambda: host_matches_api(wrenn, before), "after agent deadlines")
    # Slots in use (the warm VM's) plus the free ones the pool keeps (warm pool + 2): a burst
    # may leave the pool fuller than at the start, never more.
    def netns_bounded():
        dirs = sandbox_dirs(wrenn)
        in_use = len([o for o in dirs.values() if o == "vm:warm"]) + len(before)
        if base_netns <= netns_count() <= in_use + 3:
            return None
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return f"{netns_count()} slot namespaces ({base_netns} at the start): {names} dirs {dirs}"

    settle(netns_bounded, "network namespaces leaked", limit=30)

    # And the capacity is whole again: a create works.
    sbx = Sandbox.create(metadata=meta)
    assert sbx.commands.run("echo ok").stdout.strip() == "ok"
    sbx.kill()
