//! What the agent remembers about each sandbox for the `Metrics` and `Logs` RPCs: resource
//! samples taken from envd's `GET /metrics` every [`SAMPLE_INTERVAL`] (a bounded ring, the last
//! hour; each answer read up to [`crate::envd::MAX_BODY`] bytes), and a bounded log of the
//! guest's serial console lines and the agent's lifecycle events (created, paused, resumed).
//!
//! The console is a ring inside QEMU ([`crate::vm::CONSOLE_RING`] bytes) that the agent drains
//! over QMP: a guest that floods it only overwrites its own older output, and what the agent
//! keeps is bounded by the log ring ([`MAX_LOG_ENTRIES`] lines of at most [`MAX_LINE`] bytes).
//!
//! One sampler task per agent ([`sampler`]) samples every running sandbox and drains its console.
//! Everything is in memory: an agent restart forgets it, as it forgets nothing else that matters
//! (samples are advisory). The [`Observer`] lock is never held across an await, and is only ever
//! taken after (never while holding) the agent's sandboxes lock.
//!
//! Timestamps are the host's clock, never the guest's: a restored guest runs on the snapshot's
//! clock until `/init` sets it. A console line is stamped when the agent reads it (at most one
//! sample interval late, or at a `Logs` call, which reads the console first).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use wrenn_agent_proto::v1::{LogEntry, LogsRequest, MetricSample, MetricsRequest, MetricsResponse};

use crate::agent::Agent;
use crate::controller::ControlError;
use crate::sandbox::{Sandbox, SandboxNet};
use crate::vm::Console;

/// How often each running sandbox is sampled (and its console read).
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept per sandbox: one hour at [`SAMPLE_INTERVAL`].
const MAX_SAMPLES: usize = 720;
/// Log entries kept per sandbox (the RPC's maximum page is [`MAX_LOG_LIMIT`]).
const MAX_LOG_ENTRIES: usize = 2000;
/// Entries a `Logs` call returns when it names no limit.
const DEFAULT_LOG_LIMIT: u32 = 100;
/// The most entries one `Logs` call returns.
const MAX_LOG_LIMIT: u32 = 1000;
/// One `/metrics` request; a TCG guest under load answers in well under a second.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// One read of the console ring over QMP.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longer console lines are cut (a line without a newline is flushed at this length too).
const MAX_LINE: usize = 4096;
/// `envd` wants the sandbox's token on everything but `/health` and `/init`.
const ACCESS_TOKEN_HEADER: &str = "X-Access-Token";

/// Why a sample could not be taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ObserveError {
    /// The request failed.
    #[error("GET /metrics")]
    Request(#[from] reqwest::Error),
    /// envd answered with an error status.
    #[error("GET /metrics answered {0}")]
    Status(u16),
    /// The answer was too long or not envd's JSON.
    #[error("GET /metrics")]
    Body(#[from] crate::envd::BodyError),
}

/// Where a running sandbox's envd is (its console path is given to [`Observer::started`]).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    id: String,
    envd_url: String,
}

impl Target {
    /// The target of a running sandbox.
    pub(crate) fn of<N: SandboxNet>(id: &str, sb: &Sandbox<N>) -> Self {
        Self {
            id: id.to_owned(),
            envd_url: sb.envd().base_url(),
        }
    }
}

/// The per-sandbox samples and logs of an agent.
#[derive(Debug)]
pub(crate) struct Observer {
    http: reqwest::Client,
    next_generation: AtomicU64,
    sandboxes: Mutex<HashMap<String, Observed>>,
}

impl Default for Observer {
    fn default() -> Self {
        // Never through a proxy from the environment, and no pooled connections: a slot's
        // address is another guest after a pause.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default();
        Self {
            http,
            next_generation: AtomicU64::new(1),
            sandboxes: Mutex::new(HashMap::new()),
        }
    }
}

/// A bounded FIFO: pushing onto a full ring drops the oldest item.
#[derive(Debug)]
struct Ring<T> {
    items: VecDeque<T>,
    cap: usize,
}

impl<T> Ring<T> {
    fn new(cap: usize) -> Self {
        Self {
            items: VecDeque::new(),
            cap,
        }
    }

