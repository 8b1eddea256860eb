//! `envd image unpack` / `envd image finalize` and PID-1 mode's refusal, run as the built
//! binary on layer tars made here. Unpack and finalize chroot, so these need root; they skip
//! (with a note) otherwise.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ENVD: &str = env!("CARGO_BIN_EXE_envd");

/// A name no host has in /usr/bin, to show a write through `bin -> /usr/bin` stays inside.
const TOOL: &str = "wrenn-image-test-tool";

macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: envd image chroots, which needs root");
            return;
        }
    };
}

/// Builds a layer tar.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, owner: u32, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.into());
        h.set_gid(owner.into());
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    fn dir(mut self, path: &str, mode: u32, mtime: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, mtime);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn file_as(mut self, path: &str, data: &[u8], mode: u32, owner: u32, mtime: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, owner, mtime);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_as(path, data, 0o644, 0, 1_000_000_000)
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str, owner: u32) -> Self {
        let mut h = Self::header(kind, 0o777, owner, 1_200_000_000);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn node(mut self, kind: tar::EntryType, path: &str, mode: u32, dev: (u32, u32)) -> Self {
        let mut h = Self::header(kind, mode, 0, 1_300_000_000);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A file whose name goes into the header as is: the tar crate refuses to write `..`.
    fn raw_file(mut self, name: &[u8], data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, 0, 1_000_000_000);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    /// A PAX extended header (`key=value` records) for the next entry.
    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Self::header(tar::EntryType::XHeader, 0o644, 0, 0);
        h.set_size(data.len() as u64);
        self.0
            .append_data(&mut h, "PaxHeaders/x", &data[..])
            .unwrap();
        self
    }

    fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }

    fn gzip(self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&self.tar()).unwrap();
        gz.finish().unwrap()
    }
}

fn run_envd(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(ENVD)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    // A thread: a failing envd may stop reading while we write.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn unpack(root: &Path, layer: &[u8], extra: &[&str]) -> Output {
    let mut args = vec!["image", "unpack", "--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_envd(&args, layer)
}

fn assert_ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn layer1() -> Vec<u8> {
    Layer::new()
        .dir("./", 0o755, 1_000_000_000)
        .dir("etc/", 0o755, 1_000_000_000)
        .dir("etc/opq/", 0o755, 1_000_000_000)
        .file("etc/opq/old", b"old")
        .file("etc/target", b"target")
        .link(tar::EntryType::Symlink, "etc/link", "/etc/target", 0)
        .dir("usr/", 0o755, 1_000_000_000)
        .dir("usr/bin/", 0o755, 1_000_000_000)
        .link(tar::EntryType::Symlink, "bin", "/usr/bin", 0)
        .file_as("usr/bin/prog", b"#!/bin/sh\n", 0o4755, 0, 1_100_000_000)
        .link(tar::EntryType::Symlink, "usr/bin/rel", "prog", 1000)
        .link(tar::EntryType::Link, "usr/bin/hard", "usr/bin/prog", 0)
        .dir("home/u/", 0o2750, 1_400_000_000)
        .file_as("home/u/data.txt", b"secret", 0o640, 1000, 1_600_000_000)
        .node(tar::EntryType::Fifo, "run/fifo", 0o620, (0, 0))
        .node(tar::EntryType::Char, "dev/null", 0o666, (1, 3))
        .file("opt/gone.txt", b"gone")
        .file("opt/keep/a", b"a")
        .dir("dir-to-file/", 0o755, 1_000_000_000)
        .file("dir-to-file/child", b"child")
        .file(&format!("deep/{}/gnu-long-name", "n".repeat(120)), b"gnu")
        .gzip()
}

fn layer2() -> Vec<u8> {
    let pax_path = format!("deep/{}/pax-long-name", "p".repeat(150));
    Layer::new()
        .file(&format!("bin/{TOOL}"), b"tool")
        .file("opt/.wh.gone.txt", b"")
        .file("etc/opq/new", b"new")
        .file("etc/opq/.wh..wh..opq", b"")
        .file("etc/link", b"replaced")
        .raw_file(b"../escape", b"escape")
        .file("dir-to-file", b"now a file")
        .file(".wh..wh.plnk/123.456", b"aufs")
        .pax(&[
            ("path", pax_path.as_bytes()),
            ("SCHILY.xattr.user.wrenn", b"xattr value"),
            ("mtime", b"1500000000.25"),
        ])
        .file("short", b"pax")
        .tar()
}

fn mtime(path: &Path) -> i64 {
    fs::symlink_metadata(path).unwrap().mtime()
}

fn whiteouts_left(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with(".wh.") {
            found.push(entry.path());
        }
        if entry.file_type().unwrap().is_dir() {
            whiteouts_left(&entry.path(), found);
        }
    }
}

