"""An OCI registry in the egress lab (netlab.py): Debian's `docker-registry` (the CNCF
distribution registry), plain HTTP on `netlab.REGISTRY:netlab.REGISTRY_PORT`, run inside the
lab's namespace with its storage in a temporary directory, and `skopeo` to push images to it
from the host and to write `docker save` tarballs.

Nothing here talks to anything but the lab: the registry has no upstream (no proxy, no
notifications), skopeo is only ever given the lab's registry or local paths, without the
machine's proxy settings and without a signature policy file.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import netlab

BINARY = "/usr/bin/docker-registry"
INSTALL_HINT = "apt-get install -y --no-install-recommends docker-registry skopeo"

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {addr}
"""


def _env() -> dict[str, str]:
    """The environment for skopeo: without proxy settings (the lab is reached directly)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`skopeo --insecure-policy ARGS` (no policy.json needed: nothing is verified anyway)."""
    out = subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)}: {out.returncode}\n{out.stdout}{out.stderr}")
    return out


def docker_archive(layout: Path, tag: str, dest: Path, ref: str) -> Path:
    """Writes the layout's image `tag` as a `docker save` tarball at `dest`, named `ref`."""
    dest.unlink(missing_ok=True)
    skopeo("copy", f"oci:{layout}:{tag}", f"docker-archive:{dest}:{ref}")
    return dest


class Registry:
    """`start()` runs the registry in the lab's namespace and waits until `GET /v2/` answers;
    `stop()` kills its process group and removes its storage. The lab's teardown also kills one
    an earlier (crashed) run left (`netlab.kill_stale_registries`)."""

    def __init__(self, netns: str = netlab.NETNS, address: str = netlab.REGISTRY,
                 port: int = netlab.REGISTRY_PORT) -> None:
        self.netns = netns
        self.address = address
        self.port = port
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        """`address:port`, as an image reference names the registry."""
        return f"{self.address}:{self.port}"

    @staticmethod
    def available() -> str | None:
        """Why the registry cannot run here (None: it can)."""
        for tool in (BINARY, "skopeo"):
            if not shutil.which(tool):
                return f"{tool} is not installed: {INSTALL_HINT}"
        return None

    def start(self, timeout: float = 30) -> "Registry":
        missing = self.available()
        if missing:
            raise RuntimeError(missing)
        self.dir = Path(tempfile.mkdtemp(prefix=netlab.REGISTRY_DIR_PREFIX))
        config = self.dir / "config.yml"
        config.write_text(CONFIG.format(root=self.dir / "storage", addr=self.host))
        log = open(self.dir / "registry.log", "wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, BINARY, "serve", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                text = (self.dir / "registry.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"docker-registry exited ({code}):\n{text}")
            try:
                with opener.open(f"http://{self.host}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                text = (self.dir / "registry.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(
                    f"the registry at {self.host} did not answer in {timeout}s:\n{text}"
                )
            time.sleep(0.2)

    def push(self, layout: Path, tag: str, repo: str) -> str:
        """Copies the layout's image `tag` to `repo` here (`name:tag`); returns its reference."""
        ref = f"{self.host}/{repo}"
        skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}")
        return ref

    def inspect(self, ref: str) -> str:
        """`skopeo inspect` of an image here (JSON)."""
        return skopeo("inspect", "--tls-verify=false", f"docker://{ref}").stdout

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
