"""Template builds from an OCI image, against a real `wrenn up`: the host agent pulls the image
(from the lab's registry, or from a `docker save` tarball the CLI sends), unpacks its layers
inside a build microVM, makes it bootable (a `user` account, envd, resolv.conf) and runs the
steps on it; the image's `Env` and `WorkingDir` become the template's defaults.

The image is tiny and made on this machine (oci_image.py: static busybox and bash, two layers,
one whiteout), and the registry runs in the egress lab (registry.py), so nothing is pulled from
the internet. Pulls from registries the operator did not list, or that do not answer, fail the
build at once with a message naming them. The registry tests need the suite's own `wrenn up`
(its lab and `--insecure-registry` list) and are skipped against an external instance.
"""

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2b import BuildException, Sandbox, Template

import netlab
import oci_image
import registry as registry_mod
from conftest import ROOT, wrenn_binary

# Guest, image and network paths: the same on either database (see conftest).
pytestmark = pytest.mark.one_database

RUN = uuid.uuid4().hex[:8]
NAME = f"e2e-oci-{RUN}"
REPO = "wrenn/tiny:1"
TAG = "1"
BUILD_TIMEOUT = 900
# An unreachable registry fails the build at once: well under a build VM's boot and unpack.
FAIL_FAST = 60


def api(wrenn) -> httpx.Client:
    return httpx.Client(base_url=wrenn.api_url, headers={"X-API-KEY": wrenn.api_key}, timeout=30)


@dataclass
class TinyImage:
    layout: Path
    digest: str
    tarball: Path


@pytest.fixture(scope="session")
def tiny_image(tmp_path_factory) -> TinyImage:
    """The tiny image as an OCI layout (tag `1`) and as a `docker save` tarball of
    `wrenn/tiny:1`."""
    if not shutil.which("skopeo"):
        pytest.skip(f"skopeo is not installed: {registry_mod.INSTALL_HINT}")
    d = tmp_path_factory.mktemp("oci-image")
    digest = oci_image.make_layout(d / "layout", TAG)
    tarball = registry_mod.docker_archive(d / "layout", TAG, d / "tiny.tar", REPO)
    return TinyImage(d / "layout", digest, tarball)


@pytest.fixture(scope="session")
def registry(lab):
    """The lab's registry (plain HTTP: the suite's `wrenn up` lists it with
    `--insecure-registry`)."""
    missing = registry_mod.Registry.available()
    if missing:
        pytest.skip(missing)
    reg = registry_mod.Registry().start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def pushed(registry, tiny_image) -> str:
    """The tiny image's reference in the lab's registry, e.g. `198.51.100.72:5000/wrenn/tiny:1`."""
    ref = registry.push(tiny_image.layout, TAG, REPO)
    assert ref == f"{netlab.REGISTRY}:{netlab.REGISTRY_PORT}/{REPO}"
    assert json.loads(registry.inspect(ref))["Digest"] == tiny_image.digest
    return ref


def image_template(ref: str, marker: str) -> Template:
    # The step writes into the image's root-owned /opt/app, so as root (steps run as the
    # template's user, `user`, by default).
    return (
        Template()
        .from_image(ref)
        .set_envs({"STEP_VAR": "x"})
        .run_cmd(f"echo {marker} > /opt/app/built.txt", user="root")
    )


def build(tpl: Template, name: str, logs: list):
    """`Template.build` as the tests make them: 1 vCPU, 512 MiB, the log into `logs`."""
    return Template.build(
        tpl,
        alias=name,
        cpu_count=1,
        memory_mb=512,
        on_build_logs=logs.append,
        request_timeout=BUILD_TIMEOUT,
    )


def log_text(logs: list) -> str:
    return "\n".join(str(entry.message) for entry in logs)


def assert_no_ready_version(wrenn, name: str) -> None:
    """A failed build left no version: a create from the name is refused, no template of that
    name is ready, and no half-made build directory stays behind."""
    with pytest.raises(Exception) as created:
        Sandbox.create(template=name, timeout=60)
    refused = str(created.value)
    assert "no finished build" in refused or "not found" in refused, refused
    with api(wrenn) as c:
        listed = [t for t in c.get("/templates").json() if name in t.get("names", [])]
    assert all(t["buildStatus"] != "ready" for t in listed), listed
    builds = wrenn.state_dir / "templates" / "builds"
    if builds.exists():
        assert not [p for p in builds.iterdir() if p.name.endswith(".staging")]


@pytest.fixture(scope="module")
def built(wrenn, pushed):
    logs: list = []
    started = time.monotonic()
    info = build(image_template(pushed, "built"), NAME, logs)
    print(f"image template build took {time.monotonic() - started:.1f} s")
    yield info, log_text(logs)
    with api(wrenn) as c:
        c.delete(f"/templates/{NAME}")


