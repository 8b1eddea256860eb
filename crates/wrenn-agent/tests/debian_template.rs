//! The default Debian template with a real debootstrap and a real QEMU guest: build the image
//! (cached across runs in the image cache), find it again at once, cold-boot it in a slot,
//! reach envd, run python3 as the `user` account through envd, and leave nothing behind.
//! Also: a build that fails (an unreachable mirror) leaves no artifact and nothing mounted.
//!
//! Gated by `WRENN_VM_TESTS=1` (needs root, debootstrap, QEMU, the extracted kernel, a static
//! envd and a Debian mirror: `.ci/install-runtime-deps.sh`, then `scripts/build-guest-envd.sh`).
//! The image stays in `WRENN_IMAGE_CACHE` (default `/var/cache/wrenn/images`): it is a cache.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::RunOpts;
use wrenn_agent::accel::Accel;
use wrenn_agent::envd::EnvdClient;
use wrenn_agent::sandbox::SandboxNet as _;
use wrenn_agent::vm::{Launch, Memory, Vm, create_overlay};
use wrenn_image::{DebianImageInputs, ENVD_PORT, Kernel, Progress};

/// Runs a command that must succeed as `user` through envd; returns its trimmed stdout.
async fn run_ok(base: &str, user: &str, cmd: &str) -> String {
    support::run_ok_with(
        base,
        RunOpts {
            user,
            ..RunOpts::default()
        },
        cmd,
    )
    .await
}

/// Shows a build's progress in the test log.
fn print_progress(p: Progress) {
    eprintln!("{p:?}");
}

