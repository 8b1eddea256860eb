//! Text output: tables and key/value listings from API JSON, lenient about missing fields so a
//! partial answer still prints.

use std::fmt::Write as _;

use serde_json::Value;

/// Pretty JSON on stdout.
pub(super) fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A string (or number) field as text; empty when absent.
pub(super) fn str_field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// `k=v,k2=v2`, sorted.
fn metadata(v: &Value) -> String {
    let Some(Value::Object(m)) = v.get("metadata") else {
        return String::new();
    };
    let mut pairs: Vec<String> = m
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    pairs.sort();
    pairs.join(",")
}

/// The template as users name it: the alias when there is one.
fn template(v: &Value) -> String {
    let alias = str_field(v, "alias");
    if alias.is_empty() {
        str_field(v, "templateID")
    } else {
        alias
    }
}

/// The `list` table; a header line even when empty, so scripts see the columns.
pub(super) fn table(items: &[Value]) -> String {
    const HEADER: [&str; 8] = [
        "SANDBOX ID",
        "TEMPLATE",
        "STATE",
        "STARTED",
        "ENDS",
        "CPU",
        "MEMORY MB",
        "METADATA",
    ];
    let rows: Vec<[String; 8]> = items
        .iter()
        .map(|v| {
            [
                str_field(v, "sandboxID"),
                template(v),
                str_field(v, "state"),
                str_field(v, "startedAt"),
                str_field(v, "endAt"),
                str_field(v, "cpuCount"),
                str_field(v, "memoryMB"),
                metadata(v),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEADER);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// `info` as `key: value` lines.
pub(super) fn detail(v: &Value) -> String {
    let fields = [
        ("Sandbox ID", str_field(v, "sandboxID")),
        ("Template", str_field(v, "templateID")),
        ("Alias", str_field(v, "alias")),
        ("State", str_field(v, "state")),
        ("Started", str_field(v, "startedAt")),
        ("Ends", str_field(v, "endAt")),
        ("CPUs", str_field(v, "cpuCount")),
        ("Memory MB", str_field(v, "memoryMB")),
        ("Disk MB", str_field(v, "diskSizeMB")),
        ("envd version", str_field(v, "envdVersion")),
        ("Metadata", metadata(v)),
    ];
    let mut out = String::new();
    for (k, val) in fields {
        if !val.is_empty() {
            let _ = writeln!(out, "{:<13} {val}", format!("{k}:"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_aligns_columns() {
        let items = [
            json!({"sandboxID": "a1", "templateID": "base", "state": "running",
                   "startedAt": "2025-01-01T00:00:00Z", "endAt": "2025-01-01T00:05:00Z",
                   "cpuCount": 2, "memoryMB": 512, "metadata": {"b": "2", "a": "1"}}),
            json!({"sandboxID": "longer-id", "templateID": "t", "alias": "py", "state": "paused"}),
        ];
        let t = table(&items);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("SANDBOX ID  TEMPLATE  STATE"), "{t}");
        assert!(lines[1].starts_with("a1          base      running"), "{t}");
        assert!(lines[1].ends_with("a=1,b=2"), "{t}");
        assert!(lines[2].starts_with("longer-id   py        paused"), "{t}");
        assert_eq!(table(&[]).lines().count(), 1);
    }

    #[test]
    fn detail_skips_absent_fields() {
        let d = detail(&json!({"sandboxID": "x", "state": "running", "cpuCount": 1}));
        assert_eq!(
            d,
            "Sandbox ID:   x\nState:        running\nCPUs:         1\n"
        );
    }
}
