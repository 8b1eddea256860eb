//! The runtime milestone with real QEMU guests and real namespaces: build the small image,
//! cold-boot a template in a slot, snapshot it, restore a new VM from the snapshot with its
//! RAM mapped privately, reach envd in both, run a command, and leave nothing behind.
//!
//! Gated by `WRENN_VM_TESTS=1` (needs root, QEMU, the extracted kernel and a static envd:
//! `.ci/install-runtime-deps.sh`, then `scripts/build-guest-envd.sh`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wrenn_agent::accel::Accel;
use wrenn_agent::envd::EnvdClient;
use wrenn_agent::image::{self, ENVD_PORT, Kernel, SmallImageInputs};
use wrenn_agent::slot::{Slot, TAP_NAME};
use wrenn_agent::snapshot::{self, Snapshot};
use wrenn_agent::vm::{Launch, Memory, NetAttach, Vm, VmSpec, create_overlay};

const COLD_BOOT_DEADLINE: Duration = Duration::from_secs(60);
const RESTORE_DEADLINE: Duration = Duration::from_secs(10);

fn enabled() -> bool {
    if std::env::var("WRENN_VM_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "skipped: set WRENN_VM_TESTS=1 to run real QEMU guests (needs root, QEMU, the guest kernel, a static envd)"
    );
    false
}

fn envd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WRENN_ENVD_BIN") {
        return p.into();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    target.join("x86_64-unknown-linux-gnu/guest/envd")
}

fn console_tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(3000)..]).into_owned()
}

