//! The agent's `Metrics` and `Logs` RPCs against a real QEMU guest: a sandbox with an access
//! token reports real samples (on demand at once, then from the sampler), its console lines
//! (one written by the guest) and lifecycle events; a paused sandbox keeps its past samples;
//! a resumed one is sampled again; a killed one is not_found.
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 3400..3600 are this test's own.

mod support;

use support::{TestAgent, call};

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use support::pid_alive;
use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::*;
use wrenn_connect::{Client, Code, ConnectError};

const TEMPLATE: &str = "small";
const ID: &str = "sb-observe";

async fn metrics(c: &Client, start: i64, end: i64) -> Result<Vec<MetricSample>, ConnectError> {
    let r: MetricsResponse = call(
        c,
        paths::METRICS,
        MetricsRequest {
            sandbox_id: ID.into(),
            start_unix_ms: start,
            end_unix_ms: end,
        },
    )
    .await?;
    Ok(r.samples)
}

async fn logs(c: &Client, start: i64, limit: u32) -> Result<Vec<LogEntry>, ConnectError> {
    let req = LogsRequest {
        sandbox_id: ID.into(),
        start_unix_ms: start,
        limit,
        follow: false,
    };
    c.server_stream::<_, LogEntry>(paths::LOGS, &req)
        .await?
        .try_collect()
        .await
}

fn now_ms() -> i64 {
    (support::host_now() * 1000.0) as i64
}

fn assert_real(s: &MetricSample) {
    assert!(s.cpu_count >= 1, "{s:?}");
    assert!(
        s.mem_total > 0 && s.mem_used > 0 && s.mem_used <= s.mem_total,
        "{s:?}"
    );
    assert!(s.disk_total > 0 && s.disk_used <= s.disk_total, "{s:?}");
    assert!((0.0..=100.0).contains(&s.cpu_used_pct), "{s:?}");
    // 512 MiB guest.
    assert!(s.mem_total <= 512 << 20, "{s:?}");
}

fn messages(entries: &[LogEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.message.as_str()).collect()
}

fn event_index(entries: &[LogEntry], event: &str) -> Option<usize> {
    entries
        .iter()
        .position(|e| e.fields.get("event").map(String::as_str) == Some(event))
}

/// Runs `sh -c <cmd>` as root through envd with the sandbox's access token; returns the exit
/// code.
async fn run_with_token(base: &str, token: &str, cmd: &str) -> i64 {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let msg = serde_json::json!({
        "process": { "cmd": "/bin/sh", "args": ["-c", cmd], "envs": {} }
    })
    .to_string();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg.as_bytes());
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{base}/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("authorization", format!("Basic {}", b64.encode("root:")))
        .header("x-access-token", token)
        .timeout(Duration::from_secs(120))
        .body(body)
        .send()
        .await
        .expect("Start request");
    assert_eq!(resp.status(), 200, "Start status");
    let bytes = resp.bytes().await.unwrap();
    let mut rest = &bytes[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let v: serde_json::Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        rest = &rest[5 + len..];
        if let Some(end) = v["event"].get("end") {
            return end["exitCode"].as_i64().unwrap_or(0);
        }
    }
    panic!("no end event");
}

