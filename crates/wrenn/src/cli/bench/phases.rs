//! The bench's measurements, one after another, and the report's sections made from them.
//! A phase that fails becomes a note and the run goes on; only an unreachable API ends it.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use wrenn_proto::process::{ProcessConfig, StartRequest};

use super::super::envd::Envd;
use super::host::{self, QemuMemory};
use super::report::{Report, Row, Section, Unit};
use super::rest::{self, Burst, Held};
use super::sdk::{self, SdkResults};
use super::stats::{Summary, summarize};
use super::{Bench, Plan};

const CREATE_ANCHOR: &str = "CubeSandbox 47.8 ms bare metal, 66.7 ms PVM cloud VM";
const TTFC_ANCHOR: &str = "Daytona 0.20 s, E2B 0.50 s (ComputeSDK, May 2026)";
const RESUME_ANCHOR: &str = "CubeSandbox 41.8 ms bare metal, 18.9 ms PVM cloud VM";
const MEMORY_ANCHOR: &str = "CubeSandbox 25-34 MB per idle VM";

/// Runs every phase and assembles the report (its `took_s` is the caller's to set).
pub(super) async fn measure(b: &Bench) -> anyhow::Result<Report> {
    let load_at_start = host::load_average();
    let mut notes = Vec::new();
    eprintln!(
        "[1/5] REST creates, concurrency 1 ({} + 1 warm-up)",
        b.plan.c1
    );
    // The first create after a start can pay for cold caches: not counted.
    let warm = rest::burst(&b.rest, 1, 1, None).await;
    if warm.created.is_empty() {
        anyhow::bail!(
            "the first create failed, so nothing can be measured: {}",
            warm.errors.join("; ")
        );
    }
    let c1 = rest::burst(&b.rest, 1, b.plan.c1, None).await;
    eprintln!("[2/5] REST creates, concurrency 8 ({})", b.plan.c8);
    let c8 = rest::burst(&b.rest, 8, b.plan.c8, None).await;
    eprintln!(
        "[3/5] sustained creates, concurrency 8, {} s",
        b.plan.sustain.as_secs()
    );
    let sustained = rest::burst(&b.rest, 8, 0, Some(b.plan.sustain)).await;
    for (what, burst) in [("c1", &c1), ("c8", &c8), ("sustained", &sustained)] {
        if !burst.errors.is_empty() {
            notes.push(format!(
                "{what}: {} errors, first: {}",
                burst.errors.len(),
                burst.errors[0]
            ));
        }
    }
    let sdk = run_sdk(b, &mut notes).await;
    // Before the phases that keep many sandboxes alive: their guests are load of their own.
    let load_before_alive = host::load_average();
    eprintln!("[5/5] host memory with {} alive", b.plan.alive);
    let memory = memory_with_alive(b, &mut notes).await;
    let accelerator = match &memory.accel {
        Some(arg) => format!(
            "{} (`-accel {arg}` of the sandboxes' QEMU)",
            if arg.starts_with("kvm") { "KVM" } else { "TCG" }
        ),
        None => format!(
            "{} (decided on this machine as the agent decides it; the API does not report it and no sandbox's QEMU was found here)",
            host::accelerator()
        ),
    };
    kill_all(b, &mut notes).await;
    eprintln!("[5/5] capacity (at most {})", b.plan.cap);
    let held = rest::probe_capacity(&b.rest, b.plan.cap, b.plan.limit).await;

    let sections = vec![
        creates_section(&c1, &c8, &sustained, &b.plan),
        stages_section(&c1, "1"),
        stages_section(&c8, "8"),
        sdk_section(&sdk),
        memory_section(&memory, b.plan.alive),
        capacity_section(&held, &b.plan),
    ];
    let target = if b.config.sandbox_url == b.config.api_url {
        b.config.api_url.clone()
    } else {
        format!("{} (sandboxes: {})", b.config.api_url, b.config.sandbox_url)
    };
    Ok(Report {
        date: today(),
        mode: if b.plan.quick { "quick" } else { "default" },
        took_s: 0.0,
        machine: host::Machine::read(),
        accelerator,
        wrenn_version: env!("CARGO_PKG_VERSION").to_owned(),
        qemu_version: host::qemu_version().await,
        e2b_version: sdk.e2b_version.clone().unwrap_or_else(|| "not run".into()),
        target,
        template: b.rest.template().to_owned(),
        load: (load_at_start, load_before_alive),
        sections,
        notes,
    })
}

