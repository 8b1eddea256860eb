//! The wire: what the E2B code-interpreter SDKs send and read, and what the Python worker
//! sends the server.
//!
//! `/execute` answers with one JSON object a line, exactly as E2B's server streams them:
//! `number_of_executions`, then `stdout`/`stderr`/`result`/`error` as the cell produces them,
//! `keepalive` after every few idle seconds, and `end_of_execution` last. Absent fields are
//! left out (E2B dumps its models with `exclude_none`); `extra` and `is_main_result` are
//! always there. Lines are ASCII only, non-ASCII characters escaped as Python's `json.dumps`
//! does: the Python SDK splits lines like `str.splitlines` (U+2028 would cut a line) and the
//! JS SDK decodes every chunk on its own (a character split across chunks would be garbled).

use std::collections::BTreeMap;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /execute`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecuteRequest {
    pub code: String,
    #[serde(default)]
    pub context_id: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    /// Set for this execution only.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// `POST /contexts`; the SDKs may send `{}` or nothing at all.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateContextRequest {
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
}

/// A context as `/contexts` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

/// One line of the `/execute` stream, and (with [`Event::Ready`] and [`Event::Done`]) of
/// the worker's event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Stdout(LogLine),
    Stderr(LogLine),
    /// Boxed: far bigger than the other variants.
    Result(Box<ExecutionResult>),
    Error(ExecutionError),
    NumberOfExecutions {
        execution_count: u64,
    },
    Keepalive,
    EndOfExecution,
    /// Worker only: started and waiting for commands.
    #[serde(skip_serializing)]
    Ready,
    /// Worker only: the cell is over, everything it produced has been sent.
    #[serde(skip_serializing)]
    Done,
}

/// A chunk of stdout or stderr.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub text: String,
    /// ISO 8601 in UTC, as E2B's server sends it (the kernel message's date).
    pub timestamp: String,
}

/// A result: the cell's value (`is_main_result`) or something displayed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecutionResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
    /// Base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub png: Option<String>,
    /// Base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpeg: Option<String>,
    /// Base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pdf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub javascript: Option<String>,
    /// A DataFrame's columns (E2B's `e2b/data`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// A figure's chart (E2B's `e2b/chart`, from `e2b_charts` when the guest has it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<Value>,
    /// The MIME types with no field of their own.
    pub extra: Map<String, Value>,
    pub is_main_result: bool,
}

/// An exception the cell raised (or why the execution ended early).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionError {
    pub name: String,
    pub value: String,
    pub traceback: String,
}

impl Event {
    /// An error the server itself reports in the stream (no Python traceback).
    pub fn error(name: &str, value: &str, traceback: impl Into<String>) -> Event {
        Event::Error(ExecutionError {
            name: name.into(),
            value: value.into(),
            traceback: traceback.into(),
        })
    }

    /// The event as one line of the `/execute` stream.
    pub fn to_line(&self) -> Bytes {
        // Only the worker-only variants fail to serialize, and they are never streamed.
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        let mut line = ascii_json(json);
        line.push('\n');
        Bytes::from(line)
    }
}

/// A command to the worker: run one cell.
#[derive(Debug, Clone, Serialize)]
pub struct Command<'a> {
    pub code: &'a str,
    /// For this execution only.
    pub env_vars: Option<&'a BTreeMap<String, String>>,
    /// The sandbox's environment (envd's `/envs`), set for good; once per worker.
    pub env: Option<&'a BTreeMap<String, String>>,
}

/// `json` with every non-ASCII character as a `\uXXXX` escape (UTF-16, as JSON has it).
/// Valid because outside strings JSON is ASCII anyway.
pub fn ascii_json(json: String) -> String {
    if json.is_ascii() {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    let mut units = [0u16; 2];
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_leave_out_absent_fields() {
        let ev = Event::Result(Box::new(ExecutionResult {
            text: Some("2".into()),
            is_main_result: true,
            ..Default::default()
        }));
        assert_eq!(
            ev.to_line(),
            "{\"type\":\"result\",\"text\":\"2\",\"extra\":{},\"is_main_result\":true}\n"
        );
        assert_eq!(
            Event::EndOfExecution.to_line(),
            "{\"type\":\"end_of_execution\"}\n"
        );
        assert_eq!(
            Event::NumberOfExecutions { execution_count: 3 }.to_line(),
            "{\"type\":\"number_of_executions\",\"execution_count\":3}\n"
        );
    }

    #[test]
    fn lines_are_ascii() {
        let ev = Event::Stdout(LogLine {
            text: "é\u{2028}😀".into(),
            timestamp: "t".into(),
        });
        let line = ev.to_line();
        assert!(line.is_ascii());
        assert!(
            std::str::from_utf8(&line)
                .unwrap()
                .contains(r"\u00e9\u2028\ud83d\ude00")
        );
        let back: Event = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn worker_events_parse() {
        let ready: Event = serde_json::from_str(r#"{"type":"ready","pid":7}"#).unwrap();
        assert_eq!(ready, Event::Ready);
        let done: Event = serde_json::from_str(r#"{"type":"done"}"#).unwrap();
        assert_eq!(done, Event::Done);
        let result: Event =
            serde_json::from_str(r#"{"type":"result","png":"AA==","json":[1],"extra":{"a/b":1}}"#)
                .unwrap();
        let Event::Result(r) = result else {
            panic!("{result:?}")
        };
        assert_eq!(r.png.as_deref(), Some("AA=="));
        assert!(!r.is_main_result);
        assert_eq!(r.extra.get("a/b"), Some(&Value::from(1)));
    }
}
