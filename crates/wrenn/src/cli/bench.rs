//! `wrenn bench`: measures a running Wrenn and writes `docs/performance.md`.
//!
//! Creates (one at a time, eight at once, sustained, until the host is full) go through the
//! REST API from here, timed to the last byte of the answer, with the per-stage breakdown the
//! control plane sends in `Server-Timing`. What users see through the SDK (time to first
//! command, exec, pause and resume, files) is measured by the official Python SDK in
//! `bench/sdk_bench.py`, which prints JSON samples this side summarizes. Host memory is read
//! from `/proc` of each sandbox's QEMU, so it needs the bench on the sandboxes' host.
//!
//! Every sandbox made is tracked (the driver reports its own) and tagged with the run's ID in
//! its metadata; all of them are killed at the end, also after a failure or Ctrl-C.

mod host;
mod phases;
mod report;
mod rest;
mod sdk;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use self::rest::Rest;
use super::ConnArgs;
use super::api::Api;
use super::config::Config;

/// `wrenn bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The env file `wrenn up` writes (`<state>/env`): connection settings for those not
    /// given otherwise; its directory is the state directory for host memory.
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// Where the report goes.
    #[arg(long, short, default_value = "docs/performance.md")]
    out: PathBuf,
    /// The instance's state directory, to find each sandbox's QEMU for host memory (default:
    /// the env file's directory, else `$WRENN_STATE_DIR` or `/var/lib/wrenn`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A Python with the `e2b` package (default: `.venv/bin/python` if present, else `python3`).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// The SDK driver script.
    #[arg(long, default_value = "bench/sdk_bench.py", value_name = "PATH")]
    sdk_driver: PathBuf,
    /// Template to create sandboxes from.
    #[arg(long, default_value = "base")]
    template: String,
    /// A fast smoke run: a few samples of everything.
    #[arg(long)]
    quick: bool,
    /// Creates at concurrency 1 (default 30; `--quick` 3).
    #[arg(long)]
    samples: Option<usize>,
    /// Seconds of sustained creates at concurrency 8 (default 30; `--quick` 5).
    #[arg(long)]
    sustain_secs: Option<u64>,
    /// Sandboxes alive for the host-memory figure (default 20; `--quick` 3).
    #[arg(long)]
    alive: Option<usize>,
    /// Most sandboxes the capacity probe creates (default 60; `--quick` 4).
    #[arg(long)]
    capacity_cap: Option<usize>,
    /// A create slower than this ends the capacity probe, ms.
    #[arg(long, default_value_t = 1000)]
    capacity_limit_ms: u64,
    /// Leave out the Python SDK part.
    #[arg(long)]
    skip_sdk: bool,
}

/// The resolved plan of a run.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    c1: usize,
    c8: usize,
    sustain: Duration,
    alive: usize,
    cap: usize,
    limit: Duration,
}

impl Plan {
    fn of(a: &BenchArgs) -> Plan {
        let pick = |v: Option<usize>, full: usize, quick: usize| {
            v.unwrap_or(if a.quick { quick } else { full })
        };
        Plan {
            quick: a.quick,
            c1: pick(a.samples, 30, 3),
            c8: if a.quick { 8 } else { 32 },
            sustain: Duration::from_secs(a.sustain_secs.unwrap_or(if a.quick { 5 } else { 30 })),
            alive: pick(a.alive, 20, 3),
            cap: pick(a.capacity_cap, 60, 4),
            limit: Duration::from_millis(a.capacity_limit_ms),
        }
    }
}

/// Everything a run needs.
struct Bench {
    plan: Plan,
    config: Config,
    api: Api,
    rest: Rest,
    state_dir: PathBuf,
    driver: Option<sdk::Driver>,
}

/// Runs `wrenn bench`.
pub fn run(mut args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(file) = &args.env_file {
        fill_from_env_file(&mut args.conn, file)?;
    }
    let config = Config::resolve(&args.conn)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args, config))
}