/// Runs `/bin/bash -l -c <cmd>` through envd's `process.Process/Start` (Connect, JSON
/// envelopes) and returns (stdout, exit code).
async fn run_command(base: &str, cmd: &str) -> (String, i64) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let msg = serde_json::json!({
        "process": { "cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": {} }
    })
    .to_string();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg.as_bytes());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .post(format!("{base}/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("authorization", format!("Basic {}", b64.encode("root:")))
        .timeout(Duration::from_secs(30))
        .body(body)
        .send()
        .await
        .expect("Start request");
    assert_eq!(resp.status(), 200, "Start status");
    let bytes = resp.bytes().await.unwrap();
    let (mut stdout, mut exit, mut rest) = (String::new(), None, &bytes[..]);
    while rest.len() >= 5 {
        let flags = rest[0];
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let v: serde_json::Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        rest = &rest[5 + len..];
        if flags & 2 != 0 {
            assert!(v.get("error").is_none(), "end-stream error: {v}");
            break;
        }
        let event = &v["event"];
        if let Some(data) = event["data"]["stdout"].as_str() {
            stdout.push_str(&String::from_utf8_lossy(&b64.decode(data).unwrap()));
        }
        if let Some(end) = event.get("end") {
            exit = Some(end["exitCode"].as_i64().unwrap_or(0));
        }
    }
    (stdout, exit.expect("no end event"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_boot_snapshot_restore_and_cleanup() {
    if !enabled() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("wrenn_agent=trace,wrenn_qmp=debug")
        .try_init();
    // Declared first so it is dropped last, after the VMs and the slot.
    let work = tempfile::Builder::new()
        .prefix("wrenn-vm-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let work_path = work.path().to_owned();

    let accel = Accel::detect().unwrap();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    if !cpuinfo.contains(" vmx")
        && !cpuinfo.contains(" svm")
        && std::env::var_os("WRENN_ACCEL").is_none()
    {
        assert_eq!(accel, Accel::Tcg, "no vmx/svm: must pick TCG");
    }

    // Images (cached by content: the second build is a lookup).
    let envd = envd_binary();
    assert!(
        envd.is_file(),
        "no static envd at {} (see this file's header)",
        envd.display()
    );
    let cache = work_path.join("images");
    let t = Instant::now();
    let kernel = Kernel::find(None).expect("guest kernel");
    let initramfs = image::build_initramfs(&cache, &kernel, Path::new("/bin/busybox")).unwrap();
    let rootfs =
        image::build_small_rootfs(&cache, &SmallImageInputs::debian(envd.clone())).unwrap();
    let build_time = t.elapsed();
    let t = Instant::now();
    let again = image::build_small_rootfs(&cache, &SmallImageInputs::debian(envd)).unwrap();
    assert_eq!(again.path, rootfs.path);
    assert!(
        t.elapsed() < build_time,
        "second build should hit the cache"
    );
    assert_eq!(initramfs.manifest.kernel.release, kernel.release);
    assert!(
        rootfs
            .manifest
            .components
            .iter()
            .any(|c| c.name == "envd" && c.sha256.is_some())
    );
    eprintln!(
        "images built in {build_time:?}: kernel {} ({}), rootfs {} bytes",
        kernel.release, kernel.package_version, rootfs.manifest.size
    );

    let slot_index = 4000 + std::process::id() % 4000;
    let slot = Slot::create(slot_index).expect("slot");
    let net = NetAttach {
        netns: slot.netns_path(),
        tap: TAP_NAME.into(),
    };
    let client = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));

    // Cold boot of the template, RAM shared into the template's memory file.
    let spec = VmSpec {
        accel,
        kernel: kernel.vmlinuz.clone(),
        initramfs: initramfs.path.clone(),
        cmdline: VmSpec::default_cmdline(accel),
        memory_mib: 512,
        vcpus: 1,
    };
    let template_dir = work_path.join("template");
    std::fs::create_dir_all(&template_dir).unwrap();
    let boot_dir = work_path.join("vms/template");
    std::fs::create_dir_all(&boot_dir).unwrap();
    let boot_disk = boot_dir.join("rootfs.qcow2");
    create_overlay(&rootfs.path, "raw", &boot_disk)
        .await
        .unwrap();
    let t = Instant::now();
    let vm = Vm::launch(Launch {
        spec: spec.clone(),
        dir: boot_dir.clone(),
        disk: boot_disk.clone(),
        memory: Memory::Shared(snapshot::template_memory_path(&template_dir)),
        net: Some(net.clone()),
        incoming: false,
    })
    .await
    .expect("launch template VM");
    let template_pid = vm.pid();
    if let Err(e) = client.wait_healthy(COLD_BOOT_DEADLINE).await {
        panic!(
            "cold boot: {e}\nconsole:\n{}",
            console_tail(&vm.console_log())
        );
    }
    let cold_boot = t.elapsed();
    eprintln!("cold boot to envd /health: {cold_boot:?} ({accel})");

    client
        .snapshot_prepare(Duration::from_secs(10))
        .await
        .expect("/snapshot/prepare");
    let t = Instant::now();
    let snap = snapshot::snapshot_template(vm, &spec, &boot_disk, &rootfs.path, &template_dir)
        .await
        .expect("snapshot");
    let save = t.elapsed();
    assert!(!pid_alive(template_pid), "template QEMU still running");
    assert!(!boot_dir.exists(), "template VM dir left behind");
    eprintln!(
        "template saved in {save:?}: device state {} bytes",
        snap.manifest.state_bytes
    );

    // Restore: private mapping of the template memory, device state from the file.
    let snap = Snapshot::open(&snap.dir).unwrap();
    let vm_dir = work_path.join("vms/restored");
    let t = Instant::now();
    let vm = snap
        .restore(&vm_dir, Some(net.clone()))
        .await
        .expect("restore");
    let restored_at = t.elapsed();
    if let Err(e) = client.wait_healthy(RESTORE_DEADLINE).await {
        panic!(
            "after restore: {e}\nconsole:\n{}",
            console_tail(&vm.console_log())
        );
    }
    let restore = t.elapsed();
    eprintln!("restore: QEMU running after {restored_at:?}, envd /health after {restore:?}");
    let again = client.wait_healthy(RESTORE_DEADLINE).await.unwrap();
    eprintln!("second /health after restore: {again:?}");
    let restored_pid = vm.pid();

    let now = time_rfc3339();
    client
        .init(
            &serde_json::json!({ "envVars": { "WRENN_TEST": "restored" }, "timestamp": now }),
            Duration::from_secs(5),
        )
        .await
        .expect("/init");
    let (stdout, code) = run_command(
        &client.base_url(),
        "echo \"$WRENN_TEST $(id -un) $(cat /proc/1/comm)\"; uname -r; cut -d' ' -f1 /proc/uptime",
    )
    .await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"restored root init"),
        "stdout: {stdout:?}"
    );
    assert_eq!(
        lines.get(1),
        Some(&kernel.release.as_str()),
        "stdout: {stdout:?}"
    );
    // The guest clock stood still while it was a snapshot: this is about its boot-to-envd time.
    eprintln!(
        "guest uptime after restore: {} s",
        lines.get(2).unwrap_or(&"?")
    );

    // A truncated device state fails the restore with an error and leaves nothing behind.
    let broken = work_path.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["memory", "rootfs.qcow2", "snapshot.json"] {
        std::fs::hard_link(snap.dir.join(f), broken.join(f)).unwrap();
    }
    let state = std::fs::read(snap.dir.join("state")).unwrap();
    std::fs::write(broken.join("state"), &state[..state.len() / 2]).unwrap();
    let broken_vm_dir = work_path.join("vms/broken");
    // `Snapshot::open` checks the state's size and hash against the manifest, so it already
    // refuses; a restore would fail in QEMU's loader.
    let err = match Snapshot::open(&broken) {
        Err(e) => e,
        Ok(s) => s
            .restore(&broken_vm_dir, None)
            .await
            .expect_err("restore from a truncated state must fail"),
    };
    eprintln!("truncated snapshot: {err}");
    assert!(
        matches!(
            err,
            wrenn_agent::snapshot::SnapshotError::Load { .. }
                | wrenn_agent::snapshot::SnapshotError::Invalid { .. }
        ),
        "{err:?}"
    );
    assert!(!broken_vm_dir.exists(), "failed restore left its VM dir");
    std::fs::remove_dir_all(&broken).unwrap();

    // Kill everything and check that nothing is left.
    vm.kill().await.unwrap();
    assert!(!pid_alive(restored_pid), "restored QEMU still running");
    assert!(!vm_dir.exists(), "restored VM dir left behind");
    let netns = slot.netns().to_owned();
    let veth = slot.host_veth().to_owned();
    drop(slot);
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&netns),
        "namespace left"
    );
    assert!(
        !Path::new("/sys/class/net").join(&veth).exists(),
        "veth left"
    );
    assert!(!Path::new("/run/netns").join(&netns).exists());
    std::fs::remove_dir_all(&template_dir).unwrap();
    std::fs::remove_dir_all(&cache).unwrap();
    let leftovers: Vec<_> = walk(&work_path);
    assert!(
        leftovers.iter().all(|p| p.is_dir()),
        "files left: {leftovers:?}"
    );
    work.close().unwrap();
    assert!(!work_path.exists());
    eprintln!(
        "SUMMARY accel={accel} cold_boot_ms={} save_ms={} restore_to_health_ms={}",
        cold_boot.as_millis(),
        save.as_millis(),
        restore.as_millis()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn time_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
