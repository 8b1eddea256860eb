//! The report `wrenn bench` writes (`docs/performance.md`): plain data in, Markdown out, so
//! what it says is tested without a running Wrenn.

use std::fmt::Write as _;

use super::host::Machine;
use super::stats::Summary;

/// What a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Ms,
    PerSecond,
    MiB,
}

impl Unit {
    fn format(self, v: f64) -> String {
        match self {
            Unit::Ms if v >= 100.0 => format!("{v:.0} ms"),
            Unit::Ms => format!("{v:.1} ms"),
            Unit::PerSecond => format!("{v:.2}/s"),
            Unit::MiB => format!("{v:.1} MiB"),
        }
    }
}

/// One line of a figures table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) unit: Unit,
    /// `None`: not measured (`note` says why).
    pub(crate) summary: Option<Summary>,
    /// Published figures of other platforms (on KVM), for scale.
    pub(crate) anchor: &'static str,
    /// The goal for this machine.
    pub(crate) goal: &'static str,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(what: impl Into<String>, unit: Unit, summary: Option<Summary>) -> Row {
        Row {
            what: what.into(),
            unit,
            summary,
            anchor: "",
            goal: "",
            note: String::new(),
        }
    }
    pub(crate) fn anchor(mut self, anchor: &'static str) -> Row {
        self.anchor = anchor;
        self
    }
    pub(crate) fn goal(mut self, goal: &'static str) -> Row {
        self.goal = goal;
        self
    }
    pub(crate) fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }
}

/// A titled table with a paragraph before it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Section {
    pub(crate) title: String,
    pub(crate) intro: Vec<String>,
    pub(crate) rows: Vec<Row>,
}

/// Everything the report says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub(crate) date: String,
    /// `default` or `quick`.
    pub(crate) mode: &'static str,
    pub(crate) took_s: f64,
    pub(crate) machine: Machine,
    pub(crate) accelerator: String,
    pub(crate) wrenn_version: String,
    pub(crate) qemu_version: String,
    pub(crate) e2b_version: String,
    pub(crate) target: String,
    pub(crate) template: String,
    /// 1-minute load average at the start, and before the phases that keep many sandboxes
    /// alive (whose guests load the machine themselves).
    pub(crate) load: (Option<f64>, Option<f64>),
    pub(crate) sections: Vec<Section>,
    /// Errors and other things the reader must know.
    pub(crate) notes: Vec<String>,
}

/// The report as Markdown.
pub(crate) fn render(r: &Report) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "# Performance\n");
    let _ = writeln!(
        w,
        "Written by `wrenn bench` on {} ({} run, {:.1} min); every figure here comes from that run.",
        r.date,
        r.mode,
        r.took_s / 60.0
    );
    let _ = writeln!(
        w,
        "Medians and p99 are by nearest rank (each a measured sample; with fewer than 100 samples the p99 is the worst).\n\
         Anchors are other platforms' published figures on KVM, for scale; goals are issue 14's for this machine.\n"
    );
    let _ = writeln!(w, "## Machine\n");
    let m = &r.machine;
    let _ = writeln!(
        w,
        "- CPU: {}, {} cores; RAM {:.1} GiB",
        m.cpu_model, m.cores, m.ram_gib
    );
    let _ = writeln!(w, "- Accelerator: {}", r.accelerator);
    let _ = writeln!(
        w,
        "- Versions: wrenn {}; {}; e2b (Python SDK) {}",
        r.wrenn_version, r.qemu_version, r.e2b_version
    );
    let load = |l: Option<f64>| l.map_or("unknown".to_owned(), |l| format!("{l:.2}"));
    let _ = writeln!(
        w,
        "- Load average (1 min): {} at the start, {} before the host-memory and capacity phases (which keep sandboxes alive); other work on the machine makes every figure an upper bound",
        load(r.load.0),
        load(r.load.1)
    );
    let _ = writeln!(w, "- Target: {}, template `{}`\n", r.target, r.template);
    for s in &r.sections {
        render_section(w, s);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(w, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(w, "- {n}");
        }
        let _ = writeln!(w);
    }
    out
}