/// Waits until a sample taken after `after` (host ms) shows up.
async fn wait_sample_after(c: &Client, after: i64) -> Vec<MetricSample> {
    let t = Instant::now();
    loop {
        let samples = metrics(c, 0, 0).await.expect("Metrics");
        if samples.iter().any(|s| s.timestamp_unix_ms > after) {
            return samples;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no sample after {after} from the sampler: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_and_logs() {
    if !support::enabled() {
        return;
    }
    let first = 3_400 + (std::process::id() % 50) * 4;
    let TestAgent {
        work,
        sandboxes,
        agent,
        client: c,
        server,
    } = support::start_agent("wrenn-agent-observe-test", TEMPLATE, first, 1, 4).await;
    let w = work.path().to_owned();

    let e = metrics(&c, 0, 0).await.expect_err("unknown sandbox");
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    let e = logs(&c, 0, 0).await.expect_err("unknown sandbox");
    assert_eq!(e.code, Code::NotFound, "{e:?}");

    let before_create = now_ms();
    let _: CreateResponse = call(
        &c,
        paths::CREATE,
        CreateRequest {
            sandbox: Some(SandboxSpec {
                sandbox_id: ID.into(),
                template_id: TEMPLATE.into(),
                envd_access_token: "tok-observe".into(),
                ..Default::default()
            }),
        },
    )
    .await
    .expect("create");

    // At once: one sample taken on demand (through the token envd now requires).
    let t = Instant::now();
    let first_samples = metrics(&c, 0, 0).await.expect("Metrics");
    eprintln!("first Metrics in {:?}: {first_samples:?}", t.elapsed());
    assert!(!first_samples.is_empty(), "no sample for a fresh sandbox");
    for s in &first_samples {
        assert_real(s);
        assert!(s.timestamp_unix_ms >= before_create && s.timestamp_unix_ms <= now_ms());
    }

    // The guest writes to its console; it shows up in Logs after the `created` event.
    let base = agent.envd_base_url(ID).expect("running");
    assert_eq!(
        run_with_token(
            &base,
            "tok-observe",
            "echo wrenn-observe-marker >/dev/console"
        )
        .await,
        0
    );
    let entries = logs(&c, 0, 1000).await.expect("Logs");
    eprintln!("logs after create:");
    for e in &entries {
        eprintln!(
            "  {} {} {:?} {}",
            e.timestamp_unix_ms, e.level, e.fields, e.message
        );
    }
    let created = event_index(&entries, "created").expect("a created event");
    assert_eq!(entries[created].message, "sandbox created");
    let marker = entries
        .iter()
        .position(|e| e.message == "wrenn-observe-marker")
        .unwrap_or_else(|| panic!("no guest console line: {:?}", messages(&entries)));
    assert!(marker > created, "{:?}", messages(&entries));
    assert_eq!(
        entries[marker].fields.get("source").map(String::as_str),
        Some("console")
    );
    // envd's own log goes to the console too (it logs every /init after a restore).
    assert!(
        entries
            .iter()
            .any(|e| e.message.contains("resumed after snapshot")),
        "no envd line: {:?}",
        messages(&entries)
    );
    assert!(
        entries
            .windows(2)
            .all(|w| w[0].timestamp_unix_ms <= w[1].timestamp_unix_ms)
    );
    assert!(entries.iter().all(|e| !e.message.contains('\u{1b}')));
    // Paging: limit, and start.
    let one = logs(&c, 0, 1).await.expect("Logs limit 1");
    assert_eq!(messages(&one), messages(&entries[..1]));
    let from_marker = logs(&c, entries[marker].timestamp_unix_ms, 1000)
        .await
        .expect("Logs from the marker");
    assert!(messages(&from_marker).contains(&"wrenn-observe-marker"));
    assert!(from_marker.len() <= entries.len() - marker + 1);
    assert!(
        from_marker
            .iter()
            .all(|e| e.timestamp_unix_ms >= entries[marker].timestamp_unix_ms)
    );

    // The sampler adds samples every 5 s.
    let after = first_samples.last().unwrap().timestamp_unix_ms;
    let samples = wait_sample_after(&c, after).await;
    assert!(samples.len() >= 2, "{samples:?}");
    samples.iter().for_each(assert_real);
    assert!(
        samples
            .windows(2)
            .all(|w| w[0].timestamp_unix_ms < w[1].timestamp_unix_ms)
    );
    // Time filters.
    let last = samples.last().unwrap().timestamp_unix_ms;
    let only_last = metrics(&c, last, 0).await.unwrap();
    assert_eq!(only_last.first().map(|s| s.timestamp_unix_ms), Some(last));
    let up_to_first = metrics(&c, 0, samples[0].timestamp_unix_ms).await.unwrap();
    assert_eq!(up_to_first.len(), 1, "{up_to_first:?}");
    assert!(metrics(&c, now_ms() + 60_000, 0).await.unwrap().is_empty());

    // Paused: past samples stay, and the pause is logged.
    let _: PauseResponse = call(
        &c,
        paths::PAUSE,
        PauseRequest {
            sandbox_id: ID.into(),
            keep_memory: true,
        },
    )
    .await
    .expect("Pause");
    let paused_samples = metrics(&c, 0, 0).await.expect("Metrics while paused");
    assert!(paused_samples.len() >= samples.len(), "{paused_samples:?}");
    let entries = logs(&c, 0, 1000).await.expect("Logs while paused");
    let paused_at = event_index(&entries, "paused").expect("a paused event");
    assert!(paused_at > marker);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        metrics(&c, 0, 0).await.unwrap().len(),
        paused_samples.len(),
        "a paused sandbox is not sampled"
    );

    // Resumed (with its token again, as the control plane derives it per sandbox): sampled
    // again, the resume is logged after the pause.
    let _: ResumeResponse = call(
        &c,
        paths::RESUME,
        ResumeRequest {
            sandbox_id: ID.into(),
            envd_access_token: "tok-observe".into(),
            ..Default::default()
        },
    )
    .await
    .expect("Resume");
    let resumed_ms = now_ms();
    let samples = wait_sample_after(&c, resumed_ms).await;
    samples.iter().for_each(assert_real);
    let entries = logs(&c, 0, 1000).await.expect("Logs after resume");
    let resumed_at = event_index(&entries, "resumed").expect("a resumed event");
    assert!(resumed_at > paused_at, "{:?}", messages(&entries));
    assert!(
        entries[paused_at..]
            .iter()
            .any(|e| e.message.contains("resumed after snapshot")),
        "no envd line from the resumed VM: {:?}",
        messages(&entries)
    );

    // Killed: gone.
    let _: KillResponse = call(
        &c,
        paths::KILL,
        KillRequest {
            sandbox_id: ID.into(),
        },
    )
    .await
    .expect("Kill");
    let e = metrics(&c, 0, 0).await.expect_err("killed");
    assert_eq!(e.code, Code::NotFound);
    let e = logs(&c, 0, 0).await.expect_err("killed");
    assert_eq!(e.code, Code::NotFound);

    server.abort();
    agent.shutdown().await;
    drop(agent);
    let left = support::files_under(&sandboxes);
    assert!(left.is_empty(), "sandbox files left: {left:?}");
    assert!(
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| pid_alive(*pid))
            .all(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !String::from_utf8_lossy(&cmd).contains(w.to_string_lossy().as_ref())
            }),
        "QEMU processes left"
    );
    std::fs::remove_dir_all(w.join("template")).unwrap();
    work.close().unwrap();
}