def test_sdk_template_from_registry_image(wrenn, built):
    """`Template().from_image(...)` on the lab's registry: the sandbox has the image's layers
    in order (the later layer's file wins, the whiteout removed the earlier one's), the step's
    file, the image's and the step's env vars, the image's workdir, the `user` account the
    build added (uid 1000, its home), envd for files, and the requested size."""
    info, text = built
    assert info.name == NAME and info.template_id and info.build_id, (info, text)
    with api(wrenn) as c:
        mine = {t["templateID"]: t for t in c.get("/templates").json()}[info.template_id]
    assert mine["buildStatus"] == "ready", mine
    assert (mine["cpuCount"], mine["memoryMB"]) == (1, 512), mine
    sbx = Sandbox.create(template=NAME, timeout=300)
    try:
        def run(cmd: str) -> str:
            return sbx.commands.run(cmd, timeout=60).stdout

        assert run("cat /etc/wrenn-oci-marker") == "layer-2\n"
        # Layer 2's whiteout removed /opt/gone.txt; the whiteout file itself is not there.
        assert run("ls -A /opt") == "app\n"
        assert run("test -e /opt/gone.txt || echo absent") == "absent\n"
        assert run("cat /opt/app/hello.txt") == "hello from layer 2\n"
        assert run("cat /opt/app/built.txt") == "built\n"
        assert run("echo $IMAGE_VAR $STEP_VAR") == "from-image x\n"
        assert run("pwd") == "/opt/app\n"
        assert run("whoami") == "user\n"
        assert run("id -u") == "1000\n"
        assert run("stat -c '%U %u' /home/user") == "user 1000\n"
        sbx.files.write("/home/user/note.txt", "written through envd\n")
        assert sbx.files.read("/home/user/note.txt") == "written through envd\n"
        assert run("cat /home/user/note.txt; stat -c %U /home/user/note.txt") == (
            "written through envd\nuser\n"
        )
    finally:
        sbx.kill()


def test_rebuild_with_the_last_step_changed_reuses_the_unpacked_image(wrenn, pushed, built):
    """A rebuild of the same template from the same image with only its last step changed
    unpacks nothing again (its log says it reused the unpacked image), makes a new version of
    the same template, and that version has the new step's file on the same image."""
    first, _ = built
    logs: list = []
    second = build(image_template(pushed, "rebuilt"), NAME, logs)
    text = log_text(logs)
    assert second.template_id == first.template_id and second.build_id != first.build_id, text
    assert "reusing the unpacked image" in text, text
    sbx = Sandbox.create(template=NAME, timeout=300)
    try:
        out = sbx.commands.run("cat /opt/app/built.txt /etc/wrenn-oci-marker; echo $STEP_VAR")
        out = out.stdout
        assert out == "rebuilt\nlayer-2\nx\n", out
    finally:
        sbx.kill()


def template_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`wrenn template ARGS` as test_cli.py runs it (the suite's API URL and key in its env)."""
    proc = subprocess.run(
        [str(wrenn_binary()), "template", *args],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env=os.environ.copy(),
        cwd=cwd,
    )
    if check:
        assert proc.returncode == 0, (
            f"wrenn template {args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def test_cli_template_from_docker_save_tarball(wrenn, tiny_image, tmp_path):
    """`wrenn template build --image <docker save tarball>` makes a template of the image
    itself (its layers and config), and with `-f Dockerfile` the Dockerfile's steps run on that
    image (`--image` replaces the source its `FROM` names)."""
    name = f"e2e-oci-cli-{RUN}"
    df_name = f"{name}-df"
    size = ("--cpu-count", "1", "--memory-mb", "512")
    try:
        built = template_cli("build", "--name", name, "--image", str(tiny_image.tarball), *size,
                             cwd=tmp_path)
        assert built.stdout.strip() == name, built
        sbx = Sandbox.create(template=name, timeout=300)
        try:
            out = sbx.commands.run(
                "cat /etc/wrenn-oci-marker /opt/app/hello.txt; echo $IMAGE_VAR $(pwd)"
            ).stdout
            assert out == "layer-2\nhello from layer 2\nfrom-image /opt/app\n", out
        finally:
            sbx.kill()

        (tmp_path / "Dockerfile").write_text("FROM tiny\nRUN echo cli > /opt/app/cli.txt\n")
        built = template_cli("build", "-f", str(tmp_path / "Dockerfile"), "--name", df_name,
                             "--image", str(tiny_image.tarball), *size, str(tmp_path),
                             cwd=tmp_path)
        assert built.stdout.strip() == df_name, built
        sbx = Sandbox.create(template=df_name, timeout=300)
        try:
            out = sbx.commands.run("cat /opt/app/cli.txt /etc/wrenn-oci-marker; ls -A /opt").stdout
            assert out == "cli\nlayer-2\napp\n", out
        finally:
            sbx.kill()
    finally:
        for n in (df_name, name):
            template_cli("delete", n, cwd=ROOT, check=False)


def test_unreachable_registry_fails_fast(wrenn, lab):
    """A registry that does not answer (a lab address listed with `--insecure-registry` where
    nothing listens: the connection is reset) fails the build at once, with a message naming
    the registry, and leaves no version."""
    name = f"e2e-oci-down-{RUN}"
    host = f"{netlab.REGISTRY_DOWN}:{netlab.REGISTRY_PORT}"
    logs: list = []
    started = time.monotonic()
    with pytest.raises(BuildException) as err:
        build(Template().from_image(f"{host}/{REPO}").run_cmd("true"), name, logs)
    took = time.monotonic() - started
    assert took < FAIL_FAST, f"the build failed after {took:.1f} s: {err.value}"
    assert netlab.REGISTRY_DOWN in str(err.value), (err.value, log_text(logs))
    assert_no_ready_version(wrenn, name)


def test_private_registry_refused(wrenn, lab):
    """A registry at a private address the operator did not list is refused (the host does not
    pull from it), and the message points at `--insecure-registry`."""
    name = f"e2e-oci-private-{RUN}"
    logs: list = []
    with pytest.raises(BuildException) as err:
        build(Template().from_image(f"{netlab.LAN}:{netlab.REGISTRY_PORT}/{REPO}").run_cmd("true"),
              name, logs)
    msg = str(err.value)
    assert "private" in msg or "an address this host does not pull from" in msg, msg
    assert "--insecure-registry" in msg, msg
    assert_no_ready_version(wrenn, name)