async fn kill_all(b: &Bench, notes: &mut Vec<String>) {
    let (_, errors) = b.rest.kill_all().await;
    notes.extend(errors.into_iter().map(|e| format!("not killed: {e}")));
}

async fn run_sdk(b: &Bench, notes: &mut Vec<String>) -> SdkResults {
    let Some(driver) = &b.driver else {
        notes.push("The Python SDK part was skipped (--skip-sdk).".into());
        return SdkResults::default();
    };
    eprintln!("[4/5] Python SDK: {}", driver.script.display());
    match sdk::run(driver, &b.rest.tracker).await {
        Ok(r) => {
            if let Some(e) = &r.error {
                notes.push(format!(
                    "The SDK driver failed (figures up to there kept): {e}"
                ));
            }
            r
        }
        Err(e) => {
            notes.push(format!("The SDK driver did not run: {e:#}"));
            SdkResults::default()
        }
    }
}

fn ms(created: &[rest::Created]) -> Option<Summary> {
    summarize(&created.iter().map(|c| c.ms).collect::<Vec<_>>())
}

fn creates_section(c1: &Burst, c8: &Burst, sustained: &Burst, plan: &Plan) -> Section {
    let rate = sustained.created.len() as f64 / sustained.wall_s.max(f64::EPSILON);
    let windows = rest::rates(&sustained.done_at, sustained.wall_s, 5.0);
    Section {
        title: "Create through the REST API".into(),
        intro: vec![
            "`POST /v2/sandboxes` from a Rust HTTP client, timed to the last byte of the answer; each sandbox is killed after its create (not timed).".into(),
        ],
        rows: vec![
            Row::new("create, concurrency 1", Unit::Ms, ms(&c1.created))
                .anchor(CREATE_ANCHOR)
                .goal("p50 <= 25 ms, p99 <= 60 ms"),
            Row::new("create, concurrency 8", Unit::Ms, ms(&c8.created)),
            Row::new(
                format!("creates/s at concurrency 8, per 5 s window over {} s", plan.sustain.as_secs()),
                Unit::PerSecond,
                summarize(&windows),
            )
            .goal("limited only by the hot pool's refill")
            .note(format!(
                "{} creates in {:.1} s: {rate:.2}/s overall",
                sustained.created.len(),
                sustained.wall_s
            )),
            Row::new("create during the sustained run", Unit::Ms, ms(&sustained.created)),
        ],
    }
}

/// Per-stage medians of a burst's creates, from their `Server-Timing`.
fn stages_section(burst: &Burst, concurrency: &str) -> Section {
    let mut order: Vec<String> = Vec::new();
    let mut by_name: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for c in &burst.created {
        for (name, dur) in &c.stages {
            if !by_name.contains_key(name) {
                order.push(name.clone());
            }
            by_name.entry(name.clone()).or_default().push(*dur);
        }
    }
    // In the order a create goes through them (hot and restored creates mixed in one burst
    // would otherwise interleave), then any the server added, as they came.
    order.sort_by_key(|n| {
        STAGE_ORDER
            .iter()
            .position(|k| k == n)
            .unwrap_or(usize::MAX)
    });
    let rows = order
        .iter()
        .map(|n| Row::new(stage_label(n), Unit::Ms, summarize(&by_name[n])))
        .collect::<Vec<_>>();
    let mut intro = vec![format!(
        "From the `Server-Timing` header of the concurrency-{concurrency} creates: the control plane's steps and, inside `agent`, the host's own. \
         `hot` is a create served by the hot pool (restored and warmed up ahead of time); the others restore now, and a `slot` near 0 means a pre-started QEMU from the warm pool was there (without one, `restore` includes QEMU's start)."
    )];
    if rows.is_empty() {
        intro.push("The server sent no `Server-Timing` header.".into());
    }
    Section {
        title: format!("Where a create's time goes, concurrency {concurrency}"),
        intro,
        rows,
    }
}

/// The stages a create goes through, in order.
const STAGE_ORDER: &[&str] = &[
    "placement",
    "hot",
    "slot",
    "restore",
    "envd",
    "init",
    "egress",
    "agent",
    "store",
    "total",
];

fn stage_label(name: &str) -> String {
    let what = match name {
        "placement" => "placement and record (control plane)",
        "hot" => "a hot-pool sandbox taken and given its identity, `/init` (agent)",
        "slot" => "slot or pre-started QEMU (agent)",
        "restore" => "QEMU restore, device state, `cont` (agent)",
        "envd" => "envd ready (agent)",
        "init" => "`/init` (agent)",
        "egress" => "egress rules (agent)",
        "agent" => "agent call, all of the above (control plane)",
        "store" => "record `running` (control plane)",
        "total" => "total in the control plane",
        _ => return format!("`{name}`"),
    };
    format!("`{name}`: {what}")
}

