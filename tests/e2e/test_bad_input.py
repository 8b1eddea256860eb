"""Bad input through the official E2B Python SDK and plain HTTP against a real `wrenn up`: each
gets the error the SDKs expect (JSON `{"code", "message"}` with the right status) and changes
nothing: no sandbox appears, and an existing sandbox keeps its state and end time.
"""

import uuid

import httpx
import pytest
from e2b import (
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)

RUN = uuid.uuid4().hex[:10]
MARK = {"badinput": RUN}
UNKNOWN_ID = "doesnotexist" + RUN


def all_sandboxes() -> dict:
    """Every listed sandbox (all pages, running and paused): id -> (state, end_at, metadata)."""
    out = {}
    pager = Sandbox.list(limit=100)
    while pager.has_next:
        for i in pager.next_items():
            out[i.sandbox_id] = (i.state, i.end_at, dict(i.metadata))
    return out


@pytest.fixture(scope="module")
def canary(wrenn):
    """A sandbox the bad requests must leave alone."""
    s = Sandbox.create(timeout=600, metadata={"badinput-canary": RUN})
    try:
        yield s
    finally:
        try:
            s.kill()
        except Exception:
            pass


@pytest.fixture
def unchanged(wrenn, canary):
    """Asserts, after the test, that no sandbox appeared and the canary is as it was.

    Against an external instance other suites may create sandboxes at the same time, so there
    only sandboxes carrying this test's marker count; on a fresh CI instance no new sandbox at
    all may appear. (Sandboxes that vanish are not compared: another test's may time out; the
    canary stands for "nothing was killed".)
    """
    before = all_sandboxes()
    canary_before = Sandbox.get_info(canary.sandbox_id)
    yield
    after = all_sandboxes()
    new = set(after) - set(before)
    if wrenn.external:
        ours = [i for i in new if after[i][2].get("badinput") == RUN]
        assert ours == [], f"bad input created sandboxes: {ours}"
    else:
        assert new == set(), f"bad input created sandboxes: {new}"
    assert Sandbox.list(query=SandboxQuery(metadata=MARK)).next_items() == []
    canary_after = Sandbox.get_info(canary.sandbox_id)
    assert canary_after.state == SandboxState.RUNNING
    assert canary_after.end_at == canary_before.end_at
    assert canary_after.metadata == canary_before.metadata
    assert canary.sandbox_id in after


def api(wrenn, method: str, path: str, **kw) -> httpx.Response:
    headers = {"X-API-Key": wrenn.api_key, **kw.pop("headers", {})}
    return httpx.request(method, wrenn.api_url + path, headers=headers, timeout=60, **kw)


def assert_json_error(r: httpx.Response, code: int) -> dict:
    assert r.status_code == code, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) >= {"code", "message"}, body
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


def test_unknown_template(unchanged):
    with pytest.raises(SandboxException) as e:
        Sandbox.create("no-such-template-" + RUN, metadata=MARK)
    assert str(e.value).startswith("404"), str(e.value)
    assert "no-such-template-" + RUN in str(e.value)


def test_unknown_template_plain_http(wrenn, unchanged):
    r = api(wrenn, "POST", "/v2/sandboxes", json={"templateID": "nope-" + RUN, "metadata": MARK})
    body = assert_json_error(r, 404)
    assert "nope-" + RUN in body["message"]


def test_negative_timeout(wrenn, canary, unchanged):
    with pytest.raises(SandboxException) as e:
        Sandbox.create(timeout=-5, metadata=MARK)
    assert str(e.value).startswith("400"), str(e.value)
    for path in ("/sandboxes", "/v2/sandboxes"):
        r = api(wrenn, "POST", path, json={"templateID": "base", "timeout": -1, "metadata": MARK})
        assert_json_error(r, 400)
    # On an existing sandbox: refused, and its end time stays (checked by `unchanged`).
    r = api(wrenn, "POST", f"/sandboxes/{canary.sandbox_id}/timeout", json={"timeout": -10})
    assert_json_error(r, 400)


