//! Progress of a long build, as events: the builder says what it is doing and the caller decides
//! how to show it (a spinner on a terminal, lines in a log, nothing). Every event is also a
//! `tracing` event where it matters (phase ends), so a quiet caller still has a record.

use std::time::{Duration, Instant};

use crate::ImageError;

/// What a build reports while it runs. Only a build that misses the cache reports anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A sentence for whoever waits: that a long build starts, or that it is done.
    Note(String),
    /// A phase began.
    PhaseStarted {
        /// The phase, e.g. `debootstrap` or `mkfs.ext4`.
        phase: &'static str,
    },
    /// A line from inside a phase: a step it takes, or a line of a tool's output (debootstrap
    /// prints one per package, so a log may want to thin them out).
    Log {
        /// The phase.
        phase: &'static str,
        /// The line, without its newline.
        line: String,
    },
    /// A phase ended well.
    PhaseFinished {
        /// The phase.
        phase: &'static str,
        /// How long it took.
        elapsed: Duration,
        /// What it made, in a few words.
        detail: String,
    },
    /// A phase failed; the build returns the error that says why.
    PhaseFailed {
        /// The phase.
        phase: &'static str,
        /// How long it ran.
        elapsed: Duration,
    },
}

/// Sends a build's events to the caller's callback.
pub(crate) struct Reporter<'a> {
    sink: &'a mut dyn FnMut(Progress),
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(sink: &'a mut dyn FnMut(Progress)) -> Self {
        Self { sink }
    }

    pub(crate) fn note(&mut self, text: String) {
        tracing::info!("{text}");
        (self.sink)(Progress::Note(text));
    }

    /// Runs one phase: reports its start, the lines `work` logs, then its end with the detail
    /// `work` returns beside its value, or its failure.
    pub(crate) fn phase<T>(
        &mut self,
        phase: &'static str,
        work: impl FnOnce(&mut dyn FnMut(&str)) -> Result<(T, String), ImageError>,
    ) -> Result<T, ImageError> {
        (self.sink)(Progress::PhaseStarted { phase });
        let started = Instant::now();
        let result = work(&mut |line: &str| {
            (self.sink)(Progress::Log {
                phase,
                line: line.to_owned(),
            });
        });
        let elapsed = started.elapsed();
        match result {
            Ok((value, detail)) => {
                tracing::info!(phase, secs = elapsed.as_secs_f64(), "{detail}");
                (self.sink)(Progress::PhaseFinished {
                    phase,
                    elapsed,
                    detail,
                });
                Ok(value)
            }
            Err(e) => {
                (self.sink)(Progress::PhaseFailed { phase, elapsed });
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn without_times(events: Vec<Progress>) -> Vec<Progress> {
        events
            .into_iter()
            .map(|e| match e {
                Progress::PhaseFinished { phase, detail, .. } => Progress::PhaseFinished {
                    phase,
                    elapsed: Duration::ZERO,
                    detail,
                },
                Progress::PhaseFailed { phase, .. } => Progress::PhaseFailed {
                    phase,
                    elapsed: Duration::ZERO,
                },
                other => other,
            })
            .collect()
    }

    #[test]
    fn phases_report_start_lines_and_end() {
        let mut events = Vec::new();
        let mut sink = |e| events.push(e);
        let mut report = Reporter::new(&mut sink);
        report.note("building".into());
        let n = report
            .phase("one", |log| {
                log("step a");
                Ok((7, "made 7".into()))
            })
            .unwrap();
        assert_eq!(n, 7);
        let failed: Result<(), _> = report.phase("two", |_| Err(ImageError::NoKernel("/k".into())));
        assert!(failed.is_err());
        let log = |line: &str| Progress::Log {
            phase: "one",
            line: line.into(),
        };
        assert_eq!(
            without_times(events),
            vec![
                Progress::Note("building".into()),
                Progress::PhaseStarted { phase: "one" },
                log("step a"),
                Progress::PhaseFinished {
                    phase: "one",
                    elapsed: Duration::ZERO,
                    detail: "made 7".into()
                },
                Progress::PhaseStarted { phase: "two" },
                Progress::PhaseFailed {
                    phase: "two",
                    elapsed: Duration::ZERO
                },
            ]
        );
    }
}
