//! The official Python SDK's part of the bench: `bench/sdk_bench.py` run as a child process,
//! its JSON lines read as they come (samples, and the sandboxes it made and killed, so that
//! the bench cleans up after a driver that died).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use serde::Deserialize;
use tokio::io::AsyncBufReadExt;

use super::rest::Tracker;

/// How to run the driver.
#[derive(Debug, Clone)]
pub(super) struct Driver {
    pub(super) python: PathBuf,
    pub(super) script: PathBuf,
    pub(super) args: Vec<String>,
    /// Environment for the SDK (`E2B_*`, the run's ID).
    pub(super) env: Vec<(String, String)>,
}

/// One line of the driver's output.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    Info { e2b_version: String },
    Created { id: String },
    Killed { id: String },
    Sample { metric: String, ms: f64 },
    Error { message: String },
}

/// What the driver measured.
#[derive(Debug, Default, PartialEq)]
pub(super) struct SdkResults {
    pub(super) e2b_version: Option<String>,
    /// Milliseconds by metric, in the order they came.
    pub(super) samples: BTreeMap<String, Vec<f64>>,
    /// Set when the driver failed (its own message, or how it exited).
    pub(super) error: Option<String>,
}

impl SdkResults {
    /// Folds one output line in; lines that are not the driver's JSON are reported and
    /// skipped (a library printing to stdout must not end the bench).
    fn take(&mut self, line: &str, tracker: &Tracker) {
        match serde_json::from_str::<Line>(line) {
            Ok(Line::Info { e2b_version }) => self.e2b_version = Some(e2b_version),
            Ok(Line::Created { id }) => tracker.add(&id),
            Ok(Line::Killed { id }) => tracker.remove(&id),
            Ok(Line::Sample { metric, ms }) => self.samples.entry(metric).or_default().push(ms),
            Ok(Line::Error { message }) => self.error = Some(message),
            Err(_) => tracing::warn!(%line, "not a line of the SDK driver; skipped"),
        }
    }
}

/// Runs the driver to its end. Dropping the future (Ctrl-C) kills it; the caller's clean-up
/// then kills what it made.
pub(super) async fn run(driver: &Driver, tracker: &Tracker) -> anyhow::Result<SdkResults> {
    let mut child = tokio::process::Command::new(&driver.python)
        .arg(&driver.script)
        .args(&driver.args)
        .envs(driver.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "run {} {} (--python: a Python with the e2b package)",
                driver.python.display(),
                driver.script.display()
            )
        })?;
    let stdout = child.stdout.take().context("the driver's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut results = SdkResults::default();
    while let Some(line) = lines
        .next_line()
        .await
        .context("read the driver's output")?
    {
        results.take(&line, tracker);
    }
    let status = child.wait().await.context("wait for the driver")?;
    if !status.success() && results.error.is_none() {
        results.error = Some(format!("the SDK driver exited with {status}"));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_lines_fold_into_results_and_the_tracker() {
        let tracker = Tracker::default();
        let mut r = SdkResults::default();
        for line in [
            r#"{"kind": "info", "e2b_version": "2.63.0"}"#,
            r#"{"kind": "created", "id": "a"}"#,
            r#"{"kind": "created", "id": "b"}"#,
            r#"{"kind": "sample", "metric": "ttfc", "ms": 800.5}"#,
            r#"{"kind": "sample", "metric": "ttfc", "ms": 700}"#,
            "some library's chatter",
            r#"{"kind": "killed", "id": "a"}"#,
            r#"{"kind": "error", "message": "AssertionError: x"}"#,
        ] {
            r.take(line, &tracker);
        }
        assert_eq!(r.e2b_version.as_deref(), Some("2.63.0"));
        assert_eq!(r.samples["ttfc"], [800.5, 700.0]);
        assert_eq!(r.error.as_deref(), Some("AssertionError: x"));
        assert_eq!(tracker.ids(), ["b"]);
    }
}
