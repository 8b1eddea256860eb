//! envd benchmarks against a real envd process on loopback (`cargo bench -p envd`).
//!
//! - exec round trip: `Start` of `/bin/true` until the end-of-stream message, JSON codec, as
//!   the SDKs send it;
//! - `/files` throughput: a 100 MB upload (octet-stream) and download.
//!
//! Prints medians and p99 with the machine description; `docs/benchmarks.md` records results.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;

const EXEC_ROUNDS: usize = 300;
const FILE_MB: usize = 100;
const FILE_ROUNDS: usize = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, envd as a host process on loopback (no VM)")
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let envd = support::Envd::start(&[]);
    println!("machine: {}", machine());

    // Warm up.
    for _ in 0..20 {
        exec_true(&envd).await;
    }
    let mut rtts = Vec::with_capacity(EXEC_ROUNDS);
    for _ in 0..EXEC_ROUNDS {
        let t = Instant::now();
        exec_true(&envd).await;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    println!(
        "exec round trip (/bin/true, {EXEC_ROUNDS} runs): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&rtts, 0.50).as_secs_f64() * 1e3,
        percentile(&rtts, 0.99).as_secs_f64() * 1e3
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("blob.bin");
    let data: Vec<u8> = (0..FILE_MB * 1024 * 1024)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let data = bytes::Bytes::from(data);
    let mut up = Vec::new();
    let mut down = Vec::new();
    for _ in 0..FILE_ROUNDS {
        let t = Instant::now();
        let resp = envd
            .client
            .post(envd.url("/files"))
            .query(&[("path", path.to_str().unwrap())])
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .expect("upload");
        assert!(
            resp.status().is_success(),
            "upload status {}",
            resp.status()
        );
        up.push(t.elapsed());

        let t = Instant::now();
        let resp = envd
            .client
            .get(envd.url("/files"))
            .query(&[("path", path.to_str().unwrap())])
            .send()
            .await
            .expect("download");
        assert!(
            resp.status().is_success(),
            "download status {}",
            resp.status()
        );
        let got = resp.bytes().await.expect("download body");
        down.push(t.elapsed());
        assert_eq!(got.len(), data.len());
    }
    up.sort();
    down.sort();
    let mbps = |d: Duration| FILE_MB as f64 / d.as_secs_f64();
    println!(
        "upload {FILE_MB} MB ({FILE_ROUNDS} runs): median {:.0} MB/s, worst {:.0} MB/s",
        mbps(percentile(&up, 0.5)),
        mbps(*up.last().unwrap())
    );
    println!(
        "download {FILE_MB} MB ({FILE_ROUNDS} runs): median {:.0} MB/s, worst {:.0} MB/s",
        mbps(percentile(&down, 0.5)),
        mbps(*down.last().unwrap())
    );
}

async fn exec_true(envd: &support::Envd) {
    let stream = envd
        .stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/true"}, "stdin": false}),
            &[("keepalive-ping-interval", "50")],
        )
        .await;
    let (msgs, end) = stream.collect(Duration::from_secs(30)).await;
    assert_eq!(end, json!({}), "clean end of stream");
    assert!(
        msgs.iter().any(|m| m["event"].get("end").is_some()),
        "an end event: {msgs:?}"
    );
}
