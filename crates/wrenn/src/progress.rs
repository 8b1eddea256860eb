//! Shows the progress events of an image build (`wrenn_image::Progress`) on stderr: a spinner
//! per phase on a terminal, plain lines otherwise (CI logs), or nothing.
//!
//! Plain mode thins a tool's output out: a line is printed when its kind (its first two words,
//! e.g. `I: Retrieving`) is new, or when nothing was printed for a while, so a log gets
//! debootstrap's stages without one line per package.

use std::collections::HashSet;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use wrenn_image::Progress;

/// Plain output prints a repeated kind of line at most this often.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// How a build shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ProgressMode {
    /// Spinners when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// A spinner per phase on stderr.
    Spinner,
    /// One line per step on stderr (for logs).
    Plain,
    /// Nothing (only `tracing` events).
    Quiet,
}

impl ProgressMode {
    /// `spinner`, `plain` or `quiet`; anything else is `auto`.
    pub(crate) fn from_arg(arg: &str) -> Self {
        match arg {
            "spinner" => Self::Spinner,
            "plain" => Self::Plain,
            "quiet" => Self::Quiet,
            _ => Self::Auto,
        }
    }
}

/// Renders one build's events; feed it every event with [`Renderer::show`].
pub(crate) struct Renderer {
    mode: ProgressMode,
    phase: Option<Phase>,
}

/// The phase on screen.
struct Phase {
    name: &'static str,
    bar: Option<ProgressBar>,
    started: Instant,
    /// Plain mode: the kinds of line printed so far.
    seen_kinds: HashSet<String>,
    last_print: Instant,
}

impl Renderer {
    pub(crate) fn new(mode: ProgressMode) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Spinner,
            ProgressMode::Auto => ProgressMode::Plain,
            other => other,
        };
        Self { mode, phase: None }
    }

    pub(crate) fn show(&mut self, event: Progress) {
        if self.mode == ProgressMode::Quiet {
            return;
        }
        match event {
            Progress::Note(text) => eprintln!("{text}"),
            Progress::PhaseStarted { phase } => self.start(phase),
            Progress::Log { phase, line } => self.log(phase, &line),
            Progress::PhaseFinished {
                phase,
                elapsed,
                detail,
            } => self.end(
                phase,
                format!("done in {:.1} s ({detail})", elapsed.as_secs_f64()),
                false,
            ),
            Progress::PhaseFailed { phase, elapsed } => self.end(
                phase,
                format!("failed after {:.1} s", elapsed.as_secs_f64()),
                true,
            ),
        }
    }

    fn start(&mut self, name: &'static str) {
        let bar = (self.mode == ProgressMode::Spinner).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} [{elapsed:>4}] {prefix:.bold}: {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(name);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if self.mode == ProgressMode::Plain {
            eprintln!("[{name}] started");
        }
        self.phase = Some(Phase {
            name,
            bar,
            started: Instant::now(),
            seen_kinds: HashSet::new(),
            last_print: Instant::now(),
        });
    }

    fn log(&mut self, name: &'static str, line: &str) {
        let Some(phase) = self.phase.as_mut().filter(|p| p.name == name) else {
            return;
        };
        if let Some(bar) = &phase.bar {
            bar.set_message(line.to_owned());
            return;
        }
        let kind: String = line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let new_kind = phase.seen_kinds.insert(kind);
        if new_kind || phase.last_print.elapsed() >= PLAIN_INTERVAL {
            eprintln!(
                "[{name} {:>5.1}s] {line}",
                phase.started.elapsed().as_secs_f64()
            );
            phase.last_print = Instant::now();
        }
    }

    fn end(&mut self, name: &'static str, text: String, failed: bool) {
        let bar = self.phase.take_if(|p| p.name == name).and_then(|p| p.bar);
        match bar {
            Some(bar) if failed => bar.abandon_with_message(text),
            Some(bar) => bar.finish_with_message(text),
            None => eprintln!("[{name}] {text}"),
        }
    }
}

impl Drop for Renderer {
    /// A build that ended without closing its phase (a panic) leaves no spinner ticking.
    fn drop(&mut self) {
        if let Some(bar) = self.phase.take().and_then(|p| p.bar) {
            bar.abandon();
        }
    }
}
