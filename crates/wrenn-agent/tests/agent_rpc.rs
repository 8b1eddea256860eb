//! The host agent's `AgentService` over Connect (JSON), against real QEMU guests: HostInfo;
//! two sandboxes created from a template snapshot; List; a command through envd; pause, List,
//! resume with the file intact; kill, kill again (not_found), an unknown template (not_found);
//! and nothing left (no QEMU, no namespaces).
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 3000..3400 are this test's own.

mod support;

use support::{TestAgent, call};

use std::time::{Duration, Instant};

use support::{files_under, run_ok, write_file};
use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::*;
use wrenn_connect::Code;
use wrenn_hostnet::NETNS_PREFIX;

const TEMPLATE: &str = "small";

fn netns_names() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap()
        .stdout;
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn spec(id: &str, template: &str) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: id.into(),
        template_id: template.into(),
        env_vars: [("WRENN_SANDBOX".to_owned(), id.to_owned())].into(),
        ..Default::default()
    }
}

fn states(list: &ListResponse) -> Vec<(String, i32)> {
    list.sandboxes
        .iter()
        .map(|s| (s.sandbox_id.clone(), s.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rpc_lifecycle() {
    if !support::enabled() {
        return;
    }
    // 33000..33400 was asked for, but slot indices stop at MAX_SLOTS (32768); 3000..3400 is
    // clear of every other test's range (vm_template 4000.., new_slot 8000.., pools 30400..).
    let first = 3_000 + (std::process::id() % 100) * 4;
    let TestAgent {
        work,
        sandboxes,
        agent,
        client: c,
        server,
    } = support::start_agent("wrenn-agent-rpc-test", TEMPLATE, first, 2, 8).await;
    let w = work.path().to_owned();

    let info: HostInfoResponse = call(&c, paths::HOST_INFO, HostInfoRequest {})
        .await
        .expect("HostInfo");
    assert_eq!(info.host_id, "test-host");
    assert!(!info.version.is_empty());
    assert!(
        info.vcpus_total >= 1 && info.memory_mb_total > 0,
        "{info:?}"
    );
    assert_eq!(info.sandboxes, 0);
    assert_eq!(info.max_sandboxes, 8);
    assert_eq!(
        info.template_envd_versions
            .get(TEMPLATE)
            .map(String::as_str),
        Some("test-envd")
    );

    // Two sandboxes, concurrently.
    let (ra, rb) = tokio::join!(
        call::<_, CreateResponse>(
            &c,
            paths::CREATE,
            CreateRequest {
                sandbox: Some(spec("sb-a", TEMPLATE))
            }
        ),
        call::<_, CreateResponse>(
            &c,
            paths::CREATE,
            CreateRequest {
                sandbox: Some(spec("sb-b", TEMPLATE))
            }
        ),
    );
    let (ra, rb) = (ra.expect("create a"), rb.expect("create b"));
    for (r, id) in [(&ra, "sb-a"), (&rb, "sb-b")] {
        let s = r.sandbox.as_ref().expect("status");
        assert_eq!(s.sandbox_id, id);
        assert_eq!(s.template_id, TEMPLATE);
        assert_eq!(s.state, SandboxState::Running as i32);
        assert_eq!(s.memory_mb, 512);
    }
    let dup = call::<_, CreateResponse>(
        &c,
        paths::CREATE,
        CreateRequest {
            sandbox: Some(spec("sb-a", TEMPLATE)),
        },
    )
    .await
    .expect_err("duplicate id");
    assert_eq!(dup.code, Code::AlreadyExists, "{dup:?}");

    let list: ListResponse = call(&c, paths::LIST, ListRequest {}).await.expect("List");
    let running = SandboxState::Running as i32;
    let paused = SandboxState::Paused as i32;
    assert_eq!(
        states(&list),
        [("sb-a".to_owned(), running), ("sb-b".to_owned(), running)]
    );
    let info: HostInfoResponse = call(&c, paths::HOST_INFO, HostInfoRequest {})
        .await
        .unwrap();
    assert_eq!((info.sandboxes, info.memory_mb_used), (2, 1024));

    // A command through envd, via the slot.
    let base_a = agent.envd_base_url("sb-a").expect("a running");
    assert_eq!(
        run_ok(&base_a, "echo \"$WRENN_SANDBOX $(id -un)\"").await,
        "sb-a root"
    );
    let base_b = agent.envd_base_url("sb-b").expect("b running");
    assert_eq!(run_ok(&base_b, "echo $WRENN_SANDBOX").await, "sb-b");
    write_file(&base_a, "/root/kept.txt", b"kept across pause").await;

    // Pause a; List shows it paused; resume; the file is intact.
    let _: PauseResponse = call(
        &c,
        paths::PAUSE,
        PauseRequest {
            sandbox_id: "sb-a".into(),
            keep_memory: true,
        },
    )
    .await
    .expect("Pause");
    let list: ListResponse = call(&c, paths::LIST, ListRequest {}).await.unwrap();
    assert_eq!(
        states(&list),
        [("sb-a".to_owned(), paused), ("sb-b".to_owned(), running)]
    );
    assert!(agent.envd_base_url("sb-a").is_none());
    let again = call::<_, PauseResponse>(
        &c,
        paths::PAUSE,
        PauseRequest {
            sandbox_id: "sb-a".into(),
            keep_memory: true,
        },
    )
    .await
    .expect_err("pause a paused sandbox");
    assert_eq!(again.code, Code::FailedPrecondition, "{again:?}");
    let st = call::<_, SetTimeoutResponse>(
        &c,
        paths::SET_TIMEOUT,
        SetTimeoutRequest {
            sandbox_id: "nope".into(),
            end_unix_ms: 0,
            backstop_unix_ms: 0,
        },
    )
    .await
    .expect_err("set timeout of unknown sandbox");
    assert_eq!(st.code, Code::NotFound);
    let far = i64::try_from(support::host_now() as u64 * 1000).unwrap() + 3_600_000;
    let r: ResumeResponse = call(
        &c,
        paths::RESUME,
        ResumeRequest {
            sandbox_id: "sb-a".into(),
            backstop_unix_ms: far,
            envd_access_token: "tok-resume".into(),
            ..Default::default()
        },
    )
    .await
    .expect("Resume");
    let s = r.sandbox.expect("status");
    assert_eq!((s.state, s.backstop_unix_ms), (running, far));
    let base_a = agent.envd_base_url("sb-a").expect("a running again");
    // The resume's access token reached envd: required now, and the file is intact.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |token: Option<&'static str>| {
        let mut r = http
            .get(format!("{base_a}/files"))
            .query(&[("path", "/root/kept.txt"), ("username", "root")])
            .timeout(Duration::from_secs(60));
        if let Some(t) = token {
            r = r.header("x-access-token", t);
        }
        r.send()
    };
    let denied = get(None).await.expect("GET /files");
    assert_eq!(denied.status(), 401, "no token after resume with one");
    let ok = get(Some("tok-resume")).await.expect("GET /files");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "kept across pause");
    let resume_running = call::<_, ResumeResponse>(
        &c,
        paths::RESUME,
        ResumeRequest {
            sandbox_id: "sb-a".into(),
            ..Default::default()
        },
    )
    .await
    .expect_err("resume a running sandbox");
    assert_eq!(resume_running.code, Code::FailedPrecondition);

    // Kill both; again -> not_found; unknown template -> not_found.
    for id in ["sb-a", "sb-b"] {
        let _: KillResponse = call(
            &c,
            paths::KILL,
            KillRequest {
                sandbox_id: id.into(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("Kill {id}: {e:?}"));
    }
    let e = call::<_, KillResponse>(
        &c,
        paths::KILL,
        KillRequest {
            sandbox_id: "sb-a".into(),
        },
    )
    .await
    .expect_err("kill again");
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    let e = call::<_, CreateResponse>(
        &c,
        paths::CREATE,
        CreateRequest {
            sandbox: Some(spec("sb-c", "no-such-template")),
        },
    )
    .await
    .expect_err("unknown template");
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    let list: ListResponse = call(&c, paths::LIST, ListRequest {}).await.unwrap();
    assert!(list.sandboxes.is_empty(), "{list:?}");

    // The backstop: a sandbox whose backstop passes is killed by the agent on its own.
    let _: CreateResponse = call(
        &c,
        paths::CREATE,
        CreateRequest {
            sandbox: Some(spec("sb-c", TEMPLATE)),
        },
    )
    .await
    .expect("create c");
    let soon = i64::try_from(support::host_now() as u64 * 1000).unwrap() + 1_000;
    let _: SetTimeoutResponse = call(
        &c,
        paths::SET_TIMEOUT,
        SetTimeoutRequest {
            sandbox_id: "sb-c".into(),
            end_unix_ms: soon,
            backstop_unix_ms: soon,
        },
    )
    .await
    .expect("SetTimeout");
    let t = Instant::now();
    loop {
        let list: ListResponse = call(&c, paths::LIST, ListRequest {}).await.unwrap();
        if list.sandboxes.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "backstop did not kill: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("backstop kill seen {:?} after SetTimeout", t.elapsed());
    // The killed sandbox's metrics went with it.
    let e = call::<_, MetricsResponse>(&c, paths::METRICS, MetricsRequest::default())
        .await
        .expect_err("metrics");
    assert_eq!(e.code, Code::NotFound);

    // Nothing left.
    server.abort();
    agent.shutdown().await;
    drop(agent);
    assert!(
        support::qemu_pids_under(&w).is_empty(),
        "QEMU processes left"
    );
    let ours: Vec<String> = (first..first + 4)
        .map(|i| format!("{NETNS_PREFIX}{i}"))
        .collect();
    let left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| ours.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let left = files_under(&sandboxes);
    assert!(left.is_empty(), "sandbox files left: {left:?}");
    std::fs::remove_dir_all(w.join("template")).unwrap();
    std::fs::remove_dir_all(w.join("images")).unwrap();
    let left = files_under(&w);
    assert!(left.is_empty(), "files left: {left:?}");
    work.close().unwrap();
}
