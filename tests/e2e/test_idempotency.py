"""`Idempotency-Key` on sandbox create, through the official E2B Python SDK
(`Sandbox.create(idempotency_key=...)`, which sends the `Idempotency-Key` header on
`POST /v2/sandboxes`) and plain HTTP, against a real `wrenn up`.

A retried create with the same key from the same team returns the same sandbox (201, same body)
and starts no second guest; concurrent creates with one key make exactly one sandbox; another
key (or another team) makes another one; malformed keys get 400 and create nothing.
"""

import threading
import uuid

import httpx
import pytest
from e2b import InvalidArgumentException, Sandbox, SandboxQuery, SandboxState

RUN = uuid.uuid4().hex[:10]
TIMEOUT = 300


def mark(case: str) -> dict:
    return {"idem": RUN, "case": case}


def ours(case: str) -> list[str]:
    """IDs of the listed sandboxes of this run's `case`."""
    return sorted(
        i.sandbox_id
        for i in Sandbox.list(query=SandboxQuery(metadata=mark(case))).next_items()
    )


def kill_quietly(*ids):
    for i in ids:
        try:
            Sandbox.kill(i)
        except Exception:
            pass


def api(wrenn, method: str, path: str, key: str | None = None, api_key=None, **kw) -> httpx.Response:
    headers = {"X-API-Key": api_key or wrenn.api_key, **kw.pop("headers", {})}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.request(method, wrenn.api_url + path, headers=headers, timeout=120, **kw)


def test_same_key_returns_the_same_working_sandbox(wrenn):
    key = str(uuid.uuid4())
    first = Sandbox.create(timeout=TIMEOUT, metadata=mark("same"), idempotency_key=key)
    try:
        again = Sandbox.create(timeout=TIMEOUT, metadata=mark("same"), idempotency_key=key)
        assert again.sandbox_id == first.sandbox_id
        assert ours("same") == [first.sandbox_id]
        # The handle the retry got works: same guest, same files.
        first.files.write("/tmp/idem.txt", RUN)
        assert again.files.read("/tmp/idem.txt") == RUN
        assert again.commands.run("echo ok").stdout.strip() == "ok"
        # Plain HTTP, v2 and v1: 201 with the same body the first create got.
        body = {"templateID": "base", "timeout": TIMEOUT, "metadata": mark("same")}
        r1 = api(wrenn, "POST", "/v2/sandboxes", key=key, json=body)
        r2 = api(wrenn, "POST", "/sandboxes", key=key, json=body)
        assert r1.status_code == 201, r1.text
        assert r2.status_code == 201, r2.text
        assert r1.json() == r2.json()
        assert r1.json()["sandboxID"] == first.sandbox_id
        assert ours("same") == [first.sandbox_id]
    finally:
        kill_quietly(first.sandbox_id)


def test_another_key_or_none_creates_another_sandbox(wrenn):
    made = []
    try:
        for key in (str(uuid.uuid4()), str(uuid.uuid4()), None):
            s = Sandbox.create(timeout=TIMEOUT, metadata=mark("other"), idempotency_key=key)
            made.append(s.sandbox_id)
        assert len(set(made)) == 3
        assert ours("other") == sorted(made)
    finally:
        kill_quietly(*made)


def test_concurrent_creates_with_one_key_make_one_sandbox(wrenn):
    key = str(uuid.uuid4())
    ids: list[str] = []
    errors: list[BaseException] = []

    def one():
        try:
            s = Sandbox.create(timeout=TIMEOUT, metadata=mark("concurrent"), idempotency_key=key)
            ids.append(s.sandbox_id)
        except BaseException as e:  # reported below, with the others' results
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    try:
        assert not errors, errors
        assert len(ids) == 3 and len(set(ids)) == 1, ids
        assert ours("concurrent") == [ids[0]]
        info = Sandbox.get_info(ids[0])
        assert info.state == SandboxState.RUNNING
    finally:
        kill_quietly(*set(ids), *ours("concurrent"))


def test_bad_keys_are_refused_and_create_nothing(wrenn):
    # The SDK checks keys itself before it sends anything.
    with pytest.raises(InvalidArgumentException):
        Sandbox.create(metadata=mark("bad"), idempotency_key="Not-Lowercase")
    body = {"templateID": "base", "metadata": mark("bad")}
    for path in ("/v2/sandboxes", "/sandboxes"):
        for bad in ("", "UPPER", "under_score", "dot.ted", "sp ace", "k" * 256):
            r = api(wrenn, "POST", path, key=bad, json=body)
            assert r.status_code == 400, (path, bad, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json")
            err = r.json()
            assert err["code"] == 400 and "Idempotency-Key" in err["message"], err
    assert ours("bad") == []


def test_key_reused_for_another_request_is_refused(wrenn):
    key = str(uuid.uuid4())
    first = api(wrenn, "POST", "/v2/sandboxes", key=key,
                json={"templateID": "base", "timeout": TIMEOUT, "metadata": mark("reuse")})
    assert first.status_code == 201, first.text
    try:
        r = api(wrenn, "POST", "/v2/sandboxes", key=key,
                json={"templateID": "base", "timeout": TIMEOUT + 1, "metadata": mark("reuse")})
        assert r.status_code == 422, r.text
        assert r.json()["code"] == 422
        assert ours("reuse") == [first.json()["sandboxID"]]
    finally:
        kill_quietly(first.json()["sandboxID"])


def test_same_key_from_another_team_is_its_own(wrenn):
    if wrenn.external:
        pytest.skip("needs the instance's admin token to make a second team")
    admin = (wrenn.state_dir / "admin-token").read_text().strip()
    h = {"X-Admin-Token": admin}
    team = httpx.post(wrenn.api_url + "/admin/teams", headers=h, json={"name": "idem-" + RUN}, timeout=30)
    assert team.status_code == 201, team.text
    key2 = httpx.post(
        wrenn.api_url + f"/admin/teams/{team.json()['teamID']}/api-keys", headers=h, json={"name": "k"}, timeout=30
    )
    assert key2.status_code == 201, key2.text
    other_api_key = key2.json()["key"]
    key = str(uuid.uuid4())
    body = {"templateID": "base", "timeout": TIMEOUT, "metadata": mark("teams")}
    mine = api(wrenn, "POST", "/v2/sandboxes", key=key, json=body)
    theirs = api(wrenn, "POST", "/v2/sandboxes", key=key, api_key=other_api_key, json=body)
    try:
        assert mine.status_code == 201, mine.text
        assert theirs.status_code == 201, theirs.text
        assert mine.json()["sandboxID"] != theirs.json()["sandboxID"]
    finally:
        kill_quietly(mine.json().get("sandboxID", ""))
        try:
            Sandbox.kill(theirs.json()["sandboxID"], api_key=other_api_key)
        except Exception:
            pass
