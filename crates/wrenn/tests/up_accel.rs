//! `wrenn up --accel`: a bad value is refused by the argument parser, and `--accel kvm` on a
//! host where KVM cannot run guests fails at once with the reason, before anything is made
//! (no state directory). Starts no VM.

use std::process::Command;

fn up(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wrenn"))
        .arg("up")
        .args(args)
        .env_remove("WRENN_ACCEL")
        .output()
        .expect("run wrenn up")
}

#[test]
fn a_bad_accelerator_is_refused() {
    let out = up(&["--accel", "hvf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("hvf") && err.contains("auto, kvm, tcg"),
        "{err}"
    );
}

#[test]
fn kvm_where_it_cannot_run_guests_fails_before_anything_is_made() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: wrenn up refuses to start without root before it looks at --accel");
        return;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if virt && std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: KVM may run guests here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = up(&["--accel", "kvm", "--state-dir", state.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--accel kvm") && err.contains("cannot run guests on this host"),
        "{err}"
    );
    assert!(
        !state.exists(),
        "wrenn up made its state directory before failing"
    );
}