    fn push(&mut self, item: T) {
        if self.items.len() >= self.cap {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[derive(Debug)]
struct Observed {
    /// Tells a sampler's late result for a killed sandbox from a new one with the same ID.
    generation: u64,
    token: Option<String>,
    samples: Ring<MetricSample>,
    logs: Ring<LogEntry>,
    /// The running VM's console (reads of one sandbox's console are serialized, so lines
    /// stay in order); `None` while paused.
    console: Option<Arc<tokio::sync::Mutex<Console>>>,
    /// The console's last line, not yet ended.
    partial: Vec<u8>,
    /// The last log timestamp, so that entries stay ordered when the clock steps back.
    last_ms: i64,
}

impl Observed {
    fn new(generation: u64) -> Self {
        Self {
            generation,
            token: None,
            samples: Ring::new(MAX_SAMPLES),
            logs: Ring::new(MAX_LOG_ENTRIES),
            console: None,
            partial: Vec::new(),
            last_ms: 0,
        }
    }

    fn log(&mut self, message: String, level: &str, source: &str, event: Option<&str>) {
        let ts = now_ms().max(self.last_ms);
        self.last_ms = ts;
        let mut fields = HashMap::from([("source".to_owned(), source.to_owned())]);
        if let Some(e) = event {
            fields.insert("event".to_owned(), e.to_owned());
        }
        self.logs.push(LogEntry {
            timestamp_unix_ms: ts,
            message,
            level: level.to_owned(),
            fields,
        });
    }

    fn event(&mut self, event: &str) {
        self.log(format!("sandbox {event}"), "info", "agent", Some(event));
    }

    /// Logs the console lines in `data` (read from the ring); `flush` also takes a last line
    /// without a newline (the VM is going away).
    fn console_lines(&mut self, data: &[u8], flush: bool) {
        let mut lines = split_lines(&mut self.partial, data);
        if flush && !self.partial.is_empty() {
            lines.push(clean_line(&std::mem::take(&mut self.partial)));
        }
        for line in lines.into_iter().filter(|l| !l.trim().is_empty()) {
            let level = level_of(&line);
            self.log(line, level, "console", None);
        }
    }
}

/// Appends `data` to `partial` and takes out every complete line (and over-long pieces).
fn split_lines(partial: &mut Vec<u8>, data: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    for &b in data {
        if b == b'\n' {
            lines.push(clean_line(partial));
            partial.clear();
        } else {
            partial.push(b);
            if partial.len() >= MAX_LINE {
                lines.push(clean_line(partial));
                partial.clear();
            }
        }
    }
    lines
}

/// Lossy UTF-8 without ANSI escape sequences (envd's log lines are colored on a terminal),
/// carriage returns or other control characters.
fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in @..~; other escapes: one more character.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out.trim_end().to_owned()
}

/// The level of a console line: envd's `tracing` lines are `<RFC 3339 time> <LEVEL> ...`;
/// anything else (the kernel, init) is `info`.
fn level_of(line: &str) -> &'static str {
    let mut words = line.split_whitespace();
    let stamped = words
        .next()
        .is_some_and(|w| w.starts_with(|c: char| c.is_ascii_digit()) && w.contains(':'));
    match words.next() {
        Some("ERROR") if stamped => "error",
        Some("WARN") if stamped => "warn",
        Some("DEBUG" | "TRACE") if stamped => "debug",
        _ => "info",
    }
}

/// envd's `/metrics` body (the fields used here; `ts` is the guest's clock and is not used).
#[derive(Debug, Deserialize)]
struct EnvdMetrics {
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    #[serde(default)]
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

/// Takes one sample from envd at `envd_url`, stamped with the host's clock.
async fn fetch(
    http: &reqwest::Client,
    envd_url: &str,
    token: Option<&str>,
) -> Result<MetricSample, ObserveError> {
    let mut req = http
        .get(format!("{envd_url}/metrics"))
        .timeout(FETCH_TIMEOUT);
    if let Some(t) = token {
        req = req.header(ACCESS_TOKEN_HEADER, t);
    }
    let resp = req.send().await?;
    if !resp.status().is_success() {
        return Err(ObserveError::Status(resp.status().as_u16()));
    }
    let body = crate::envd::read_capped(resp, crate::envd::MAX_BODY).await?;
    let m: EnvdMetrics = serde_json::from_slice(&body).map_err(crate::envd::BodyError::Json)?;
    Ok(MetricSample {
        timestamp_unix_ms: now_ms(),
        cpu_count: m.cpu_count,
        cpu_used_pct: m.cpu_used_pct,
        mem_used: m.mem_used,
        mem_total: m.mem_total,
        mem_cache: m.mem_cache,
        disk_used: m.disk_used,
        disk_total: m.disk_total,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Samples in `[start, end]`; 0 leaves that side open.
fn in_range(samples: &Ring<MetricSample>, start: i64, end: i64) -> Vec<MetricSample> {
    samples
        .iter()
        .filter(|s| s.timestamp_unix_ms >= start && (end <= 0 || s.timestamp_unix_ms <= end))
        .cloned()
        .collect()
}

/// Up to `limit` entries from `start` on, oldest first (0: the default page, capped).
fn page(logs: &Ring<LogEntry>, start: i64, limit: u32) -> Vec<LogEntry> {
    let limit = match limit {
        0 => DEFAULT_LOG_LIMIT,
        n => n.min(MAX_LOG_LIMIT),
    };
    logs.iter()
        .filter(|e| e.timestamp_unix_ms >= start)
        .take(limit as usize)
        .cloned()
        .collect()
}

impl Observer {
    /// A sandbox (re)started in a VM whose console is `console`: remembers the access token
    /// envd now wants, reads the console (the guest's lines from the start come before the
    /// event) and logs `event` ("created", "resumed").
    pub(crate) async fn started(
        &self,
        id: &str,
        token: Option<String>,
        console: Console,
        event: &str,
    ) {
        {
            let mut map = lock(&self.sandboxes);
            let o = map.entry(id.to_owned()).or_insert_with(|| {
                Observed::new(self.next_generation.fetch_add(1, Ordering::Relaxed))
            });
            o.token = token;
            o.console = Some(Arc::new(tokio::sync::Mutex::new(console)));
            o.partial.clear();
        }
        self.catch_up(id).await;
        if let Some(o) = lock(&self.sandboxes).get_mut(id) {
            o.event(event);
        }
    }

    /// Drains the console ring of a running sandbox into its log (before its VM goes away, or
    /// to be current).
    pub(crate) async fn catch_up(&self, id: &str) {
        let Some((generation, console)) = lock(&self.sandboxes)
            .get(id)
            .and_then(|o| Some((o.generation, o.console.clone()?)))
        else {
            return;
        };
        let console = console.lock().await;
        let data = match tokio::time::timeout(CONSOLE_TIMEOUT, console.read()).await {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => {
                tracing::debug!(sandbox_id = %id, error = %e, "read console");
                return;
            }
            Err(_) => {
                tracing::debug!(sandbox_id = %id, "console read timed out");
                return;
            }
        };
        if let Some(o) = lock(&self.sandboxes).get_mut(id)
            && o.generation == generation
        {
            o.console_lines(&data, false);
        }
    }

    /// The sandbox was paused: its VM, and so its console, is gone (read it before, with
    /// [`Observer::catch_up`]).
    pub(crate) fn paused(&self, id: &str) {
        if let Some(o) = lock(&self.sandboxes).get_mut(id) {
            o.console_lines(&[], true);
            o.console = None;
            o.event("paused");
        }
    }

    /// The sandbox is gone: drops everything about it.
    pub(crate) fn forget(&self, id: &str) {
        lock(&self.sandboxes).remove(id);
    }

    /// Drops every sandbox not in `ids` (a safety net behind [`Observer::forget`]).
    fn retain(&self, ids: &HashSet<String>) {
        lock(&self.sandboxes).retain(|id, _| ids.contains(id));
    }

    fn token_of(&self, id: &str) -> Option<(u64, Option<String>)> {
        lock(&self.sandboxes)
            .get(id)
            .map(|o| (o.generation, o.token.clone()))
    }

    /// Stores a sample taken for generation `generation` of `id`, if that is still the one.
    fn record(&self, id: &str, generation: u64, sample: MetricSample) {
        if let Some(o) = lock(&self.sandboxes).get_mut(id)
            && o.generation == generation
        {
            o.samples.push(sample);
        }
    }

    fn has_samples(&self, id: &str) -> bool {
        lock(&self.sandboxes)
            .get(id)
            .is_some_and(|o| !o.samples.is_empty())
    }

    fn samples(&self, id: &str, start: i64, end: i64) -> Vec<MetricSample> {
        lock(&self.sandboxes)
            .get(id)
            .map(|o| in_range(&o.samples, start, end))
            .unwrap_or_default()
    }

    fn logs(&self, id: &str, start: i64, limit: u32) -> Vec<LogEntry> {
        lock(&self.sandboxes)
            .get(id)
            .map(|o| page(&o.logs, start, limit))
            .unwrap_or_default()
    }

    /// Samples `target` now and stores the sample.
    async fn sample(&self, target: &Target) -> Result<MetricSample, ObserveError> {
        let Some((generation, token)) = self.token_of(&target.id) else {
            // Not observed (yet): nothing to store into, but still an answer.
            return fetch(&self.http, &target.envd_url, None).await;
        };
        let s = fetch(&self.http, &target.envd_url, token.as_deref()).await?;
        self.record(&target.id, generation, s);
        Ok(s)
    }
}

impl Agent {
    /// `id`'s envd target if it is running, `None` if it is paused or busy.
    fn observe_target(&self, id: &str) -> Result<Option<Target>, ControlError> {
        if self.controller().get(id).is_none() {
            return Err(ControlError::NotFound(id.to_owned()));
        }
        Ok(self.controller().with_running(id, |sb| Target::of(id, sb)))
    }

    /// `Metrics`: the samples between `start_unix_ms` and `end_unix_ms` (0: open). A running
    /// sandbox with no sample yet is sampled now, and that sample is returned even past `end`
    /// (a caller's "until now" is read before the sample is taken). A paused sandbox answers
    /// with its samples from before the pause.
    pub(crate) async fn metrics(
        &self,
        req: &MetricsRequest,
    ) -> Result<MetricsResponse, ControlError> {
        let target = self.observe_target(&req.sandbox_id)?;
        let observe = &self.runtime().observe;
        if let Some(t) = target
            && !observe.has_samples(&t.id)
        {
            match observe.sample(&t).await {
                Ok(s) if s.timestamp_unix_ms >= req.start_unix_ms => {
                    return Ok(MetricsResponse { samples: vec![s] });
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(sandbox_id = %t.id, error = ?e, "on-demand sample"),
            }
        }
        Ok(MetricsResponse {
            samples: observe.samples(&req.sandbox_id, req.start_unix_ms, req.end_unix_ms),
        })
    }

    /// `Logs`: up to `limit` entries (default 100, at most 1000) from `start_unix_ms` on,
    /// oldest first: the guest console's lines and the agent's lifecycle events. `follow` is
    /// not supported: the answer is what is there now (the control plane never follows).
    pub(crate) async fn logs(&self, req: &LogsRequest) -> Result<Vec<LogEntry>, ControlError> {
        let observe = &self.runtime().observe;
        if self.observe_target(&req.sandbox_id)?.is_some() {
            observe.catch_up(&req.sandbox_id).await;
        }
        Ok(observe.logs(&req.sandbox_id, req.start_unix_ms, req.limit))
    }
}

/// Samples every running sandbox of `agent` each [`SAMPLE_INTERVAL`] and reads its console;
/// ends when the agent is dropped. Failures are skipped (a sandbox being paused or killed
/// fails a sample now and then).
pub(crate) async fn sampler(agent: Weak<Agent>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut fetches = tokio::task::JoinSet::new();
        {
            let Some(a) = agent.upgrade() else {
                return;
            };
            let (ids, targets) = a.controller().map_running(|id, sb| Target::of(id, sb));
            let observe = &a.runtime().observe;
            observe.retain(&ids.into_iter().collect());
            for t in &targets {
                // A few milliseconds each (a QMP command), bounded by its own timeout.
                observe.catch_up(&t.id).await;
            }
            for t in targets {
                let Some((generation, token)) = observe.token_of(&t.id) else {
                    continue;
                };
                let http = observe.http.clone();
                fetches.spawn(async move {
                    let r = fetch(&http, &t.envd_url, token.as_deref()).await;
                    (t.id, generation, r)
                });
            }
            // The agent is not kept alive while the metrics requests run.
        }
        while let Some(done) = fetches.join_next().await {
            let Ok((id, generation, result)) = done else {
                continue;
            };
            match result {
                Ok(s) => {
                    if let Some(a) = agent.upgrade() {
                        a.runtime().observe.record(&id, generation, s);
                    }
                }
                Err(e) => tracing::debug!(sandbox_id = %id, error = ?e, "metrics sample"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ts: i64) -> MetricSample {
        MetricSample {
            timestamp_unix_ms: ts,
            cpu_count: 1,
            ..Default::default()
        }
    }

    fn entry(ts: i64, msg: &str) -> LogEntry {
        LogEntry {
            timestamp_unix_ms: ts,
            message: msg.into(),
            ..Default::default()
        }
    }

    #[test]
    fn ring_drops_the_oldest() {
        let mut r = Ring::new(3);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [2, 3, 4]);
        let mut big = Ring::new(MAX_SAMPLES);
        for i in 0..2000 {
            big.push(sample(i));
        }
        assert_eq!(big.items.len(), MAX_SAMPLES);
        assert_eq!(big.items[0].timestamp_unix_ms, 2000 - MAX_SAMPLES as i64);
    }

    #[test]
    fn filters_samples_by_time() {
        let mut r = Ring::new(10);
        for ts in [1000, 2000, 3000, 4000] {
            r.push(sample(ts));
        }
        let ts = |v: Vec<MetricSample>| v.iter().map(|s| s.timestamp_unix_ms).collect::<Vec<_>>();
        assert_eq!(ts(in_range(&r, 0, 0)), [1000, 2000, 3000, 4000]);
        assert_eq!(ts(in_range(&r, 2000, 3000)), [2000, 3000]);
        assert_eq!(ts(in_range(&r, 2500, 0)), [3000, 4000]);
        assert_eq!(ts(in_range(&r, 0, 1500)), [1000]);
        assert!(in_range(&r, 5000, 0).is_empty());
    }

    #[test]
    fn pages_logs() {
        let mut r = Ring::new(MAX_LOG_ENTRIES);
        for i in 0..1500 {
            r.push(entry(i, &format!("line {i}")));
        }
        assert_eq!(page(&r, 0, 0).len(), 100);
        assert_eq!(page(&r, 0, 5000).len(), 1000);
        let p = page(&r, 1490, 5);
        assert_eq!(
            p.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            [
                "line 1490",
                "line 1491",
                "line 1492",
                "line 1493",
                "line 1494"
            ]
        );
        assert!(page(&r, 10_000, 10).is_empty());
    }

    #[test]
    fn cleans_console_lines() {
        assert_eq!(
            clean_line(b"\x1b[2m2025-01-01T00:00:00Z\x1b[0m \x1b[32m INFO\x1b[0m envd: resumed\r"),
            "2025-01-01T00:00:00Z  INFO envd: resumed"
        );
        assert_eq!(clean_line(b"a\tb\x07c \xff"), "a\tbc \u{fffd}");
        assert_eq!(level_of("2025-01-01T00:00:00Z  WARN envd: x"), "warn");
        assert_eq!(level_of("2025-01-01T00:00:00Z ERROR envd: x"), "error");
        assert_eq!(level_of("[    0.000000] Linux version 6.1"), "info");
        assert_eq!(level_of("2025-01-01T00:00:00.1Z DEBUG envd: x"), "debug");
        assert_eq!(level_of("an ERROR said in passing"), "info");
    }

    #[test]
    fn splits_partial_lines() {
        let mut partial = Vec::new();
        assert_eq!(split_lines(&mut partial, b"one\ntw"), ["one"]);
        assert_eq!(split_lines(&mut partial, b"o\nthree\n"), ["two", "three"]);
        assert!(partial.is_empty());
        let long = vec![b'x'; MAX_LINE + 10];
        let lines = split_lines(&mut partial, &long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(partial.len(), 10);
    }

    #[tokio::test]
    async fn an_endless_metrics_body_is_an_error_with_memory_bounded() {
        let (addr, sent) = crate::envd::tests::endless_server(200).await;
        let before = crate::envd::tests::rss();
        let http = Observer::default().http;
        let t = std::time::Instant::now();
        let e = fetch(&http, &format!("http://{addr}"), None)
            .await
            .unwrap_err();
        let chain = crate::error_chain(&e);
        assert!(chain.contains("longer than 65536 bytes"), "{chain}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = sent.load(Ordering::Relaxed);
        assert!(
            n < 32 << 20,
            "{n} bytes went out before the sampler hung up"
        );
        let grew = crate::envd::tests::rss().saturating_sub(before);
        assert!(grew < 32 << 20, "RSS grew by {grew}");
    }

    #[test]
    fn console_chunks_become_lines() {
        let mut o = Observed::new(1);
        o.console_lines(b"boot 1\nboot 2\npart", false);
        o.console_lines(b"ial\n\nmore\nno end", false);
        let msgs: Vec<String> = o.logs.iter().map(|e| e.message.clone()).collect();
        assert_eq!(msgs, ["boot 1", "boot 2", "partial", "more"]);
        o.console_lines(&[], true);
        assert_eq!(o.logs.iter().last().unwrap().message, "no end");
        assert!(o.partial.is_empty());
        // A flood keeps only the newest MAX_LOG_ENTRIES lines of at most MAX_LINE bytes.
        let flood = ("y".repeat(MAX_LINE * 2) + "\n").repeat(MAX_LOG_ENTRIES);
        o.console_lines(flood.as_bytes(), false);
        assert_eq!(o.logs.items.len(), MAX_LOG_ENTRIES);
        assert!(o.logs.iter().all(|e| e.message.len() <= MAX_LINE));
    }

    /// A QMP peer answering `ringbuf-read` with `chunks`, one per read, then nothing.
    async fn fake_console(chunks: Vec<&'static [u8]>) -> Console {
        use base64::Engine as _;
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (r, mut w) = theirs.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut chunks = chunks.into_iter();
            while let Ok(Some(line)) = lines.next_line().await {
                let cmd: serde_json::Value = serde_json::from_str(&line).unwrap();
                let ret = match cmd["execute"].as_str() {
                    Some("ringbuf-read") => serde_json::Value::String(
                        base64::engine::general_purpose::STANDARD
                            .encode(chunks.next().unwrap_or_default()),
                    ),
                    _ => serde_json::json!({}),
                };
                let reply = serde_json::json!({ "return": ret, "id": cmd["id"] });
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        });
        let qmp = wrenn_qmp::Qmp::handshake(ours).await.unwrap();
        Console::over(std::sync::Arc::new(qmp))
    }

    #[tokio::test]
    async fn observer_logs_events_in_order_and_forgets() {
        let o = Observer::default();
        let console = fake_console(vec![b"guest says hi\n\n", b"bye without newline"]).await;
        o.started("sb", Some("tok".into()), console, "created")
            .await;
        let (generation, token) = o.token_of("sb").unwrap();
        assert_eq!(token.as_deref(), Some("tok"));
        o.catch_up("sb").await;
        o.paused("sb");
        let logs = o.logs("sb", 0, 0);
        let msgs: Vec<&str> = logs.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "guest says hi",
                "sandbox created",
                "bye without newline",
                "sandbox paused"
            ]
        );
        assert_eq!(
            logs[1].fields.get("event").map(String::as_str),
            Some("created")
        );
        assert_eq!(
            logs[0].fields.get("source").map(String::as_str),
            Some("console")
        );
        assert!(
            logs.windows(2)
                .all(|w| w[0].timestamp_unix_ms <= w[1].timestamp_unix_ms)
        );
        // Paused: no console to read any more.
        o.catch_up("sb").await;
        assert_eq!(o.logs("sb", 0, 0).len(), 4);
        // A sample stored for this generation stays; one for an older generation does not.
        o.record("sb", generation, sample(now_ms()));
        o.record("sb", generation + 100, sample(now_ms()));
        assert_eq!(o.samples("sb", 0, 0).len(), 1);
        // Paused samples survive; forgetting (a kill) drops everything.
        o.forget("sb");
        assert!(o.logs("sb", 0, 0).is_empty());
        assert!(o.samples("sb", 0, 0).is_empty());
        // A new sandbox with the same ID ignores the old generation's late sample.
        o.started("sb", None, fake_console(vec![]).await, "created")
            .await;
        o.record("sb", generation, sample(now_ms()));
        assert!(!o.has_samples("sb"));
        o.retain(&HashSet::new());
        assert!(o.token_of("sb").is_none());
    }
}