fn render_section(w: &mut String, s: &Section) {
    let _ = writeln!(w, "## {}\n", s.title);
    for p in &s.intro {
        let _ = writeln!(w, "{p}");
    }
    if !s.intro.is_empty() {
        let _ = writeln!(w);
    }
    if s.rows.is_empty() {
        return;
    }
    let with_anchor = s
        .rows
        .iter()
        .any(|r| !r.anchor.is_empty() || !r.goal.is_empty());
    let with_note = s.rows.iter().any(|r| !r.note.is_empty());
    let mut head = vec!["what", "median", "p99", "n"];
    if with_anchor {
        head.extend(["anchors (KVM)", "goal here"]);
    }
    if with_note {
        head.push("note");
    }
    let _ = writeln!(w, "| {} |", head.join(" | "));
    let _ = writeln!(w, "|{}", "---|".repeat(head.len()));
    for row in &s.rows {
        let mut cells = match &row.summary {
            Some(sum) => vec![
                row.what.clone(),
                row.unit.format(sum.median),
                row.unit.format(sum.p99),
                sum.n.to_string(),
            ],
            None => vec![
                row.what.clone(),
                "not measured".into(),
                String::new(),
                "0".into(),
            ],
        };
        if with_anchor {
            cells.push(row.anchor.to_owned());
            cells.push(row.goal.to_owned());
        }
        if with_note {
            cells.push(row.note.replace('|', "\\|"));
        }
        let _ = writeln!(w, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(median: f64, p99: f64, n: usize) -> Option<Summary> {
        Some(Summary {
            n,
            median,
            p99,
            min: median,
            max: p99,
        })
    }

    fn report(sections: Vec<Section>, notes: Vec<String>) -> Report {
        Report {
            date: "2026-12-03".into(),
            mode: "quick",
            took_s: 90.0,
            machine: Machine {
                cpu_model: "AMD EPYC 7B13".into(),
                cores: 2,
                ram_gib: 23.5,
            },
            accelerator: "TCG".into(),
            wrenn_version: "0.1.0".into(),
            qemu_version: "QEMU emulator version 10.0.0".into(),
            e2b_version: "2.63.0".into(),
            target: "http://127.0.0.1:3000".into(),
            template: "base".into(),
            load: (Some(0.5), None),
            sections,
            notes,
        }
    }

    #[test]
    fn header_names_the_machine_and_versions() {
        let text = render(&report(vec![], vec![]));
        assert!(text.starts_with(
            "# Performance\n\nWritten by `wrenn bench` on 2026-12-03 (quick run, 1.5 min)"
        ));
        assert!(text.contains("- CPU: AMD EPYC 7B13, 2 cores; RAM 23.5 GiB\n"));
        assert!(text.contains("- Accelerator: TCG\n"));
        assert!(text.contains(
            "- Versions: wrenn 0.1.0; QEMU emulator version 10.0.0; e2b (Python SDK) 2.63.0\n"
        ));
        assert!(text.contains(
            "- Load average (1 min): 0.50 at the start, unknown before the host-memory and capacity phases"
        ));
        assert!(!text.contains("## Notes"));
    }

    #[test]
    fn tables_show_units_anchors_and_missing_figures() {
        let s = Section {
            title: "Create".into(),
            intro: vec!["Through the REST API.".into()],
            rows: vec![
                Row::new("create, concurrency 1", Unit::Ms, sum(412.4, 530.0, 30))
                    .anchor("CubeSandbox 47.8 ms")
                    .goal("p50 <= 25 ms"),
                Row::new("creates/s", Unit::PerSecond, sum(2.5, 3.0, 6)),
                Row::new("PSS", Unit::MiB, None).note("not on this host | remote"),
                Row::new("stage", Unit::Ms, sum(1.24, 9.0, 3)),
            ],
        };
        let text = render(&report(vec![s], vec!["2 creates failed".into()]));
        let table = "\
## Create

Through the REST API.

| what | median | p99 | n | anchors (KVM) | goal here | note |
|---|---|---|---|---|---|---|
| create, concurrency 1 | 412 ms | 530 ms | 30 | CubeSandbox 47.8 ms | p50 <= 25 ms |  |
| creates/s | 2.50/s | 3.00/s | 6 |  |  |  |
| PSS | not measured |  | 0 |  |  | not on this host \\| remote |
| stage | 1.2 ms | 9.0 ms | 3 |  |  |  |
";
        assert!(text.contains(table), "{text}");
        assert!(text.ends_with("## Notes\n\n- 2 creates failed\n\n"));
    }

    #[test]
    fn plain_tables_have_no_empty_columns() {
        let s = Section {
            title: "Stages".into(),
            intro: vec![],
            rows: vec![Row::new("restore", Unit::Ms, sum(20.0, 30.0, 5))],
        };
        let text = render(&report(vec![s], vec![]));
        assert!(text.contains(
            "## Stages\n\n| what | median | p99 | n |\n|---|---|---|---|\n| restore | 20.0 ms | 30.0 ms | 5 |\n"
        ));
    }
}
