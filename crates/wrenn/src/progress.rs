//! Shows the progress events of an image build (`wrenn_image::Progress`) on stderr: a spinner
//! per phase on a terminal, plain lines otherwise (CI logs), or nothing.
//!
//! Plain mode thins a tool's output out: a line is printed when its kind (its first two words,
//! e.g. `I: Retrieving`) is new, or when nothing was printed for a while, so a log gets
//! debootstrap's stages without one line per package.

use std::collections::HashSet;
use std::io::{IsTerminal as _, Write};
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
    /// Where lines go (stderr; a buffer in tests). Spinners draw on stderr themselves.
    out: Box<dyn Write + Send>,
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
        Self {
            mode,
            phase: None,
            out: Box::new(std::io::stderr()),
        }
    }

    /// Prints a line; a closed stderr is no reason to fail a build.
    fn line(&mut self, text: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "{text}");
    }

    pub(crate) fn show(&mut self, event: Progress) {
        if self.mode == ProgressMode::Quiet {
            return;
        }
        match event {
            Progress::Note(text) => self.line(format_args!("{text}")),
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
            self.line(format_args!("[{name}] started"));
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
            phase.last_print = Instant::now();
            let secs = phase.started.elapsed().as_secs_f64();
            let _ = writeln!(self.out, "[{name} {secs:>5.1}s] {line}");
        }
    }

    fn end(&mut self, name: &'static str, text: String, failed: bool) {
        let bar = self.phase.take_if(|p| p.name == name).and_then(|p| p.bar);
        match bar {
            Some(bar) if failed => bar.abandon_with_message(text),
            Some(bar) => bar.finish_with_message(text),
            None => self.line(format_args!("[{name}] {text}")),
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `mode` prints for `events`, with log lines' running times (which a test cannot
    /// know) cut out.
    fn render(mode: ProgressMode, events: Vec<Progress>) -> Vec<String> {
        let buffer = Buffer::default();
        let mut renderer = Renderer::new(mode);
        renderer.out = Box::new(buffer.clone());
        for event in events {
            renderer.show(event);
        }
        drop(renderer);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| match l.split_once("s] ") {
                Some((head, rest)) if head.contains(' ') => {
                    format!("{}] {rest}", head.split(' ').next().unwrap())
                }
                _ => l.to_owned(),
            })
            .collect()
    }

    fn events() -> Vec<Progress> {
        let log = |line: &str| Progress::Log {
            phase: "debootstrap",
            line: line.into(),
        };
        vec![
            Progress::Note("building the image".into()),
            Progress::PhaseStarted {
                phase: "debootstrap",
            },
            log("I: Retrieving InRelease"),
            log("I: Retrieving Packages"),
            log("I: Validating Packages"),
            Progress::PhaseFinished {
                phase: "debootstrap",
                elapsed: Duration::from_millis(65_400),
                detail: "bookworm from http://mirror.example/debian".into(),
            },
            Progress::PhaseStarted { phase: "mkfs.ext4" },
            Progress::PhaseFailed {
                phase: "mkfs.ext4",
                elapsed: Duration::from_millis(1_200),
            },
        ]
    }

    #[test]
    fn plain_lines_thin_out_repeated_kinds() {
        assert_eq!(
            render(ProgressMode::Plain, events()),
            [
                "building the image",
                "[debootstrap] started",
                "[debootstrap] I: Retrieving InRelease",
                "[debootstrap] I: Validating Packages",
                "[debootstrap] done in 65.4 s (bookworm from http://mirror.example/debian)",
                "[mkfs.ext4] started",
                "[mkfs.ext4] failed after 1.2 s",
            ]
        );
    }

    #[test]
    fn quiet_prints_nothing_and_spinners_print_only_notes() {
        assert!(render(ProgressMode::Quiet, events()).is_empty());
        // Spinners draw on stderr by themselves (nothing when it is no terminal).
        assert_eq!(
            render(ProgressMode::Spinner, events()),
            ["building the image"]
        );
    }
}
