//! The default template: a Debian bookworm root filesystem made with `debootstrap`.
//!
//! `debootstrap --variant=minbase` gives bash, coreutils, python3 and CA certificates in about
//! 65 s and 190 MiB (measured on an idle 2-core host). Then `apt-get` in the tree adds what
//! E2B's base image offers a user ([`TOOLS`]: sudo, git, curl, wget, pip and venv, Node.js with
//! npm, procps, unzip), about 110 s and 400 MiB more, most of it npm's Debian dependencies
//! (debootstrap's own resolver cannot install those: it knows no virtual packages). Into it go
//! the static envd, our PID 1 (`/sbin/init`, a bash script: mount the API filesystems, keep
//! envd running, reap orphans), a `user` account (uid 1000) with passwordless sudo and the
//! hostname files; then it becomes an ext4 image with 1 GiB of free space (a sparse file), with
//! a `manifest.json` listing every Debian package and version.
//!
//! The image is cached by the hash of its inputs (envd, the package list, this builder's
//! scripts), not by the mirror's state: a cached image stays until an input changes, and its
//! manifest says what it was built from. A build happens in a temporary directory that is
//! renamed into place, so a failed or killed build leaves no artifact; stale temporary
//! directories of dead builders are swept (after unmounting anything debootstrap left mounted
//! in them) before the next build.
//!
//! A variant ([`DebianExtras`]) is the same image with more Debian packages (installed in the
//! same host-side `apt-get` run) and more files (e.g. the code interpreter's static binary);
//! both are part of its cache key, so it is cached next to the plain image.
//!
//! Building takes minutes, so it reports its phases (debootstrap, installing envd, mkfs, the
//! manifest) and debootstrap's output lines as [`Progress`] events.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cache::{CacheKey, cached, sha256_file, write_manifest};
use crate::progress::{Progress, Reporter};
use crate::rootfs::{Component, Rootfs, RootfsManifest, make_ext4, tree_size};
use crate::{ENVD_PORT, ImageError, deb_version, run};

/// Bumped whenever what this module puts into the image changes (part of the cache key).
const SCRIPT_VERSION: &str = "debian-rootfs-v2";
/// The Debian release of the default template.
const SUITE: &str = "bookworm";
/// Packages added to debootstrap's minbase set.
const PACKAGES: [&str; 4] = ["bash", "coreutils", "python3", "ca-certificates"];
/// What user code expects of E2B's base image, installed with apt (without recommends) after
/// debootstrap.
pub const TOOLS: [&str; 10] = [
    "sudo",
    "git",
    "curl",
    "wget",
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "procps",
    "unzip",
];
/// `user` may do anything as root without a password, as in E2B's base image.
const SUDOERS: &str = "user ALL=(ALL:ALL) NOPASSWD: ALL\n";
/// Used when neither the caller nor the host's apt sources name a mirror.
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Free space in the image beyond its content; the file is sparse, so this costs no disk
/// until written (and sandboxes write to their own qcow2 overlays anyway).
const FREE_SPACE: u64 = 1 << 30;
/// How many of debootstrap's last output lines a failure reports.
const ERROR_TAIL_LINES: usize = 30;

/// PID 1 after the initramfs' `switch_root`. Minbase has no init system; this does what the
/// small image's busybox init does. Bash reaps every child on SIGCHLD (`waitpid(-1)`), so
/// orphans reparented to PID 1 do not pile up as zombies, and `wait $!` still waits for envd
/// alone. PID 1 ignores signals it has no handler for, hence the trap (QEMU runs with
/// `-no-reboot`, so powering off ends the VM).
fn init_script() -> String {
    format!(
        r#"#!/bin/bash
# Wrenn guest init (Debian template): mounts what envd needs, then keeps envd running.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mkdir -p /run/lock && chmod 1777 /run/lock
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
# devtmpfs lacks these; bash process substitution and many scripts need /dev/fd.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
echo wrenn > /proc/sys/kernel/hostname
ip link set lo up 2>/dev/null || true
trap 'sync; echo o > /proc/sysrq-trigger' TERM INT
while :; do
    /usr/bin/envd --in-sandbox --listen 0.0.0.0:{ENVD_PORT} --metadata-url http://169.254.169.254/ &
    wait $!
    echo "wrenn-init: envd exited with status $?, restarting" >/dev/console
    sleep 1
done
"#
    )
}
const HOSTS: &str =
    "127.0.0.1\tlocalhost\n127.0.1.1\twrenn\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// The guest's resolver is its gateway, the slot's tap address, where the host runs one