fn sdk_section(sdk: &SdkResults) -> Section {
    let s = |m: &str| sdk.samples.get(m).and_then(|v| summarize(v));
    let per_mib = |m: &str| {
        s(m).map(|x| format!("{:.0} MiB/s at the median", 100.0 / (x.median / 1000.0)))
            .unwrap_or_default()
    };
    Section {
        title: "Through the official Python SDK".into(),
        intro: vec![
            "`bench/sdk_bench.py` with the `e2b` package: each create + command sample is a fresh sandbox; exec is `commands.run(\"true\")` in one sandbox after 3 warm-up runs; pause and resume rounds run on one sandbox with the memory dirtied once (`/dev/shm`), so every pause writes it again; files are `files.write` and `files.read` of 100 MiB.".into(),
        ],
        rows: vec![
            Row::new("`Sandbox.create()`", Unit::Ms, s("sdk_create")),
            Row::new("time to first command: create + `echo`", Unit::Ms, s("ttfc"))
                .anchor(TTFC_ANCHOR)
                .goal("p50 <= 150 ms"),
            Row::new("first command alone", Unit::Ms, s("first_cmd")),
            Row::new("second command", Unit::Ms, s("second_cmd")),
            Row::new("`kill()`", Unit::Ms, s("sdk_kill")),
            Row::new("exec round trip of `true`, warm", Unit::Ms, s("exec_true"))
                .goal("<= 40 ms"),
            Row::new("pause, 10 MiB dirtied", Unit::Ms, s("pause_10")).goal("<= 60 ms"),
            Row::new("resume, 10 MiB dirtied", Unit::Ms, s("resume_10"))
                .anchor(RESUME_ANCHOR)
                .goal("p50 <= 100 ms"),
            Row::new("first command after resume, 10 MiB", Unit::Ms, s("after_resume_10"))
                .goal("<= 150 ms"),
            Row::new("pause, 200 MiB dirtied", Unit::Ms, s("pause_200")),
            Row::new("resume, 200 MiB dirtied", Unit::Ms, s("resume_200")),
            Row::new("first command after resume, 200 MiB", Unit::Ms, s("after_resume_200")),
            Row::new("upload 100 MiB (`files.write`)", Unit::Ms, s("upload_100"))
                .note(per_mib("upload_100")),
            Row::new("download 100 MiB (`files.read`)", Unit::Ms, s("download_100"))
                .note(per_mib("download_100")),
        ],
    }
}

/// Host memory of the sandboxes alive now, filled up to `plan.alive` first.
#[derive(Debug, Default)]
struct MemoryFigures {
    per_sandbox: Vec<QemuMemory>,
    alive: usize,
    /// `-accel` of the first QEMU measured.
    accel: Option<String>,
    /// Why there are no figures.
    missing: Option<String>,
}

async fn memory_with_alive(b: &Bench, notes: &mut Vec<String>) -> MemoryFigures {
    while b.rest.tracker.ids().len() < b.plan.alive {
        if let Err(e) = b.rest.create().await {
            notes.push(format!(
                "host memory: only {} sandboxes alive, the next create failed: {e}",
                b.rest.tracker.ids().len()
            ));
            break;
        }
    }
    let ids = b.rest.tracker.ids();
    // One command in each, as a sandbox in use has run one; then let them settle.
    let ran: Vec<anyhow::Result<()>> = futures::stream::iter(&ids)
        .map(|id| run_true(b, id))
        .buffer_unordered(2)
        .collect()
        .await;
    if let Some(Err(e)) = ran.iter().find(|r| r.is_err()) {
        notes.push(format!(
            "host memory: a command before measuring failed: {e:#}"
        ));
    }
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let mut figures = MemoryFigures {
        alive: ids.len(),
        ..Default::default()
    };
    match host::qemu_pids(&b.state_dir) {
        Ok(pids) => {
            for (id, pid) in pids.iter().filter(|(id, _)| ids.contains(id)) {
                if figures.accel.is_none() {
                    figures.accel = host::qemu_accel(*pid);
                }
                match host::qemu_memory(*pid) {
                    Ok(m) => figures.per_sandbox.push(m),
                    Err(e) => notes.push(format!("host memory: read /proc/{pid} ({id}): {e}")),
                }
            }
            if figures.per_sandbox.is_empty() {
                figures.missing = Some(format!(
                    "no QEMU of this run's sandboxes found through {}: run the bench on the sandboxes' host (and as root), or pass --state-dir",
                    b.state_dir.display()
                ));
            }
        }
        Err(e) => {
            figures.missing = Some(format!(
                "not on the sandboxes' host, or not root: cannot read {}/sandboxes ({e})",
                b.state_dir.display()
            ))
        }
    }
    figures
}