async fn run_async(args: BenchArgs, config: Config) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let bench = prepare(&args, config)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Either signal drops the measurement (and the SDK driver with it); the clean-up runs.
    let outcome = tokio::select! {
        r = phases::measure(&bench) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    eprintln!("cleaning up: killing every sandbox this run made");
    let (killed, errors) = bench.rest.kill_all().await;
    eprintln!("killed {killed}");
    for e in &errors {
        eprintln!("could not kill {e}");
    }
    let mut report = outcome?;
    report.took_s = start.elapsed().as_secs_f64();
    report
        .notes
        .extend(errors.iter().map(|e| format!("not killed: {e}")));
    let text = report::render(&report);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&args.out, &text).with_context(|| format!("write {}", args.out.display()))?;
    println!("{text}");
    eprintln!(
        "wrote {} ({:.1} min)",
        args.out.display(),
        report.took_s / 60.0
    );
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn prepare(args: &BenchArgs, config: Config) -> anyhow::Result<Bench> {
    let api = Api::new(&config)?;
    let run_id = hex::encode(rand::random::<[u8; 6]>());
    let rest = Rest::new(
        &config.api_url,
        config.api_key.clone(),
        &args.template,
        &run_id,
        api.clone(),
    )?;
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| {
            args.env_file
                .as_ref()
                .and_then(|f| f.parent())
                .map(Path::to_owned)
        })
        .or_else(|| std::env::var_os("WRENN_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/wrenn"));
    let driver = (!args.skip_sdk).then(|| driver(args, &config, &run_id));
    Ok(Bench {
        plan: Plan::of(args),
        config,
        api,
        rest,
        state_dir,
        driver,
    })
}

fn driver(args: &BenchArgs, config: &Config, run_id: &str) -> sdk::Driver {
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = PathBuf::from(".venv/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let mut env = vec![
        ("E2B_API_URL".to_owned(), config.api_url.clone()),
        ("E2B_SANDBOX_URL".to_owned(), config.sandbox_url.clone()),
        ("WRENN_BENCH_RUN".to_owned(), run_id.to_owned()),
    ];
    if let Some(k) = &config.api_key {
        env.push(("E2B_API_KEY".to_owned(), k.clone()));
    }
    sdk::Driver {
        python,
        script: args.sdk_driver.clone(),
        args: if args.quick {
            vec!["--quick".to_owned()]
        } else {
            Vec::new()
        },
        env,
    }
}

/// Fills the connection settings not given by flag or environment from `wrenn up`'s env
/// file (`export E2B_API_URL=...` lines).
fn fill_from_env_file(conn: &mut ConnArgs, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    for (k, v) in parse_env_file(&text) {
        let slot = match k.as_str() {
            "E2B_API_URL" => &mut conn.api_url,
            "E2B_SANDBOX_URL" => &mut conn.sandbox_url,
            "E2B_API_KEY" => &mut conn.api_key,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(v);
        }
    }
    Ok(())
}

/// `KEY=value` pairs of a shell env file (`export` optional, quotes stripped, comments and
/// other lines skipped).
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.strip_prefix("export ").unwrap_or(l))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_as_wrenn_up_writes_it() {
        let text = "# for the SDKs\nexport E2B_API_URL=http://127.0.0.1:3000\nexport E2B_SANDBOX_URL=\"http://127.0.0.1:3000\"\nE2B_API_KEY='e2b_x'\n\nnot a pair\n";
        assert_eq!(
            parse_env_file(text),
            [
                ("E2B_API_URL".to_owned(), "http://127.0.0.1:3000".to_owned()),
                (
                    "E2B_SANDBOX_URL".to_owned(),
                    "http://127.0.0.1:3000".to_owned()
                ),
                ("E2B_API_KEY".to_owned(), "e2b_x".to_owned()),
            ]
        );
    }
}