/// resolver per slot that applies the sandbox's egress policy to names (the slot redirects
/// queries to any other server there too).
const RESOLV_CONF: &str = "# Wrenn: the host's resolver for this sandbox, at its gateway.\nnameserver 169.254.0.22\noptions timeout:2 attempts:2\n";

/// Inputs of the Debian template image.
#[derive(Debug, Clone)]
pub struct DebianImageInputs {
    /// The static envd binary.
    pub envd: PathBuf,
    /// The Debian mirror; `None`: `WRENN_DEBIAN_MIRROR`, else the host's apt sources, else
    /// `deb.debian.org`. Not part of the cache key.
    pub mirror: Option<String>,
    /// What a variant adds to the plain image (empty for `base`).
    pub extras: DebianExtras,
}

impl DebianImageInputs {
    /// Defaults (the host's mirror, no extras) with the given envd.
    pub fn new(envd: PathBuf) -> Self {
        Self {
            envd,
            mirror: None,
            extras: DebianExtras::default(),
        }
    }
}

/// What a variant of the Debian image adds: packages (installed with [`TOOLS`], host-side,
/// so no guest ever reaches a package registry) and files. Part of the cache key.
#[derive(Debug, Clone, Default)]
pub struct DebianExtras {
    /// What the variant is, for progress messages (e.g. `code interpreter`).
    pub label: String,
    /// More Debian packages.
    pub packages: Vec<String>,
    /// More files, e.g. a static binary.
    pub files: Vec<ExtraFile>,
}

/// A host file copied into a variant image.
#[derive(Debug, Clone)]
pub struct ExtraFile {
    /// The file on the host.
    pub source: PathBuf,
    /// Where it goes, relative to the image's root (e.g. `usr/local/bin/wrenn-interpreter`).
    pub dest: String,
    /// Its mode.
    pub mode: u32,
}

/// What the code-interpreter image adds to `base`: the libraries E2B's code-interpreter
/// template offers for data work (Debian's builds, so no pip in a guest), and PIL, which
/// matplotlib's PNG output needs.
pub const CODE_INTERPRETER_PACKAGES: [&str; 4] = [
    "python3-numpy",
    "python3-pandas",
    "python3-matplotlib",
    "python3-pil",
];
/// Where the code interpreter's server goes in its image.
pub const INTERPRETER_PATH: &str = "/usr/local/bin/wrenn-interpreter";

impl DebianExtras {
    /// The code-interpreter variant: [`CODE_INTERPRETER_PACKAGES`] and the static
    /// `wrenn-interpreter` binary at [`INTERPRETER_PATH`].
    pub fn code_interpreter(interpreter: PathBuf) -> Self {
        Self {
            label: "code interpreter".into(),
            packages: CODE_INTERPRETER_PACKAGES.map(String::from).to_vec(),
            files: vec![ExtraFile {
                source: interpreter,
                dest: INTERPRETER_PATH.trim_start_matches('/').into(),
                mode: 0o755,
            }],
        }
    }

    fn is_empty(&self) -> bool {
        self.packages.is_empty() && self.files.is_empty()
    }

    /// The image's name in messages.
    fn name(&self) -> String {
        if self.label.is_empty() {
            format!("Debian {SUITE} template image")
        } else {
            format!("Debian {SUITE} {} image", self.label)
        }
    }
}

/// What the Debian image was built from, beyond the common rootfs manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebianManifest {
    /// Key, kind (`debian`), envd and debootstrap, size, e2fsprogs.
    #[serde(flatten)]
    pub common: RootfsManifest,
    /// The builder's script version (part of the key).
    pub script_version: String,
    /// The release (`bookworm`).
    pub suite: String,
    /// `/etc/debian_version` of the image, e.g. `12.11`.
    pub debian_version: String,
    /// `debootstrap` on the build host.
    pub debootstrap_version: String,
    /// The mirror the packages came from.
    pub mirror: String,
    /// The packages asked for beyond minbase.
    pub include: Vec<String>,
    /// Every installed package with its version.
    pub packages: Vec<Package>,
    /// Bytes of files in the root tree before it became ext4.
    pub content_bytes: u64,
    /// Wall time of the build.
    pub build_seconds: f64,
    /// When it was built (RFC 3339, UTC).
    pub built_at: String,
}

