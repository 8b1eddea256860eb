//! The runtime milestone with real QEMU guests and real namespaces: build the small image,
//! cold-boot a template in a slot, snapshot it, restore a new VM from the snapshot with its
//! RAM mapped privately, reach envd in both, run a command, and leave nothing behind.
//!
//! Gated by `WRENN_VM_TESTS=1` (needs root, QEMU, the extracted kernel and a static envd:
//! `.ci/install-runtime-deps.sh`, then `scripts/build-guest-envd.sh`).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{RunOpts, enabled, envd_binary, files_under, pid_alive, run_with};
use wrenn_agent::accel::Accel;
use wrenn_agent::envd::EnvdClient;
use wrenn_agent::sandbox::SandboxNet as _;
use wrenn_agent::snapshot::{self, Snapshot};
use wrenn_agent::vm::{Launch, Memory, Vm, create_overlay};
use wrenn_hostnet::Slot;
use wrenn_image::{ENVD_PORT, Kernel, SmallImageInputs};

const COLD_BOOT_DEADLINE: Duration = Duration::from_secs(60);
const RESTORE_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_boot_snapshot_restore_and_cleanup() {
    if !enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=trace,wrenn_qmp=debug");
    // Declared first so it is dropped last, after the VMs and the slot.
    let work = support::work_dir("wrenn-vm-test");
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
    let initramfs =
        wrenn_image::build_initramfs(&cache, &kernel, Path::new("/bin/busybox")).unwrap();
    let rootfs =
        wrenn_image::build_small_rootfs(&cache, &SmallImageInputs::debian(envd.clone())).unwrap();
    let build_time = t.elapsed();
    let t = Instant::now();
    let again = wrenn_image::build_small_rootfs(&cache, &SmallImageInputs::debian(envd)).unwrap();
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
    let slot = Slot::create(slot_index).await.expect("slot");
    let net = slot.attach();
    let client = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));

    // Cold boot of the template, RAM shared into the template's memory file.
    let spec = support::vm_spec(accel, &kernel, &initramfs.path);
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
        incoming: None,
        extra_disks: vec![],
    })
    .await
    .expect("launch template VM");
    let template_pid = vm.pid();
    if let Err(e) = client.wait_healthy(COLD_BOOT_DEADLINE).await {
        panic!("cold boot: {e}\nconsole:\n{}", vm.console_text().await);
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
        panic!("after restore: {e}\nconsole:\n{}", vm.console_text().await);
    }
    let restore = t.elapsed();
    eprintln!("restore: QEMU running after {restored_at:?}, envd /health after {restore:?}");
    let again = client.wait_healthy(RESTORE_DEADLINE).await.unwrap();
    eprintln!("second /health after restore: {again:?}");
    let restored_pid = vm.pid();

    let now = support::now_rfc3339();
    client
        .init(
            &serde_json::json!({ "envVars": { "WRENN_TEST": "restored" }, "timestamp": now }),
            Duration::from_secs(5),
        )
        .await
        .expect("/init");
    let (stdout, code) = run_with(
        &client.base_url(),
        RunOpts {
            timeout: Duration::from_secs(30),
            ..RunOpts::default()
        },
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
    let leftovers = files_under(&work_path);
    assert!(leftovers.is_empty(), "files left: {leftovers:?}");
    work.close().unwrap();
    assert!(!work_path.exists());
    eprintln!(
        "SUMMARY accel={accel} cold_boot_ms={} save_ms={} restore_to_health_ms={}",
        cold_boot.as_millis(),
        save.as_millis(),
        restore.as_millis()
    );
}