/// Temporary build directories of this process left in a cache.
fn build_leftovers(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".rootfs-debian-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_template_builds_boots_and_runs_python() {
    if !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=info,wrenn_image=info");
    // Declared first so it is dropped last, after the VM and the slot.
    let work = support::work_dir("wrenn-debian-test");
    let work_path = work.path().to_owned();

    let envd = support::envd_binary();
    assert!(envd.is_file(), "no static envd at {}", envd.display());
    let cache = wrenn_image::default_cache_dir();
    let inputs = DebianImageInputs::new(envd.clone());

    let t = Instant::now();
    let built = {
        let (cache, inputs) = (cache.clone(), inputs.clone());
        tokio::task::spawn_blocking(move || {
            wrenn_image::build_debian_rootfs(&cache, &inputs, &mut print_progress)
        })
        .await
        .unwrap()
        .expect("build the Debian image")
    };
    let first = t.elapsed();
    let t = Instant::now();
    let again = {
        let (cache, inputs) = (cache.clone(), inputs.clone());
        tokio::task::spawn_blocking(move || {
            wrenn_image::build_debian_rootfs(&cache, &inputs, &mut |p| {
                panic!("a cache hit reported {p:?}")
            })
        })
        .await
        .unwrap()
        .unwrap()
    };
    let cached = t.elapsed();
    assert_eq!(again.rootfs.path, built.rootfs.path);
    assert!(cached < Duration::from_secs(2), "cache hit took {cached:?}");
    assert!(
        build_leftovers(&cache).is_empty(),
        "build dirs left in {}",
        cache.display()
    );

    // The manifest records what went in.
    let m = &built.manifest;
    assert_eq!(m.common.kind, "debian");
    assert_eq!(m.suite, "bookworm");
    assert!(m.debian_version.starts_with("12"), "{}", m.debian_version);
    let tools = wrenn_image::TOOLS;
    for want in ["bash", "coreutils", "python3", "ca-certificates", "libc6"]
        .into_iter()
        .chain(tools)
    {
        assert!(
            m.packages
                .iter()
                .any(|p| p.name == want && !p.version.is_empty()),
            "package {want} not in the manifest"
        );
    }
    let envd_sha = wrenn_sha256(&envd);
    assert!(
        m.common
            .components
            .iter()
            .any(|c| c.name == "envd" && c.sha256.as_deref() == Some(envd_sha.as_str())),
        "envd sha256 not recorded"
    );
    let on_disk = std::fs::metadata(&built.rootfs.path).unwrap();
    assert_eq!(on_disk.len(), m.common.size);
    let allocated = {
        use std::os::unix::fs::MetadataExt as _;
        on_disk.blocks() * 512
    };
    eprintln!(
        "debian image: first call {first:?} (manifest build_seconds {:.1}), cached call {cached:?}; \
         Debian {}, {} packages, content {} MiB, image {} MiB apparent / {} MiB allocated",
        m.build_seconds,
        m.debian_version,
        m.packages.len(),
        m.content_bytes >> 20,
        m.common.size >> 20,
        allocated >> 20
    );

    // Cold boot.
    let accel = Accel::detect().unwrap();
    let kernel = Kernel::find(None).expect("guest kernel");
    let initramfs =
        wrenn_image::build_initramfs(&cache, &kernel, Path::new("/bin/busybox")).unwrap();
    let slot = support::new_slot().await;
    let client = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));
    let spec = support::vm_spec(accel, &kernel, &initramfs.path);
    let vm_dir = work_path.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let disk = vm_dir.join("rootfs.qcow2");
    create_overlay(&built.rootfs.path, "raw", &disk)
        .await
        .unwrap();
    let t = Instant::now();
    let vm = Vm::launch(Launch {
        spec,
        dir: vm_dir.clone(),
        disk,
        memory: Memory::Shared(work_path.join("memory")),
        net: Some(slot.attach()),
        incoming: None,
        extra_disks: vec![],
    })
    .await
    .expect("launch");
    let pid = vm.pid();
    if let Err(e) = client.wait_healthy(support::COLD_BOOT_DEADLINE).await {
        panic!("cold boot: {e}\nconsole:\n{}", vm.console_text().await);
    }
    let cold_boot = t.elapsed();
    eprintln!("cold boot to envd /health: {cold_boot:?} ({accel})");

    let base = client.base_url();
    let t = Instant::now();
    let out = run_ok(&base, "user", "python3 -c 'print(6*7)'").await;
    let python = t.elapsed();
    assert_eq!(out, "42");
    let os = run_ok(&base, "user", "cat /etc/os-release").await;
    assert!(os.contains("VERSION_CODENAME=bookworm"), "{os}");
    let who = run_ok(
        &base,
        "user",
        "echo \"$(id -u) $(id -un) $HOME $SHELL $(cat /proc/sys/kernel/hostname) $(cat /proc/1/comm)\"",
    )
    .await;
    assert_eq!(who, "1000 user /home/user /bin/bash wrenn init");
    // HTTPS clients need the CA bundle; /dev/fd is needed for process substitution.
    run_ok(
        &base,
        "user",
        "test -s /etc/ssl/certs/ca-certificates.crt && cat <(echo ok)",
    )
    .await;
    // What E2B's base image gives user code: passwordless sudo and the usual tools.
    assert_eq!(run_ok(&base, "user", "sudo -n whoami").await, "root");
    // Each tool's first start is slow under TCG (measured on 2 cores: pip 17 s, node 10 s,
    // npm 69 s, a venv with ensurepip 123 s, so the venv here is made without pip), hence a
    // long limit; the time each took is shown.
    let versions = support::run_ok_with(
        &base,
        RunOpts {
            user: "user",
            timeout: Duration::from_secs(600),
            ..RunOpts::default()
        },
        "t() { s=$(date +%s%N); \"$@\"; r=$?; echo \"took $(( ($(date +%s%N)-s)/1000000 )) ms: $*\" >&2; return $r; }; \
         t git --version && t curl --version | head -1 && t wget --version | head -1 && \
         t pip --version && t python3 -m venv --without-pip /tmp/venv && t /tmp/venv/bin/python -c 'print(1)' && \
         t node -e 'console.log(6*7)' && t npm --version && ps -p 1 -o comm= | xargs && unzip -v | head -1",
    )
    .await;
    for want in [
        "git version",
        "curl ",
        "GNU Wget",
        "pip ",
        "\n1\n",
        "\n42\n",
        "\ninit\n",
        "UnZip",
    ] {
        assert!(versions.contains(want), "no {want:?} in {versions}");
    }
    let mounts = run_ok(&base, "root", "cut -d' ' -f2,3 /proc/mounts").await;
    for want in [
        "/ ext4",
        "/proc proc",
        "/sys sysfs",
        "/dev devtmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
        "/tmp tmpfs",
        "/run tmpfs",
        "/sys/fs/cgroup cgroup2",
    ] {
        assert!(mounts.lines().any(|l| l == want), "no `{want}` in {mounts}");
    }
    // PID 1 reaps orphans: a double-forked child that exits must not stay a zombie.
    let zombies = run_ok(
        &base,
        "root",
        "setsid bash -c 'sleep 0.2 & exit 0'; sleep 2; \
         for s in /proc/[0-9]*/stat; do read -r l < $s 2>/dev/null && echo \"$l\"; done \
         | sed 's/.*) //' | awk '$1 == \"Z\"' | wc -l",
    )
    .await;
    assert_eq!(zombies, "0", "zombie processes in the guest");
    eprintln!("python3 via envd (first command): {python:?}");

    // Cleanup: VM, slot, work dir.
    vm.kill().await.unwrap();
    assert!(!support::pid_alive(pid), "QEMU still running");
    assert!(!vm_dir.exists(), "VM dir left behind");
    let netns = slot.netns().to_owned();
    drop(slot);
    assert!(!Path::new("/run/netns").join(&netns).exists(), "netns left");
    std::fs::remove_file(work_path.join("memory")).unwrap();
    let left = support::files_under(&work_path);
    assert!(left.is_empty(), "files left: {left:?}");
    work.close().unwrap();
    eprintln!(
        "SUMMARY debian first_build_call_s={:.1} manifest_build_s={:.1} cached_call_ms={} \
         image_apparent_mib={} image_allocated_mib={} content_mib={} cold_boot_to_health_ms={} accel={accel}",
        first.as_secs_f64(),
        m.build_seconds,
        cached.as_millis(),
        m.common.size >> 20,
        allocated >> 20,
        m.content_bytes >> 20,
        cold_boot.as_millis()
    );
}

