"""Template builds with the official Python SDK's `Template` builder, unmodified, against a real
`wrenn up`: the build runs in a microVM on the host (steps through envd in the guest), and
`Sandbox.create(template=name)` starts from its snapshot with the start command already running.

One template is built once for the module and rebuilt once with its last step changed (the
earlier steps come from the layer cache, and sandboxes of the first version keep running); a
failing build and the bad-input answers need no successful build. Builds under TCG take tens of
seconds each, so the module makes three.
"""

import hashlib
import time
import uuid
from pathlib import Path

import httpx
import pytest
from e2b import BuildException, Sandbox, Template, wait_for_url

import netlab

RUN = uuid.uuid4().hex[:8]
NAME = f"e2e-app-{RUN}"
BUILD_TIMEOUT = 900


def api(wrenn) -> httpx.Client:
    return httpx.Client(
        base_url=wrenn.api_url,
        headers={"X-API-KEY": wrenn.api_key},
        timeout=30,
    )


def app_template(ctx: Path, marker: str) -> Template:
    return (
        Template(file_context_path=str(ctx))
        .from_template("base")
        .copy("app", "/app", user="user", mode=0o755)
        .run_cmd("echo built-as-$(whoami) > /app/who.txt")
        .set_envs({"GREETING": "hello from the template", "OVERRIDE": "template"})
        .set_workdir("/app")
        .run_cmd(f"echo {marker} > /app/marker.txt")
        .set_start_cmd(
            "python3 -m http.server 8080 --bind 0.0.0.0 --directory /app",
            wait_for_url("http://localhost:8080/marker.txt"),
        )
    )


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("template-ctx")
    (d / "app").mkdir()
    (d / "app" / "hello.txt").write_text("hello from the build context\n")
    (d / "app" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    # This run's own context: an archive an earlier run uploaded would be reused.
    (d / "app" / "run-id").write_text(RUN)
    return d


@pytest.fixture(scope="module")
def built(wrenn, ctx):
    logs = []
    started = time.monotonic()
    info = Template.build(
        app_template(ctx, "v1"),
        name=NAME,
        on_build_logs=logs.append,
        request_timeout=BUILD_TIMEOUT,
    )
    took = time.monotonic() - started
    print(f"template build took {took:.1f} s")
    return info, [str(entry.message) for entry in logs]


def test_build_reports_progress_and_the_template_exists(wrenn, built):
    info, logs = built
    assert info.name == NAME and info.template_id and info.build_id
    uuid.UUID(info.build_id)
    text = "\n".join(logs)
    assert "Uploaded 'app'" in text, text
    assert "[2/5] RUN" in text and "echo built-as-$(whoami)" in text, text
    assert Template.exists(NAME)
    assert not Template.exists(f"e2e-nothing-{RUN}")
    with api(wrenn) as c:
        listed = {t["templateID"]: t for t in c.get("/templates").json()}
        mine = listed[info.template_id]
        assert mine["names"] == [NAME] and mine["buildID"] == info.build_id
        assert mine["buildStatus"] == "ready" and mine["public"] is False
        assert mine["diskSizeMB"] > 0 and mine["memoryMB"] > 0
        assert listed["base"]["public"] is True
        tags = c.get(f"/templates/{info.template_id}/tags").json()
        assert [(t["tag"], t["buildID"]) for t in tags] == [("default", info.build_id)]
        # The log by time, as `e2b template logs`-style clients page it.
        logs_url = f"/templates/{info.template_id}/builds/{info.build_id}/logs"
        first = c.get(logs_url, params={"limit": 3}).json()["logs"]
        last = c.get(logs_url, params={"limit": 2, "direction": "backward"}).json()["logs"]
        assert len(first) == 3 and len(last) == 2, (first, last)
        assert first[0]["message"].startswith("building on template base"), first
        assert "snapshotted" in last[0]["message"], last
        assert c.get(logs_url, params={"direction": "sideways"}).status_code == 400


def test_sandbox_from_the_template_has_its_files_env_and_running_server(wrenn, built):
    sbx = Sandbox.create(template=NAME, timeout=300, envs={"OVERRIDE": "sandbox"})
    try:
        assert sbx.commands.run("cat /app/hello.txt").stdout == "hello from the build context\n"
        # COPY with user and mode; RUN as the default build user.
        stat = sbx.commands.run("stat -c '%U %a' /app/run.sh /app/hello.txt").stdout.split("\n")
        assert stat[:2] == ["user 755", "user 755"], stat
        assert sbx.commands.run("cat /app/who.txt").stdout == "built-as-user\n"
        # The template's ENV and WORKDIR; the sandbox's own env var wins over the template's.
        out = sbx.commands.run('echo "$GREETING|$OVERRIDE|$(pwd)"').stdout
        assert out == "hello from the template|sandbox|/app\n", out
        # The start command was running when the snapshot was taken: it answers at once.
        r = httpx.get(
            f"{wrenn.api_url}/marker.txt",
            headers={"host": sbx.get_host(8080)},
            timeout=30,
        )
        assert (r.status_code, r.text) == (200, "v1\n")
    finally:
        sbx.kill()


def test_rebuild_reuses_cached_layers_and_old_sandboxes_keep_running(wrenn, ctx, built):
    first, _ = built
    old = Sandbox.create(template=NAME, timeout=300)
    try:
        logs = []
        second = Template.build(
            app_template(ctx, "v2"),
            name=NAME,
            on_build_logs=logs.append,
            request_timeout=BUILD_TIMEOUT,
        )
        text = "\n".join(str(e.message) for e in logs)
        assert second.template_id == first.template_id and second.build_id != first.build_id
        assert "reusing cached layers of steps 1-4" in text, text
        assert "Skipping upload of 'app', already cached" in text, text
        new = Sandbox.create(template=NAME, timeout=300)
        try:
            assert new.commands.run("cat /app/marker.txt").stdout == "v2\n"
        finally:
            new.kill()
        # The first version's sandbox is untouched, and pauses and resumes as itself.
        assert old.commands.run("cat /app/marker.txt").stdout == "v1\n"
        old.pause()
        old = Sandbox.connect(old.sandbox_id, timeout=300)
        assert old.commands.run("cat /app/marker.txt").stdout == "v1\n"
        # A tag names a version: the first build, by the tag the second moved on from.
        Template.assign_tags(f"{NAME}:default", ["v2"])
        with api(wrenn) as c:
            tags = {t["tag"]: t["buildID"] for t in c.get(f"/templates/{NAME}/tags").json()}
        assert tags == {"default": second.build_id, "v2": second.build_id}, tags
        tagged = Sandbox.create(template=f"{NAME}:v2", timeout=300)
        try:
            assert tagged.commands.run("cat /app/marker.txt").stdout == "v2\n"
        finally:
            tagged.kill()
        # The first version is named by nothing now, but its sandbox keeps its files.
        first_dir = wrenn.state_dir / "templates" / "builds" / first.build_id
        if not wrenn.external:
            time.sleep(8)
            assert (first_dir / "memory").exists()
    finally:
        old.kill()
    # Once its last sandbox is gone, the first version is collected; the second stays.
    if not wrenn.external:
        deadline = time.monotonic() + 90
        while first_dir.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert not first_dir.exists(), f"{first_dir} was not collected"
        assert (first_dir.parent / second.build_id / "memory").exists()


def test_failing_step_fails_the_build_with_its_exit_code(wrenn):
    name = f"e2e-broken-{RUN}"
    logs = []
    tpl = (
        Template()
        .from_template("base")
        .run_cmd("echo about to fail; echo on stderr >&2; exit 7")
    )
    with pytest.raises(BuildException) as err:
        Template.build(tpl, name=name, on_build_logs=logs.append, request_timeout=BUILD_TIMEOUT)
    assert "exit code 7" in str(err.value), err.value
    text = "\n".join(str(e.message) for e in logs)
    assert "about to fail" in text and "on stderr" in text, text
    # No version was made: a create from it is refused, and nothing was left behind.
    with pytest.raises(Exception) as created:
        Sandbox.create(template=name, timeout=60)
    assert "no finished build" in str(created.value), created.value
    if not wrenn.external:
        builds = wrenn.state_dir / "templates" / "builds"
        assert not [p for p in builds.iterdir() if p.name.endswith(".staging")]


def test_bad_build_requests_are_refused_clearly(wrenn, ctx, built):
    first, _ = built
    with api(wrenn) as c:
        assert c.post("/v3/templates", json={}).status_code == 400
        assert c.post("/v3/templates", json={"name": "bad name"}).status_code == 400
        # A public template's name is not the team's to build.
        taken = c.post("/v3/templates", json={"name": "base"})
        assert taken.status_code == 409, taken.text
        req = c.post("/v3/templates", json={"name": f"e2e-bad-{RUN}"}).json()
        tid, bid = req["templateID"], req["buildID"]
        # A COPY whose archive was never uploaded, an unknown source image, a bad hash.
        missing = c.post(
            f"/v2/templates/{tid}/builds/{bid}",
            json={
                "fromTemplate": "base",
                "steps": [{"type": "COPY", "args": ["x", "/x"], "filesHash": "ab" * 32}],
            },
        )
        assert missing.status_code == 400 and "not uploaded" in missing.json()["message"]
        # Image sources the server cannot use are refused before any pull (never a real
        # registry's name here: the agent would resolve and reach it).
        image = c.post(
            f"/v2/templates/{tid}/builds/{bid}", json={"fromImage": "not an image", "steps": []}
        )
        assert image.status_code == 400 and "not an image reference" in image.json()["message"]
        aws = c.post(
            f"/v2/templates/{tid}/builds/{bid}",
            json={
                "fromImage": f"{netlab.REGISTRY}:{netlab.REGISTRY_PORT}/wrenn/tiny:1",
                "fromImageRegistry": {"type": "aws", "awsRegion": "x"},
                "steps": [],
            },
        )
        assert aws.status_code == 400 and "type 'aws'" in aws.json()["message"], aws.text
        assert c.get(f"/templates/{tid}/files/not-a-hash").status_code == 400
        assert c.get(f"/templates/{tid}/builds/{uuid.uuid4()}/status").status_code == 404
        # Upload links are signed: a changed signature or a link for reading is refused.
        fresh = hashlib.sha256(RUN.encode()).hexdigest()
        link = c.get(f"/templates/{tid}/files/{fresh}").json()
        assert link["present"] is False
        url = httpx.URL(link["url"])
        forged = url.copy_merge_params({"signature": "0" * 64})
        assert httpx.put(str(forged), content=b"x").status_code == 401
        assert httpx.get(str(url)).status_code == 401
        ok = httpx.put(str(url), content=b"not really a tarball")
        assert ok.status_code == 200
        again = c.get(f"/templates/{tid}/files/{fresh}").json()
        assert again == {"present": True}


def test_deleted_template_keeps_its_sandboxes(wrenn, ctx):
    name = f"e2e-gone-{RUN}"
    # Build steps reach the internet as sandboxes do by default: here the suite's lab (its
    # fake internet host, by name through the slot's resolver), never its LAN host (a private
    # range). Only with the suite's own `wrenn up`, whose uplink is the lab.
    net = (
        "curl -s -m 20 http://allowed.test/ > /srv/net.txt; "
        f"(curl -s -m 5 http://{netlab.LAN}/ && echo lan-reached || echo lan-denied) >> /srv/net.txt"
        if not wrenn.external
        else "true"
    )
    Template.build(
        Template()
        .from_template(NAME)
        .run_cmd("echo child > /tmp/child.txt")
        .run_cmd(net, user="root"),
        name=name,
        request_timeout=BUILD_TIMEOUT,
    )
    sbx = Sandbox.create(template=name, timeout=300)
    try:
        # Built on a built template: the parent's files are there too.
        assert sbx.commands.run("cat /tmp/child.txt /app/marker.txt").stdout == "child\nv2\n"
        if not wrenn.external:
            net_out = sbx.commands.run("cat /srv/net.txt").stdout
            assert net_out == f"lab {netlab.NAMES['allowed.test']} host=allowed.test\nlan-denied\n", net_out
        with api(wrenn) as c:
            assert c.delete(f"/templates/{name}").status_code == 204
            assert c.delete(f"/templates/{name}").status_code == 404
        assert not Template.exists(name)
        with pytest.raises(Exception):
            Sandbox.create(template=name, timeout=60)
        assert sbx.commands.run("cat /tmp/child.txt").stdout == "child\n"
        sbx.pause()
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=300)
        assert sbx.commands.run("cat /tmp/child.txt").stdout == "child\n"
    finally:
        sbx.kill()
