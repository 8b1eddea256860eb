//! Template builds against real QEMU guests: steps (`RUN` as root and as a user, `COPY` from
//! an uploaded archive with owner and mode, `ENV`, `WORKDIR`, `USER`) run in a build VM, and a
//! start command keeps running in the template's snapshot; a sandbox of the template sees
//! the files, env, workdir and user, and the started process, right after create. A rebuild
//! with only the last step changed reuses the earlier layers; a failing `RUN` fails the build
//! with its exit code and leaves no template.
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 5400..5440 are this test's own.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use support::{RunOpts, call, run_ok_with};
use wrenn_agent::build::{
    self, BuildDirs, BuildError, BuildEvent, BuildRequest, Defaults, Parent, RawStep,
};
use wrenn_agent::snapshot::Snapshot;
use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::*;
use wrenn_hostnet::Slot;

const TOKEN: &str = "tok-build";

fn step(kind: &str, args: &[&str]) -> RawStep {
    RawStep {
        kind: kind.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A gzip'd tar of `files` (path, content, mode), as the SDK packs a `COPY` context.
fn archive(dir: &Path, files: &[(&str, &str, u32)]) -> std::path::PathBuf {
    let src = dir.join("ctx");
    for (p, content, mode) in files {
        let f = src.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, content).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    // A symlink pointing out of the context: unpacked in the guest, it points into the
    // guest's own tree and nothing on the host follows it.
    std::os::unix::fs::symlink("/etc/shadow", src.join("escape")).unwrap();
    let out = dir.join("ctx.tar.gz");
    let ok = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    out
}

struct Run {
    result: Result<Snapshot, BuildError>,
    logs: Vec<String>,
    cached: Vec<bool>,
    took: std::time::Duration,
}

async fn run_build(req: &BuildRequest, layers: &Path, out: &Path, slot: &Slot) -> Run {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let report = move |e: BuildEvent| sink.lock().unwrap().push(e);
    let dirs = BuildDirs {
        layers: layers.to_owned(),
        work: out.with_extension("work"),
        out: out.to_owned(),
    };
    let t = Instant::now();
    let result = build::build(req, &dirs, slot, &report).await;
    let took = t.elapsed();
    let events = events.lock().unwrap();
    let mut logs = Vec::new();
    let mut cached = Vec::new();
    for e in events.iter() {
        match e {
            BuildEvent::Log { message, .. } => logs.push(message.clone()),
            BuildEvent::Step { cached: c, .. } => cached.push(*c),
        }
    }
    Run {
        result,
        logs,
        cached,
        took,
    }
}

#[test]
fn template_builds() -> Result<(), String> {
    if !support::enabled() {
        return Ok(());
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(template_builds_inner());
    Ok(())
}

async fn template_builds_inner() {
    let agent = support::start_agent("wrenn-build", "small", 5400, 1, 4).await;
    let work = agent.work.path().to_owned();
    let parent = Snapshot::open(&work.join("template")).unwrap();
    let slot = Slot::create(5420).await.expect("build slot");
    let files = archive(
        &work,
        &[
            ("app/a.txt", "hello from the context\n", 0o644),
            ("app/run.sh", "#!/bin/bash\necho ran\n", 0o700),
        ],
    );
    let hash = "feedc0de".to_owned();
    let mut copy = step("COPY", &["app", "/srv/app", "user", "0750"]);
    copy.files_hash = Some(hash.clone());
    let mut req = BuildRequest {
        parent: Parent::template(&parent),
        parent_defaults: Defaults {
            user: Some("root".into()),
            ..Default::default()
        },
        vcpus: 1,
        memory_mib: 512,
        steps: vec![
            step("RUN", &["echo built-as-$(id -un) > /root/who"]),
            copy,
            step("ENV", &["GREETING", "hi there", "N", "1"]),
            step("WORKDIR", &["/srv/work"]),
            step("USER", &["user"]),
            step(
                "RUN",
                &["echo \"$GREETING $N $(pwd) $(id -un)\" > /tmp/seen"],
            ),
        ],
        start_cmd: Some("echo started > /tmp/start.txt; exec sleep 100000".into()),
        ready_cmd: Some("test -f /tmp/start.txt".into()),
        skip_cache: false,
        files: HashMap::from([(hash.clone(), files)]),
    };
    let layers = work.join("layers");
    let first = run_build(&req, &layers, &work.join("built-1"), &slot).await;
    let snap = first
        .result
        .unwrap_or_else(|e| panic!("build: {e}\n{}", first.logs.join("\n")));
    eprintln!(
        "cold build: {:?}; log:\n{}",
        first.took,
        first.logs.join("\n")
    );
    assert_eq!(first.cached, vec![false; 6]);
    let chain = wrenn_agent::jail::disk::chain(&snap.disk_path()).unwrap();
    assert_eq!(
        chain[1].path,
        parent.disk_path(),
        "a template's disk is one layer on its parent's"
    );

    agent
        .agent
        .register_template("built", snap.clone(), None, "test-envd");
    let _: CreateResponse = call(
        &agent.client,
        paths::CREATE,
        CreateRequest {
            sandbox: Some(SandboxSpec {
                sandbox_id: "sb-built".into(),
                template_id: "built".into(),
                envd_access_token: TOKEN.into(),
                env_vars: HashMap::from([("N".to_owned(), "2".to_owned())]),
                ..Default::default()
            }),
        },
    )
    .await
    .expect("create from the built template");
    let base = agent
        .agent
        .controller()
        .with_running("sb-built", |sb| sb.envd().base_url())
        .unwrap();
    let user = RunOpts {
        token: Some(TOKEN),
        user: "user",
        ..Default::default()
    };
    let root = RunOpts {
        token: Some(TOKEN),
        ..Default::default()
    };
    assert_eq!(
        run_ok_with(&base, root, "cat /root/who").await,
        "built-as-root"
    );
    assert_eq!(
        run_ok_with(
            &base,
            root,
            "cat /srv/app/a.txt; stat -c '%U %a' /srv/app/a.txt /srv/app/run.sh"
        )
        .await,
        "hello from the context\nuser 750\nuser 750"
    );
    assert_eq!(
        run_ok_with(&base, root, "cat /tmp/seen").await,
        "hi there 1 /srv/work user"
    );
    // The template's env reaches sandboxes, with the sandbox's own on top.
    assert_eq!(
        run_ok_with(&base, user, "echo \"$GREETING $N\"; pwd; id -un").await,
        "hi there 2\n/srv/work\nuser"
    );
    // The start command is running right after create, as the template's user.
    let ps = run_ok_with(
        &base,
        root,
        "cat /tmp/start.txt; ps -o user,args | grep '[s]leep 100000'",
    )
    .await;
    assert!(ps.starts_with("started\n"), "{ps}");
    assert!(ps.contains("sleep 100000"), "{ps}");
    // The symlink came in as a link, inside the guest.
    assert_eq!(
        run_ok_with(
            &base,
            root,
            "ls /srv/app; test ! -e /srv/app/escape && echo not-copied"
        )
        .await,
        "a.txt\nrun.sh\nnot-copied"
    );

    // A template built on the built one boots its disk cold: everything the parent's steps
    // wrote to its disk must be there, not only in the parent's memory snapshot (the page
    // cache of the first build's guest hid a template disk that had lost all but its top
    // layer).
    let child = BuildRequest {
        parent: Parent::template(&snap),
        parent_defaults: Defaults::read(&snap.dir, Defaults::default()),
        steps: vec![step(
            "RUN",
            &[
                "cat /root/who /srv/app/a.txt; stat -c '%U %n' /srv/work",
                "root",
            ],
        )],
        start_cmd: None,
        ready_cmd: None,
        files: HashMap::new(),
        ..req.clone()
    };
    let grandchild = run_build(&child, &layers, &work.join("built-child"), &slot).await;
    grandchild
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("child build: {e}\n{}", grandchild.logs.join("\n")));
    let seen = grandchild.logs.join("\n");
    // (/tmp is a tmpfs in the guest: what steps wrote there lives only in the memory snapshot.)
    for line in ["built-as-root", "hello from the context", "root /srv/work"] {
        assert!(
            grandchild.logs.iter().any(|l| l == line),
            "{line:?} in:\n{seen}"
        );
    }

    // Only the last step changed: steps 1-5 come from the cache.
    req.steps[5] = step("RUN", &["echo changed > /tmp/seen"]);
    let second = run_build(&req, &layers, &work.join("built-2"), &slot).await;
    second
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("rebuild: {e}\n{}", second.logs.join("\n")));
    eprintln!(
        "rebuild, last step changed: {:?} (cold: {:?})",
        second.took, first.took
    );
    assert_eq!(second.cached, vec![true, true, true, true, true, false]);
    assert!(
        second
            .logs
            .iter()
            .any(|l| l.contains("reusing cached layers of steps 1-5")),
        "{:?}",
        second.logs
    );

    // A failing RUN: its output and exit code, and no template.
    req.steps
        .push(step("RUN", &["echo about to fail; echo oops >&2; exit 7"]));
    let failed = run_build(&req, &layers, &work.join("built-3"), &slot).await;
    match &failed.result {
        Err(BuildError::StepFailed {
            index: 7, code: 7, ..
        }) => {}
        other => panic!("expected step 7 to fail with 7: {other:?}"),
    }
    assert!(
        failed.logs.iter().any(|l| l == "about to fail"),
        "{:?}",
        failed.logs
    );
    assert!(failed.logs.iter().any(|l| l == "oops"), "{:?}", failed.logs);
    assert!(!work.join("built-3").exists());
    assert!(!work.join("built-3.staging").exists());
    assert!(!work.join("built-3.work").exists());

    let _: KillResponse = call(
        &agent.client,
        paths::KILL,
        KillRequest {
            sandbox_id: "sb-built".into(),
        },
    )
    .await
    .expect("kill");
    tokio::task::spawn_blocking(move || drop(slot))
        .await
        .unwrap();
}