#[test]
fn unpack_applies_layers_inside_the_root() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();

    let out = assert_ok(&unpack(&root, &layer1(), &[]));
    assert!(out.starts_with("envd image unpack: "), "{out}");
    check_layer1(&root);
    let out = assert_ok(&unpack(&root, &layer2(), &[]));
    assert!(out.contains("2 whiteouts applied"), "{out}");
    check_layer2(&root);
    // `../escape` lands at the root (`/..` is `/`), not beside it.
    assert!(!tmp.path().join("escape").exists());
    assert_eq!(fs::read(root.join("escape")).unwrap(), b"escape");
    // A later layer's directory entry updates an existing directory, keeping its children.
    let layer3 = Layer::new().dir("home/u/", 0o700, 1_700_000_000).tar();
    assert_ok(&unpack(&root, &layer3, &["--compression", "none"]));
    assert_eq!(
        fs::metadata(root.join("home/u")).unwrap().mode() & 0o7777,
        0o700
    );
    assert_eq!(mtime(&root.join("home/u")), 1_700_000_000);
    assert!(root.join("home/u/data.txt").exists());
}

fn check_layer1(root: &Path) {
    // Layer 1 as written: owners, modes (setuid, setgid kept), mtimes, links, nodes.
    let data = fs::metadata(root.join("home/u/data.txt")).unwrap();
    assert_eq!(
        (data.uid(), data.gid(), data.mode() & 0o7777),
        (1000, 1000, 0o640)
    );
    assert_eq!(data.mtime(), 1_600_000_000);
    let home = fs::metadata(root.join("home/u")).unwrap();
    assert_eq!(
        (home.mode() & 0o7777, home.mtime()),
        (0o2750, 1_400_000_000)
    );
    let prog = fs::metadata(root.join("usr/bin/prog")).unwrap();
    assert_eq!(
        (prog.mode() & 0o7777, prog.mtime()),
        (0o4755, 1_100_000_000)
    );
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("/usr/bin")
    );
    assert_eq!(
        fs::read_link(root.join("usr/bin/rel")).unwrap(),
        Path::new("prog")
    );
    let rel = fs::symlink_metadata(root.join("usr/bin/rel")).unwrap();
    assert_eq!((rel.uid(), rel.mtime()), (1000, 1_200_000_000));
    let hard = fs::metadata(root.join("usr/bin/hard")).unwrap();
    assert_eq!((hard.ino(), hard.nlink()), (prog.ino(), 2));
    let fifo = fs::metadata(root.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    let null = fs::metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let gnu = root.join(format!("deep/{}/gnu-long-name", "n".repeat(120)));
    assert_eq!(fs::read(gnu).unwrap(), b"gnu");
}

fn check_layer2(root: &Path) {
    // Through the absolute symlink, but into the image's /usr/bin, never the host's.
    assert_eq!(fs::read(root.join("usr/bin").join(TOOL)).unwrap(), b"tool");
    assert!(!Path::new("/usr/bin").join(TOOL).exists());
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("/usr/bin")
    );
    // Whiteouts: one file, and an opaque directory that keeps this layer's earlier entry.
    assert!(!root.join("opt/gone.txt").exists());
    assert_eq!(fs::read(root.join("opt/keep/a")).unwrap(), b"a");
    assert_eq!(fs::read(root.join("etc/opq/new")).unwrap(), b"new");
    assert!(!root.join("etc/opq/old").exists());
    // A file replaces the symlink, not what it points to.
    let link = fs::symlink_metadata(root.join("etc/link")).unwrap();
    assert!(link.file_type().is_file());
    assert_eq!(fs::read(root.join("etc/link")).unwrap(), b"replaced");
    assert_eq!(fs::read(root.join("etc/target")).unwrap(), b"target");
    assert_eq!(fs::read(root.join("dir-to-file")).unwrap(), b"now a file");
    // PAX path and xattr records.
    let pax = root.join(format!("deep/{}/pax-long-name", "p".repeat(150)));
    assert_eq!(fs::read(&pax).unwrap(), b"pax");
    let pax_meta = fs::metadata(&pax).unwrap();
    assert_eq!(
        (pax_meta.mtime(), pax_meta.mtime_nsec()),
        (1_500_000_000, 250_000_000)
    );
    assert_eq!(
        xattr::get(&pax, "user.wrenn").unwrap().as_deref(),
        Some(&b"xattr value"[..])
    );
    assert!(!root.join("short").exists());
    let mut left = Vec::new();
    whiteouts_left(root, &mut left);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn unpack_reads_zstd_layers() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let tar = Layer::new().file("etc/os-release", b"ID=test\n").tar();
    let zstd =
        ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
    assert_ok(&unpack(tmp.path(), &zstd, &[]));
    assert_eq!(
        fs::read(tmp.path().join("etc/os-release")).unwrap(),
        b"ID=test\n"
    );
    fs::remove_dir_all(tmp.path().join("etc")).unwrap();
    assert_ok(&unpack(tmp.path(), &zstd, &["--compression", "zstd"]));
    assert!(tmp.path().join("etc/os-release").exists());
}

