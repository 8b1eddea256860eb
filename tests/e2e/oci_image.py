"""A tiny OCI image made on this machine (nothing comes from the internet), as an OCI image
layout: `make_layout(dest, tag)`.

Two gzip'd layers:

1. `/bin/busybox` (a copy of the host's static busybox, Debian's busybox-static) with links for
   the applets a shell session needs, `/bin/bash` (the host's `/bin/bash-static`: the SDKs run
   commands as `/bin/bash -l -c`), `/usr/bin/env`, `/etc/passwd` and `/etc/group` with only root
   (so a build must add `user` itself), `/etc/wrenn-oci-marker` = `layer-1`, `/opt/gone.txt` and
   an empty `/opt/app/`; no `/dev`, `/proc`, `/sys` or `/home` (as in many `FROM scratch`
   images: the build makes what a guest needs);
2. a whiteout of `/opt/gone.txt`, `/opt/app/hello.txt` and `/etc/wrenn-oci-marker` = `layer-2`.

The config's `Env` has `IMAGE_VAR=from-image`, `WorkingDir` is `/opt/app`, `Cmd` `/bin/sh`.
Everything is deterministic (fixed mtimes, uid/gid 0, sorted entries, gzip without a name or
time), so making it again gives the same digests and a rebuild hits the same image.
"""

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"

BUSYBOX = Path("/bin/busybox")
BASH_STATIC = Path("/bin/bash-static")

APPLETS = [
    "[", "awk", "basename", "cat", "chgrp", "chmod", "chown", "cmp", "cp", "cut", "date", "df",
    "diff", "dirname", "du", "echo", "egrep", "env", "expr", "false", "fgrep", "find", "free",
    "grep", "gunzip", "gzip", "head", "hostname", "id", "kill", "ln", "ls", "md5sum", "mkdir",
    "mkfifo", "mktemp", "mount", "mv", "nproc", "printf", "ps", "pwd", "readlink", "realpath",
    "rm", "rmdir", "sed", "seq", "sh", "sha256sum", "sleep", "sort", "stat", "sync", "tail",
    "tar", "tee", "test", "timeout", "touch", "tr", "true", "umount", "uname", "uniq", "uptime",
    "wc", "which", "whoami", "xargs", "yes", "zcat",
]

ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "IMAGE_VAR=from-image"]
WORKDIR = "/opt/app"

LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA = "application/vnd.oci.image.index.v1+json"


def _static(path: Path) -> Path:
    out = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True, check=True)
    if "statically linked" not in out.stdout:
        raise RuntimeError(f"{path} is not a static binary ({out.stdout.strip()}): install "
                           "busybox-static and bash-static")
    return path


def _applets() -> list[str]:
    have = set(subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                              check=True).stdout.split())
    return [a for a in APPLETS if a in have]


class _Layer:
    """Tar entries by path, written sorted (parents before children)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = kind, mode, MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def dir(self, path: str, mode: int = 0o755) -> None:
        self.entries[path] = (self._info(path, tarfile.DIRTYPE, mode), None)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.entries[path] = (info, data)

    def link(self, path: str, target: str) -> None:
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.entries[path] = (info, None)

    def blobs(self) -> tuple[bytes, bytes]:
        """(the uncompressed tar, its gzip)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                info, data = self.entries[path]
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        raw = buf.getvalue()
        gz = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0) as f:
            f.write(raw)
        return raw, gz.getvalue()


def _layers() -> list[_Layer]:
    one = _Layer()
    for d in ("bin", "etc", "opt", "opt/app", "root", "usr", "usr/bin"):
        one.dir(d, 0o700 if d == "root" else 0o755)
    one.dir("tmp", 0o1777)
    one.file("bin/busybox", _static(BUSYBOX).read_bytes(), 0o755)
    one.file("bin/bash", _static(BASH_STATIC).read_bytes(), 0o755)
    for applet in _applets():
        one.link(f"bin/{applet}", "busybox")
    one.link("usr/bin/env", "/bin/busybox")
    one.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    one.file("etc/group", b"root:x:0:\n")
    one.file("etc/wrenn-oci-marker", b"layer-1\n")
    one.file("opt/gone.txt", b"removed by layer 2\n")

    two = _Layer()
    for d in ("etc", "opt", "opt/app"):
        two.dir(d)
    two.file("opt/.wh.gone.txt", b"", 0o600)
    two.file("opt/app/hello.txt", b"hello from layer 2\n")
    two.file("etc/wrenn-oci-marker", b"layer-2\n")
    return [one, two]


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layout(dest_dir: str | Path, tag: str = "1") -> str:
    """Writes the image as an OCI image layout at `dest_dir` (made, or replaced), its one
    manifest named `tag`; returns the manifest's digest."""
    dest = Path(dest_dir)
    if dest.exists():
        shutil.rmtree(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = _digest(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layers, diff_ids = [], []
    for layer in _layers():
        raw, gz = layer.blobs()
        diff_ids.append(_digest(raw))
        layers.append({"mediaType": LAYER_MEDIA, "digest": put(gz), "size": len(gz)})
    config = _json({
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {"Env": ENV, "WorkingDir": WORKDIR, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": "wrenn e2e: busybox, bash, passwd, /opt"},
            {"created": CREATED, "created_by": "wrenn e2e: whiteout, hello.txt, marker"},
        ],
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA,
        "config": {"mediaType": CONFIG_MEDIA, "digest": put(config), "size": len(config)},
        "layers": layers,
    })
    digest = put(manifest)
    (dest / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_bytes(_json({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA,
            "digest": digest,
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))
    return digest