@pytest.mark.parametrize("path", ["/sandboxes", "/v2/sandboxes"])
@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"templateID": 5}',
        b"[]",
        b"",
        b'{"templateID": "base", "timeout": "ten"}',
        b'{"templateID": "base", "metadata": ["x"]}',
    ],
    ids=["syntax", "type", "array", "empty", "timeout-type", "metadata-type"],
)
def test_bad_json_create(wrenn, unchanged, path, body):
    r = api(wrenn, "POST", path, content=body, headers={"Content-Type": "application/json"})
    assert_json_error(r, 400)


def test_bad_json_on_sandbox_routes(wrenn, canary, unchanged):
    for path in (
        f"/sandboxes/{canary.sandbox_id}/timeout",
        f"/v2/sandboxes/{canary.sandbox_id}/connect",
        f"/sandboxes/{canary.sandbox_id}/connect",
    ):
        r = api(wrenn, "POST", path, content=b"{oops", headers={"Content-Type": "application/json"})
        assert_json_error(r, 400)


def test_wrong_api_key(wrenn, canary, unchanged):
    with pytest.raises(AuthenticationException) as e:
        Sandbox.create(api_key="e2b_wrong_" + RUN, metadata=MARK)
    assert "401" in str(e.value)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_wrong_" + RUN).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.get_info(canary.sandbox_id, api_key="e2b_wrong_" + RUN)
    # A kill with a wrong key kills nothing (the fixture checks the canary still runs).
    with pytest.raises(AuthenticationException):
        Sandbox.kill(canary.sandbox_id, api_key="e2b_wrong_" + RUN)
    with pytest.raises(AuthenticationException):
        Sandbox.set_timeout(canary.sandbox_id, 5, api_key="e2b_wrong_" + RUN)

    r = httpx.post(
        wrenn.api_url + "/v2/sandboxes",
        json={"templateID": "base", "metadata": MARK},
        headers={"X-API-Key": "e2b_wrong_" + RUN},
        timeout=60,
    )
    assert_json_error(r, 401)
    r = httpx.post(wrenn.api_url + "/v2/sandboxes", json={"templateID": "base", "metadata": MARK})
    assert_json_error(r, 401)
    r = httpx.delete(
        wrenn.api_url + f"/sandboxes/{canary.sandbox_id}", headers={"X-API-Key": "wrong"}
    )
    assert_json_error(r, 401)


def test_unknown_sandbox(wrenn, unchanged):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(UNKNOWN_ID)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(UNKNOWN_ID)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(UNKNOWN_ID, 60)
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics(UNKNOWN_ID)
    with pytest.raises(NotFoundException):
        Sandbox.pause(UNKNOWN_ID)
    assert Sandbox.kill(UNKNOWN_ID) is False

    for method, path in (
        ("GET", f"/sandboxes/{UNKNOWN_ID}"),
        ("DELETE", f"/sandboxes/{UNKNOWN_ID}"),
        ("POST", f"/sandboxes/{UNKNOWN_ID}/timeout"),
        ("POST", f"/v2/sandboxes/{UNKNOWN_ID}/connect"),
        ("POST", f"/sandboxes/{UNKNOWN_ID}/pause"),
    ):
        kw = {"json": {"timeout": 60}} if method == "POST" else {}
        assert_json_error(api(wrenn, method, path, **kw), 404)

    # envd traffic for an unknown sandbox: the edge proxy answers 502 "... was not found".
    sandbox_url = wrenn.env["E2B_SANDBOX_URL"]
    r = httpx.get(
        sandbox_url + "/files?path=/etc/hostname",
        headers={"E2b-Sandbox-Id": UNKNOWN_ID, "E2b-Sandbox-Port": "49983"},
    )
    assert r.status_code == 502, r.text
    assert f"{UNKNOWN_ID} was not found" in r.json()["message"]