fn assert_fails(out: &Output, prefix: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with(prefix), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn unpack_reports_a_corrupt_archive_in_one_line() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    // Truncated inside a file's data.
    let mut tar = Layer::new().file("big.bin", &[7; 10_000]).tar();
    tar.truncate(512 + 5_000);
    let err = assert_fails(
        &unpack(tmp.path(), &tar, &[]),
        "envd image unpack: big.bin: ",
    );
    assert!(err.contains("unexpected end of archive"), "{err}");
    // A header whose checksum is wrong, after a good entry.
    let mut tar = Layer::new().file("a.txt", b"a").file("b.txt", b"b").tar();
    tar[1024] ^= 0x55;
    let err = assert_fails(
        &unpack(tmp.path(), &tar, &[]),
        "envd image unpack: read the archive after a.txt: ",
    );
    assert!(err.contains("checksum"), "{err}");
    // Gzip magic, then garbage.
    let garbage = [
        0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3,
    ];
    assert_fails(&unpack(tmp.path(), &garbage, &[]), "envd image unpack: ");
    // No such root.
    let missing = tmp.path().join("missing");
    assert_fails(
        &unpack(&missing, &tar, &[]),
        "envd image unpack: chroot into ",
    );
}

fn finalize(root: &Path) -> String {
    let out = run_envd(
        &["image", "finalize", "--root", root.to_str().unwrap()],
        b"",
    );
    assert_ok(&out)
}

fn count_lines(path: &Path, prefix: &str) -> usize {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

#[test]
fn finalize_adds_accounts_once_and_installs_init() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("bin/bash"), "").unwrap();
    let passwd = "root:x:0:0:root:/root:/bin/ash\nnobody:x:65534:65534:nobody:/:/sbin/nologin";
    fs::write(root.join("etc/passwd"), passwd).unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::os::unix::fs::symlink(
        "../run/systemd/resolve/stub-resolv.conf",
        root.join("etc/resolv.conf"),
    )
    .unwrap();
    fs::create_dir_all(root.join(".wrenn/old")).unwrap();

    let out = finalize(root);
    assert!(out.contains("/etc/passwd: user"), "{out}");
    finalize(root);

    let passwd_now = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd_now.starts_with(&format!("{passwd}\n")),
        "{passwd_now}"
    );
    assert_eq!(count_lines(&root.join("etc/passwd"), "root:"), 1);
    assert_eq!(count_lines(&root.join("etc/passwd"), "user:"), 1);
    assert!(passwd_now.contains("\nuser:x:1000:1000:user:/home/user:/bin/bash\n"));
    assert_eq!(count_lines(&root.join("etc/group"), "user:x:1000:"), 1);
    assert_eq!(count_lines(&root.join("etc/shadow"), "user:!:"), 1);
    let home = fs::metadata(root.join("home/user")).unwrap();
    assert_eq!(
        (home.uid(), home.gid(), home.mode() & 0o7777),
        (1000, 1000, 0o755)
    );

    let envd = root.join(".wrenn/envd");
    assert_eq!(fs::read(&envd).unwrap(), fs::read(ENVD).unwrap());
    assert_eq!(fs::metadata(&envd).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read_link(root.join(".wrenn/init")).unwrap(),
        Path::new("envd")
    );
    assert!(!root.join(".wrenn/old").exists());

    let resolv = root.join("etc/resolv.conf");
    assert!(fs::symlink_metadata(&resolv).unwrap().file_type().is_file());
    assert!(
        fs::read_to_string(&resolv)
            .unwrap()
            .contains("nameserver 169.254.0.22\n")
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "wrenn\n"
    );
    assert!(
        fs::read_to_string(root.join("etc/hosts"))
            .unwrap()
            .contains("127.0.1.1\twrenn\n")
    );
    for dir in ["proc", "sys", "dev", "run", "home"] {
        assert!(root.join(dir).is_dir(), "{dir}");
    }
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
}

#[test]
fn finalize_creates_accounts_in_an_empty_root() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    finalize(tmp.path());
    let passwd = fs::read_to_string(tmp.path().join("etc/passwd")).unwrap();
    assert_eq!(
        passwd,
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    );
    let group = fs::read_to_string(tmp.path().join("etc/group")).unwrap();
    assert_eq!(group, "root:x:0:\nuser:x:1000:\n");
    assert!(!tmp.path().join("etc/shadow").exists());
}

#[test]
fn init_refuses_unless_pid_1() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    std::os::unix::fs::symlink(ENVD, &init).unwrap();
    let out = Command::new(&init).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("wrenn-init: not PID 1"), "{stderr}");
}