/// One Debian package in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// A built Debian template image.
#[derive(Debug, Clone)]
pub struct DebianRootfs {
    /// The image and its common manifest, as for any root filesystem.
    pub rootfs: Rootfs,
    /// The full manifest.
    pub manifest: DebianManifest,
}

/// Builds (or finds in `cache`) the Debian template image. Blocking, and minutes long on a
/// miss: call it from a blocking thread. Needs root (debootstrap chroots and mounts). A miss
/// reports its phases to `progress`; a hit reports nothing.
pub fn build_debian_rootfs(
    cache: &Path,
    inputs: &DebianImageInputs,
    progress: &mut dyn FnMut(Progress),
) -> Result<DebianRootfs, ImageError> {
    let envd_sha256 = sha256_file(&inputs.envd)?;
    let extras = &inputs.extras;
    let file_sha256 = extras
        .files
        .iter()
        .map(|f| sha256_file(&f.source))
        .collect::<Result<Vec<_>, _>>()?;
    let key = cache_key(extras, &envd_sha256, &file_sha256);
    let artifact = cache.join(format!("rootfs-debian-{key}"));
    if !artifact.join("manifest.json").is_file() {
        let mut report = Reporter::new(progress);
        sweep_stale(cache);
        let started = Instant::now();
        let name = extras.name();
        report.note(format!(
            "building the {name} (a few minutes; cached afterwards)"
        ));
        let sums = Sums {
            envd: &envd_sha256,
            files: &file_sha256,
        };
        cached(cache, "rootfs-debian", &key, |tmp| {
            build(tmp, inputs, &key, sums, &mut report, started)
        })?;
        report.note(format!(
            "{name} ready in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
    }
    let manifest_path = artifact.join("manifest.json");
    let text =
        std::fs::read_to_string(&manifest_path).map_err(ImageError::io("read", &manifest_path))?;
    let manifest: DebianManifest = serde_json::from_str(&text)?;
    Ok(DebianRootfs {
        rootfs: Rootfs {
            path: artifact.join("rootfs.ext4"),
            manifest: manifest.common.clone(),
        },
        manifest,
    })
}

/// The image's cache key: everything this module puts in, and a variant's extras.
fn cache_key(extras: &DebianExtras, envd_sha256: &str, file_sha256: &[String]) -> String {
    let mut key = CacheKey::default();
    key.text("format", SCRIPT_VERSION)
        .text("suite", SUITE)
        .text("include", &PACKAGES.join(","))
        .text("tools", &TOOLS.join(","))
        .text("sudoers", SUDOERS)
        .text("init", &init_script())
        .text("hosts", HOSTS)
        .text("resolv", RESOLV_CONF)
        .text("envd", envd_sha256);
    // Only a variant adds these: the plain image keeps the key it always had.
    if !extras.is_empty() {
        key.text("extra-packages", &extras.packages.join(","));
        for (f, sha) in extras.files.iter().zip(file_sha256) {
            key.text("extra-file", &format!("{}:{:o}:{sha}", f.dest, f.mode));
        }
    }
    key.finish()
}

/// The sha256 of the binaries going in, for the manifest.
#[derive(Clone, Copy)]
struct Sums<'a> {
    envd: &'a str,
    /// One per extra file, in order.
    files: &'a [String],
}

fn build(
    tmp: &Path,
    inputs: &DebianImageInputs,
    key: &str,
    sums: Sums<'_>,
    report: &mut Reporter<'_>,
    started: Instant,
) -> Result<(), ImageError> {
    let root = tmp.join("root");
    // Dropped before `cached` removes `tmp`: nothing mounted may be under it then.
    let unmount = UnmountGuard(root.clone());
    let mirror = inputs
        .mirror
        .clone()
        .or_else(|| std::env::var("WRENN_DEBIAN_MIRROR").ok())
        .unwrap_or_else(host_mirror);

    report.phase("debootstrap", |log| {
        debootstrap(&root, &mirror, log)?;
        Ok(((), format!("{SUITE} from {mirror}")))
    })?;

    let packages: Vec<&str> = TOOLS
        .iter()
        .copied()
        .chain(inputs.extras.packages.iter().map(String::as_str))
        .collect();
    report.phase("apt-get install", |log| {
        install_tools(&root, &packages, log)?;
        Ok(((), packages.join(" ")))
    })?;

    let (packages, debian_version) = report.phase("installing envd and init", |_| {
        install(&root, &inputs.envd)?;
        for f in &inputs.extras.files {
            put_file(&root, &f.dest, &read(&f.source)?, f.mode)?;
        }
        let packages = installed_packages(&root)?;
        let debian_version = std::fs::read_to_string(root.join("etc/debian_version"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let detail = format!("Debian {debian_version}, {} packages", packages.len());
        Ok(((packages, debian_version), detail))
    })?;

    let image = tmp.join("rootfs.ext4");
    let (content_bytes, size) = report.phase("mkfs.ext4", |log| {
        let content_bytes = tree_size(&root);
        log(&format!(
            "mkfs.ext4 -d ({} MiB of files)",
            content_bytes >> 20
        ));
        let t = Instant::now();
        let size = make_ext4(&root, &image, FREE_SPACE)?;
        let mkfs_secs = t.elapsed().as_secs_f64();
        log("removing the staging tree");
        drop(unmount);
        let t = Instant::now();
        std::fs::remove_dir_all(&root).map_err(ImageError::io("remove", &root))?;
        let remove_secs = t.elapsed().as_secs_f64();
        let detail = format!(
            "{} MiB content, {} MiB sparse image; mkfs {mkfs_secs:.1} s, cleanup {remove_secs:.1} s",
            content_bytes >> 20,
            size >> 20
        );
        Ok(((content_bytes, size), detail))
    })?;

    report.phase("manifest", |_| {
        let tree = Tree {
            debian_version,
            packages,
            content_bytes,
            size,
        };
        let manifest = manifest(inputs, key, sums, mirror, tree, started);
        write_manifest(tmp, &manifest)?;
        Ok(((), "written".into()))
    })
}

/// What the build made, for the manifest.
struct Tree {
    debian_version: String,
    packages: Vec<Package>,
    content_bytes: u64,
    size: u64,
}

fn manifest(
    inputs: &DebianImageInputs,
    key: &str,
    sums: Sums<'_>,
    mirror: String,
    tree: Tree,
    started: Instant,
) -> DebianManifest {
    let envd_version = run(Command::new(&inputs.envd).arg("--version"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let debootstrap_version = deb_version("debootstrap");
    let component = |name: &str, version: &str, sha256: Option<&str>| Component {
        name: name.into(),
        version: version.into(),
        sha256: sha256.map(str::to_owned),
    };
    let mut components = vec![
        component("envd", &envd_version, Some(sums.envd)),
        component("debootstrap", &debootstrap_version, None),
        component("debian", &tree.debian_version, None),
    ];
    for (f, sha) in inputs.extras.files.iter().zip(sums.files) {
        components.push(component(&f.dest, "", Some(sha)));
    }
    DebianManifest {
        common: RootfsManifest {
            key: key.to_owned(),
            kind: "debian".into(),
            components,
            size: tree.size,
            e2fsprogs_version: deb_version("e2fsprogs"),
        },
        script_version: SCRIPT_VERSION.into(),
        suite: SUITE.into(),
        debian_version: tree.debian_version,
        debootstrap_version,
        mirror,
        include: PACKAGES
            .iter()
            .chain(&TOOLS)
            .map(|p| p.to_string())
            .chain(inputs.extras.packages.iter().cloned())
            .collect(),
        packages: tree.packages,
        content_bytes: tree.content_bytes,
        build_seconds: started.elapsed().as_secs_f64(),
        built_at: now_rfc3339(),
    }
}

/// Runs debootstrap into `root`, streaming its output lines to `log`.
fn debootstrap(root: &Path, mirror: &str, log: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--variant=minbase",
        &format!("--include={}", PACKAGES.join(",")),
        SUITE,
    ])
    .arg(root)
    .arg(mirror);
    // debootstrap keeps its detailed log inside the target; its end says what failed.
    run_streaming(cmd, log, Some(&root.join("debootstrap/debootstrap.log")))
}

/// `apt-get install` of `packages` ([`TOOLS`] and a variant's) inside the tree, with `/proc` mounted for the packages'
/// scripts (unmounted after, and by the build's guard if this fails halfway). The tree's apt
/// sources are the ones debootstrap wrote (its mirror); its `resolv.conf` is still the host's.
fn install_tools(
    root: &Path,
    packages: &[&str],
    log: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let proc = root.join("proc");
    nix::mount::mount(
        Some("proc"),
        &proc,
        Some("proc"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| ImageError::Tool {
        tool: format!("mount proc on {}", proc.display()),
        stderr: e.to_string(),
    })?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("chroot");
        cmd.arg(root)
            .arg("apt-get")
            .args(["-q", "-y", "-o", "Dpkg::Use-Pty=0"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8");
        cmd
    };
    let result = run_streaming(apt(&["update"]), log, None).and_then(|()| {
        let mut install = vec!["install", "--no-install-recommends"];
        install.extend(packages);
        run_streaming(apt(&install), log, None)
    });
    let unmounted = nix::mount::umount2(&proc, nix::mount::MntFlags::MNT_DETACH);
    result?;
    unmounted.map_err(|e| ImageError::Tool {
        tool: format!("umount {}", proc.display()),
        stderr: e.to_string(),
    })
}

/// Runs `cmd`, streaming its output lines (stdout and stderr, in order) to `log`; a failure
/// reports the last lines, and those of `detail_log` when the tool keeps one.
fn run_streaming(
    mut cmd: Command,
    log: &mut dyn FnMut(&str),
    detail_log: Option<&Path>,
) -> Result<(), ImageError> {
    let tool = format!("{cmd:?}");
    let fail = |stderr: String| ImageError::Tool {
        tool: tool.clone(),
        stderr,
    };
    // One pipe for both streams keeps the lines in order.
    let (reader, writer) = std::io::pipe().map_err(|e| fail(format!("pipe: {e}")))?;
    let writer2 = writer.try_clone().map_err(|e| fail(format!("pipe: {e}")))?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = cmd.spawn().map_err(|e| {
        fail(if e.kind() == std::io::ErrorKind::NotFound {
            "not installed (run .ci/install-runtime-deps.sh)".into()
        } else {
            e.to_string()
        })
    })?;
    // The Command still holds the write ends; without dropping it the reader never sees EOF.
    drop(cmd);
    let mut tail = std::collections::VecDeque::with_capacity(ERROR_TAIL_LINES);
    for line in BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        tracing::debug!("{line}");
        log(line);
        if tail.len() == ERROR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        let mut log = Vec::from(tail).join("\n");
        if let Some(text) = detail_log.and_then(|p| std::fs::read_to_string(p).ok()) {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(ERROR_TAIL_LINES);
            log.push_str("\n--- detailed log ---\n");
            log.push_str(&lines[from..].join("\n"));
        }
        return Err(fail(format!("{status}:\n{log}")));
    }
    Ok(())
}

/// Puts envd, init, the user and the host files into the debootstrapped tree.
fn install(root: &Path, envd: &Path) -> Result<(), ImageError> {
    put_file(root, "usr/bin/envd", &read(envd)?, 0o755)?;
    // `/sbin` is a relative symlink to `usr/sbin` (merged /usr), so this stays in the tree.
    put_file(root, "usr/sbin/init", init_script().as_bytes(), 0o755)?;
    put_file(root, "etc/hostname", b"wrenn\n", 0o644)?;
    put_file(root, "etc/hosts", HOSTS.as_bytes(), 0o644)?;
    put_file(root, "etc/resolv.conf", RESOLV_CONF.as_bytes(), 0o644)?;
    // useradd --root chroots into the tree: the image's own passwd, shadow and skel.
    run(Command::new("useradd").arg("--root").arg(root).args([
        "--uid",
        "1000",
        "--user-group",
        "--create-home",
        "--home-dir",
        "/home/user",
        "--shell",
        "/bin/bash",
        "user",
    ]))?;
    put_file(root, "etc/sudoers.d/user", SUDOERS.as_bytes(), 0o440)?;
    // Apt's caches come back with `apt-get update`; the image should not carry them.
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "var/cache/apt",
    ] {
        clear_files(&root.join(dir))?;
    }
    for log in [
        "var/log/bootstrap.log",
        "var/log/dpkg.log",
        "var/log/alternatives.log",
    ] {
        let _ = std::fs::remove_file(root.join(log));
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(ImageError::io("read", path))
}

/// Writes a file in the tree, replacing whatever is there without following it: debootstrap
/// may leave a symlink (e.g. `/etc/resolv.conf`), and an absolute one would point at the
/// host's file.
fn put_file(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), ImageError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = root.join(rel);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ImageError::io("remove", &path)(e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(ImageError::io("create", &path))?;
    file.write_all(data)
        .map_err(ImageError::io("write", &path))?;
    // The umask may have cut the mode at creation.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(ImageError::io("chmod", &path))
}

/// Removes the regular files directly in `dir` (apt keeps its lock and `partial/` there).
fn clear_files(dir: &Path) -> Result<(), ImageError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) && entry.file_name() != "lock" {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(ImageError::io("remove", &path))?;
        }
    }
    Ok(())
}

/// Every package installed in the tree, from its own dpkg database.
fn installed_packages(root: &Path) -> Result<Vec<Package>, ImageError> {
    let out = run(Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${Package}\t${Version}\n"]))?;
    let mut packages: Vec<Package> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(name, version)| Package {
            name: name.to_owned(),
            version: version.to_owned(),
        })
        .collect();
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(packages)
}

/// The Debian mirror the host's apt uses for `bookworm`, like `.ci/install-runtime-deps.sh`
/// finds it: a deb822 `.sources` stanza first, then `sources.list`, else `deb.debian.org`.
fn host_mirror() -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| mirror_from_deb822(&text, SUITE))
        .or_else(|| {
            let text = std::fs::read_to_string("/etc/apt/sources.list").ok()?;
            mirror_from_list(&text, SUITE)
        })
        .unwrap_or_else(|| FALLBACK_MIRROR.into())
}

