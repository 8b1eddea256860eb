//! Creates through the REST API, timed from the client: one at a time, several at once, for a
//! fixed time, and until the host is full. Every sandbox made here is tracked until it is
//! killed, so the bench can clean up whatever happens to it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use reqwest::StatusCode;
use serde_json::json;

use super::super::api::Api;

/// How long one create may take before the bench gives up on it.
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds a bench sandbox lives at most if the bench (and its clean-up) died.
const SANDBOX_TIMEOUT_S: i64 = 900;
/// The metadata key every bench sandbox carries, valued with the run's ID.
pub(super) const RUN_KEY: &str = "wrenn-bench";

/// Why a create failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CreateError {
    #[error("create answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("create request failed")]
    Transport(#[source] reqwest::Error),
    #[error("create answered without a sandboxID")]
    NoId,
}

impl CreateError {
    /// The host refused for lack of room (admission), rather than failing.
    pub(super) fn is_full(&self) -> bool {
        matches!(self, CreateError::Status { status: 503, .. })
    }
}

/// The sandboxes made and not yet killed.
#[derive(Debug, Clone, Default)]
pub(super) struct Tracker(Arc<Mutex<BTreeSet<String>>>);

impl Tracker {
    pub(super) fn add(&self, id: &str) {
        self.lock().insert(id.to_owned());
    }
    pub(super) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
    pub(super) fn ids(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One timed create.
#[derive(Debug, Clone)]
pub(super) struct Created {
    pub(super) id: String,
    pub(super) ms: f64,
    /// The response's `Server-Timing`, in order.
    pub(super) stages: Vec<(String, f64)>,
}

/// A REST client for the bench's creates and kills.
#[derive(Debug, Clone)]
pub(super) struct Rest {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    template: String,
    run_id: String,
    api: Api,
    pub(super) tracker: Tracker,
}

impl Rest {
    pub(super) fn new(
        base: &str,
        key: Option<String>,
        template: &str,
        run_id: &str,
        api: Api,
    ) -> anyhow::Result<Rest> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(CREATE_TIMEOUT)
            .user_agent(concat!("wrenn-bench/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Rest {
            http,
            base: base.to_owned(),
            key,
            template: template.to_owned(),
            run_id: run_id.to_owned(),
            api,
            tracker: Tracker::default(),
        })
    }

    /// The template sandboxes are made from.
    pub(super) fn template(&self) -> &str {
        &self.template
    }

    /// `POST /v2/sandboxes`, timed to the last byte of the answer.
    pub(super) async fn create(&self) -> Result<Created, CreateError> {
        let body = json!({
            "templateID": self.template,
            "timeout": SANDBOX_TIMEOUT_S,
            "metadata": {RUN_KEY: self.run_id},
        });
        let mut req = self
            .http
            .post(format!("{}/v2/sandboxes", self.base))
            .json(&body);
        if let Some(k) = &self.key {
            req = req.header(wrenn_api::API_KEY_HEADER, k);
        }
        let start = Instant::now();
        let resp = req.send().await.map_err(CreateError::Transport)?;
        let status = resp.status();
        let stages = resp
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(parse_server_timing)
            .unwrap_or_default();
        let bytes = resp.bytes().await.map_err(CreateError::Transport)?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status != StatusCode::CREATED {
            let message = value["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CreateError::Status {
                status: status.as_u16(),
                message,
            });
        }
        let id = value["sandboxID"]
            .as_str()
            .ok_or(CreateError::NoId)?
            .to_owned();
        self.tracker.add(&id);
        Ok(Created { id, ms, stages })
    }