/// A build that fails (the mirror refuses connections) returns the tool's error and leaves no
/// artifact, no temporary directory and nothing mounted; it also sweeps a dead builder's
/// temporary directory, unmounting what was left mounted in it.
#[test]
fn failed_debian_build_leaves_nothing() {
    if !support::enabled() {
        return;
    }
    let cache = support::work_dir("wrenn-debian-fail");
    // A killed earlier build: its temporary directory, with a mount debootstrap left in it.
    // Pid 999999999 is above any pid_max, so that builder is surely gone.
    let stale = cache
        .path()
        .join(".rootfs-debian-0123.999999999.tmp/root/proc");
    std::fs::create_dir_all(&stale).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "wrenn-test", stale.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _unmount = Unmount(stale.clone());

    let envd = support::envd_binary();
    assert!(envd.is_file(), "no static envd at {}", envd.display());
    let inputs = DebianImageInputs {
        // Port 9 (discard) on loopback: nothing listens, so debootstrap fails at once.
        mirror: Some("http://127.0.0.1:9/debian".into()),
        ..DebianImageInputs::new(envd)
    };
    let mut events = Vec::new();
    let err = wrenn_image::build_debian_rootfs(cache.path(), &inputs, &mut |p| events.push(p))
        .expect_err("must fail");
    assert!(
        events.iter().any(|p| matches!(
            p,
            Progress::PhaseFailed {
                phase: "debootstrap",
                ..
            }
        )),
        "no failed phase reported: {events:?}"
    );
    let text = format!("{err}");
    eprintln!("failed build: {text}");
    assert!(text.contains("debootstrap"), "{text}");
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the cache: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(cache.path().to_str().unwrap()),
        "mounts left under the cache"
    );
    cache.close().unwrap();
}

fn wrenn_sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}
