//! Exit statuses in the words of Go's `os.ProcessState.String()`, which the SDKs show users.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use wrenn_proto::process::process_event::EndEvent;

/// The `end` event for a process that finished with `status`.
///
/// Like upstream envd: `exitCode` is -1 and `exited` false when a signal ended the process, and
/// `error` carries the text Go's `cmd.Wait()` error would have (the status, when not a clean exit).
pub(crate) fn end_event(status: ExitStatus) -> EndEvent {
    let text = describe(status);
    let clean = status.code() == Some(0);
    EndEvent {
        exit_code: status.code().unwrap_or(-1),
        exited: status.code().is_some(),
        error: (!clean).then(|| text.clone()),
        status: text,
    }
}

/// The `end` event when waiting for the process itself failed.
pub(crate) fn wait_failed(err: &std::io::Error) -> EndEvent {
    EndEvent {
        exit_code: -1,
        exited: false,
        status: String::new(),
        error: Some(format!("wait: {err}")),
    }
}

fn describe(status: ExitStatus) -> String {
    let mut text = if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        format!("signal: {}", signal_name(sig))
    } else if let Some(sig) = status.stopped_signal() {
        format!("stop signal: {}", signal_name(sig))
    } else if status.continued() {
        "continued".to_owned()
    } else {
        format!("unknown status {}", status.into_raw())
    };
    if status.core_dumped() {
        text.push_str(" (core dumped)");
    }
    text
}

/// Go's `syscall.Signal.String()` on Linux.
fn signal_name(sig: i32) -> String {
    const NAMES: [&str; 31] = [
        "hangup",
        "interrupt",
        "quit",
        "illegal instruction",
        "trace/breakpoint trap",
        "aborted",
        "bus error",
        "floating point exception",
        "killed",
        "user defined signal 1",
        "segmentation fault",
        "user defined signal 2",
        "broken pipe",
        "alarm clock",
        "terminated",
        "stack fault",
        "child exited",
        "continued",
        "stopped (signal)",
        "stopped",
        "stopped (tty input)",
        "stopped (tty output)",
        "urgent I/O condition",
        "CPU time limit exceeded",
        "file size limit exceeded",
        "virtual timer expired",
        "profiling timer expired",
        "window changed",
        "I/O possible",
        "power failure",
        "bad system call",
    ];
    usize::try_from(sig)
        .ok()
        .and_then(|s| s.checked_sub(1))
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("signal {sig}"), |n| (*n).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_go_process_state_strings() {
        let exit1 = end_event(ExitStatus::from_raw(1 << 8));
        assert_eq!(
            (exit1.exit_code, exit1.exited, exit1.status.as_str()),
            (1, true, "exit status 1")
        );
        assert_eq!(exit1.error.as_deref(), Some("exit status 1"));

        let ok = end_event(ExitStatus::from_raw(0));
        assert_eq!(
            (ok.exit_code, ok.exited, ok.status.as_str(), ok.error),
            (0, true, "exit status 0", None)
        );

        let killed = end_event(ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!(
            (killed.exit_code, killed.exited, killed.status.as_str()),
            (-1, false, "signal: killed")
        );

        let segv_core = end_event(ExitStatus::from_raw(libc::SIGSEGV | 0x80));
        assert_eq!(segv_core.status, "signal: segmentation fault (core dumped)");
        assert_eq!(signal_name(64), "signal 64");
    }
}