    /// Kills a sandbox this bench made; one already gone counts as killed.
    pub(super) async fn kill(&self, id: &str) -> anyhow::Result<()> {
        match self.api.kill(id).await {
            Ok(()) | Err(super::super::api::ApiError::SandboxNotFound(_)) => {
                self.tracker.remove(id);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Kills every tracked sandbox and every sandbox carrying this run's metadata (one the
    /// SDK driver made but did not report, say), a few at a time. Answers how many were
    /// killed and the errors of those that could not be.
    pub(super) async fn kill_all(&self) -> (usize, Vec<String>) {
        let mut ids: BTreeSet<String> = self.tracker.ids().into_iter().collect();
        let tagged = self
            .api
            .list(&[], &[(RUN_KEY.to_owned(), self.run_id.clone())], None)
            .await;
        match tagged {
            Ok(list) => ids.extend(
                list.iter()
                    .filter_map(|s| s["sandboxID"].as_str())
                    .map(str::to_owned),
            ),
            Err(e) => tracing::warn!(error = %e, "list this run's sandboxes"),
        }
        let results: Vec<_> = futures::stream::iter(ids)
            .map(|id| async move { (self.kill(&id).await, id) })
            .buffer_unordered(4)
            .collect()
            .await;
        let mut killed = 0;
        let mut errors = Vec::new();
        for (r, id) in results {
            match r {
                Ok(()) => killed += 1,
                Err(e) => errors.push(format!("{id}: {e:#}")),
            }
        }
        (killed, errors)
    }
}

/// The metrics of a `Server-Timing` value (`name;dur=1.2, other;desc="x";dur=3`), in order;
/// metrics without a duration are left out.
pub(super) fn parse_server_timing(v: &str) -> Vec<(String, f64)> {
    v.split(',')
        .filter_map(|metric| {
            let mut parts = metric.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?;
            let dur = parts.find_map(|p| p.strip_prefix("dur="))?;
            Some((name.to_owned(), dur.trim_matches('"').parse().ok()?))
        })
        .collect()
}

/// Timed creates at a concurrency, each sandbox killed after it was made.
#[derive(Debug, Default)]
pub(super) struct Burst {
    pub(super) created: Vec<Created>,
    pub(super) errors: Vec<String>,
    /// Completion times since the start, seconds.
    pub(super) done_at: Vec<f64>,
    pub(super) wall_s: f64,
}

/// Runs `total` creates (or, with `for_time`, as many as start within it), `concurrency` at
/// a time; each worker kills its sandbox before its next create.
pub(super) async fn burst(
    rest: &Rest,
    concurrency: usize,
    total: usize,
    for_time: Option<Duration>,
) -> Burst {
    let started = AtomicUsize::new(0);
    let start = Instant::now();
    let results = Arc::new(Mutex::new(Burst::default()));
    let worker = |_| {
        let (started, results) = (&started, results.clone());
        async move {
            loop {
                let more = match for_time {
                    Some(d) => start.elapsed() < d,
                    None => started.fetch_add(1, Ordering::SeqCst) < total,
                };
                if !more {
                    return;
                }
                let outcome = rest.create().await;
                let at = start.elapsed().as_secs_f64();
                let kill = match outcome {
                    Ok(c) => {
                        let id = c.id.clone();
                        let mut r = lock(&results);
                        r.created.push(c);
                        r.done_at.push(at);
                        Some(id)
                    }
                    Err(e) => {
                        let mut r = lock(&results);
                        r.errors.push(format!("{e:#}"));
                        // A host that fails every create would spin: give up after a few.
                        if r.errors.len() > 8 {
                            return;
                        }
                        None
                    }
                };
                if let Some(id) = kill
                    && let Err(e) = rest.kill(&id).await
                {
                    lock(&results).errors.push(format!("kill {id}: {e:#}"));
                }
            }
        }
    };
    futures::future::join_all((0..concurrency).map(worker)).await;
    let mut out = std::mem::take(&mut *lock(&results));
    out.wall_s = start.elapsed().as_secs_f64();
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates per second in each full `window` of a run, from the completion times.
pub(super) fn rates(done_at: &[f64], wall_s: f64, window_s: f64) -> Vec<f64> {
    let windows = (wall_s / window_s).floor() as usize;
    (0..windows)
        .map(|w| {
            let (lo, hi) = (w as f64 * window_s, (w + 1) as f64 * window_s);
            done_at.iter().filter(|t| **t >= lo && **t < hi).count() as f64 / window_s
        })
        .collect()
}

/// How many sandboxes the host held before a create failed or was slow.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Held {
    /// Alive, each created within the limit.
    pub(super) count: usize,
    /// Why the probe stopped.
    pub(super) stopped: String,
    /// Every create's time, in order (the slow one included).
    pub(super) create_ms: Vec<f64>,
}

/// Creates sandboxes one after another, keeping them, until one fails, takes longer than
/// `limit`, or `cap` are alive. The sandboxes stay (tracked) for the caller to measure and kill.
pub(super) async fn probe_capacity(rest: &Rest, cap: usize, limit: Duration) -> Held {
    let mut held = Held {
        count: 0,
        stopped: format!("reached the cap of {cap} (--capacity-cap)"),
        create_ms: Vec::new(),
    };
    while held.count < cap {
        match rest.create().await {
            Ok(c) => {
                held.create_ms.push(c.ms);
                if c.ms > limit.as_secs_f64() * 1000.0 {
                    held.stopped = format!(
                        "create {} took {:.0} ms (limit {} ms)",
                        held.count + 1,
                        c.ms,
                        limit.as_millis()
                    );
                    return held;
                }
                held.count += 1;
            }
            Err(e) => {
                held.stopped = if e.is_full() {
                    format!("create {} refused: the host is full ({e})", held.count + 1)
                } else {
                    format!("create {} failed: {e:#}", held.count + 1)
                };
                return held;
            }
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_is_parsed_in_order() {
        let v =
            "placement;dur=1.2, restore;desc=\"QEMU\";dur=20.5,nodur, envd;dur=\"3\", bad;dur=x";
        assert_eq!(
            parse_server_timing(v),
            [
                ("placement".to_owned(), 1.2),
                ("restore".to_owned(), 20.5),
                ("envd".to_owned(), 3.0)
            ]
        );
        assert!(parse_server_timing("").is_empty());
    }

    #[test]
    fn rates_count_full_windows_only() {
        let done = [0.1, 0.2, 4.9, 5.0, 7.0, 10.5];
        assert_eq!(rates(&done, 11.0, 5.0), [0.6, 0.4]);
        assert!(rates(&done, 4.0, 5.0).is_empty());
    }
}