/// The first URI of a `deb` stanza whose Suites include exactly `suite`.
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines.split(|l| l.trim().is_empty()).find_map(|stanza| {
        let field = |name: &str| {
            stanza.iter().filter(|l| !l.starts_with('#')).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let is_deb = field("Types")?.split_whitespace().any(|t| t == "deb");
        let has_suite = field("Suites")?.split_whitespace().any(|s| s == suite);
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        (is_deb && has_suite && enabled)
            .then(|| field("URIs")?.split_whitespace().next().map(str::to_owned))?
    })
}

/// The URI of the first `deb` line for `suite` (options in brackets skipped).
fn mirror_from_list(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']')?.1.trim_start(),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite).then(|| uri.to_owned())
    })
}

/// Lazily unmounts everything under a path when dropped (debootstrap mounts `/proc` and
/// `/sys` in the target and may leave them on failure; removing the tree would then walk
/// into them).
struct UnmountGuard(PathBuf);

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        unmount_under(&self.0);
    }
}

/// Detaches every mount at or below `dir`, deepest first; true when none is left.
fn unmount_under(dir: &Path) -> bool {
    let mounts = || -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut found: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
            .filter(|p| p.starts_with(dir))
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        found
    };
    for mount in mounts() {
        if let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %mount.display(), "unmounting a leftover mount: {e}");
        }
    }
    mounts().is_empty()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if bytes[i] == b'\\'
            && let Some(d) = octal
        {
            out.push(
                d.iter()
                    .fold(0u8, |v, b| v.wrapping_mul(8).wrapping_add(b - b'0')),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes temporary build directories of Debian builders that no longer run (a killed
/// build; `cached` only clears its own pid's).
fn sweep_stale(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".rootfs-debian-")
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(|r| r.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        if unmount_under(&path) {
            tracing::info!(path = %path.display(), "removing a dead build's directory");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_sources() {
        let text = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        let security_only = "Types: deb\nURIs: http://s.example/ds\nSuites: bookworm-security\n";
        assert_eq!(mirror_from_deb822(security_only, "bookworm"), None);
        let src_only = "Types: deb-src\nURIs: http://s.example/d\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(src_only, "bookworm"), None);
    }

    #[test]
    fn mirror_from_sources_list() {
        let text = "# deb http://old.example/debian bookworm main\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_list(text, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            mirror_from_list("deb http://m.example/d bookworm-updates main\n", "bookworm"),
            None
        );
    }

    #[test]
    fn a_variant_has_its_own_key_and_base_keeps_its_own() {
        let base = cache_key(&DebianExtras::default(), "e", &[]);
        // An empty label changes nothing: only packages and files make a variant.
        let labelled = DebianExtras {
            label: "x".into(),
            ..DebianExtras::default()
        };
        assert_eq!(cache_key(&labelled, "e", &[]), base);
        let ci = DebianExtras::code_interpreter("/bin/true".into());
        let one = cache_key(&ci, "e", &["f1".into()]);
        assert_ne!(one, base);
        assert_ne!(
            cache_key(&ci, "e", &["f2".into()]),
            one,
            "the binary is in the key"
        );
        let fewer = DebianExtras {
            packages: vec!["python3-numpy".into()],
            ..ci.clone()
        };
        assert_ne!(
            cache_key(&fewer, "e", &["f1".into()]),
            one,
            "packages are in the key"
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/x\011y"), "/x\ty");
    }
}