async fn run_true(b: &Bench, id: &str) -> anyhow::Result<()> {
    let envd = Envd::connect(&b.config, &b.api, id, None).await?;
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), "true".into()],
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    let mut events = envd.start(&req).await?;
    while let Some(event) = events.next().await {
        event?;
    }
    Ok(())
}

fn memory_section(m: &MemoryFigures, wanted: usize) -> Section {
    let mib = |f: fn(&QemuMemory) -> u64| {
        summarize(
            &m.per_sandbox
                .iter()
                .map(|q| f(q) as f64 / 1024.0)
                .collect::<Vec<_>>(),
        )
    };
    let note = m.missing.clone().unwrap_or_default();
    let tcg_size = mib(|q| q.tcg_size_kib).map_or(0.0, |s| s.median);
    Section {
        title: format!("Host memory per idle sandbox, {} alive", m.alive),
        intro: vec![
            format!(
                "{wanted} sandboxes wanted alive, {} were; each ran one command (`true`), then 5 s idle. PSS from `/proc/<pid>/smaps_rollup` of each sandbox's QEMU (found through the agent's records in the state directory): pages shared with other sandboxes (the template's memory file in the page cache) count 1/n.",
                m.alive
            ),
            format!(
                "The translation cache is QEMU's TCG code buffer: the anonymous `rwxp` mappings in `/proc/<pid>/smaps` (nothing else in QEMU is anonymous and executable; guard pages split it into several), {tcg_size:.0} MiB reserved per QEMU here (`tb-size`); under KVM there is none."
            ),
        ],
        rows: vec![
            Row::new("PSS per sandbox", Unit::MiB, mib(|q| q.pss_kib)).note(note.clone()),
            Row::new(
                "PSS per sandbox without the translation cache",
                Unit::MiB,
                mib(|q| q.pss_kib.saturating_sub(q.tcg_pss_kib)),
            )
            .anchor(MEMORY_ANCHOR)
            .goal("<= 30 MB")
            .note(note.clone()),
            Row::new("translation cache PSS", Unit::MiB, mib(|q| q.tcg_pss_kib)).note(note),
        ],
    }
}

fn capacity_section(held: &Held, plan: &Plan) -> Section {
    Section {
        title: "Capacity".into(),
        intro: vec![
            format!(
                "Sandboxes created one after another and kept, until a create failed or took over {} ms (at most {}): **{} held**; stopped because {}.",
                plan.limit.as_millis(),
                plan.cap,
                held.count,
                held.stopped
            ),
            "A refusal (HTTP 503) is the control plane's admission (`wrenn up --cpu-overcommit`, `--max-sandboxes`), not the machine running out.".into(),
        ],
        rows: vec![Row::new(
            "create while filling the host",
            Unit::Ms,
            summarize(&held.create_ms),
        )],
    }
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(stages: &[(&str, f64)]) -> rest::Created {
        rest::Created {
            id: "x".into(),
            ms: 1.0,
            stages: stages.iter().map(|(n, d)| ((*n).to_owned(), *d)).collect(),
        }
    }

    #[test]
    fn stages_of_hot_and_restored_creates_come_in_create_order() {
        let burst = Burst {
            created: vec![
                created(&[
                    ("placement", 1.0),
                    ("hot", 5.0),
                    ("agent", 6.0),
                    ("x-new", 1.0),
                ]),
                created(&[
                    ("placement", 2.0),
                    ("slot", 0.0),
                    ("restore", 9.0),
                    ("agent", 10.0),
                ]),
            ],
            ..Default::default()
        };
        let s = stages_section(&burst, "1");
        let names: Vec<&str> = s.rows.iter().map(|r| r.what.as_str()).collect();
        assert_eq!(
            names,
            [
                "`placement`: placement and record (control plane)",
                "`hot`: a hot-pool sandbox taken and given its identity, `/init` (agent)",
                "`slot`: slot or pre-started QEMU (agent)",
                "`restore`: QEMU restore, device state, `cont` (agent)",
                "`agent`: agent call, all of the above (control plane)",
                "`x-new`",
            ]
        );
        assert_eq!(s.rows[0].summary.unwrap().n, 2);
        assert_eq!(s.rows[1].summary.unwrap().n, 1);
    }
}
