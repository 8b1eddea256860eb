//! `wrenn sandbox ...`: the sandbox CLI, a client of the REST API and (through the edge proxy)
//! of envd, configured like the E2B SDKs (`E2B_API_URL`, `E2B_SANDBOX_URL`, `E2B_API_KEY`).

mod api;
mod bench;
mod config;
mod dockerfile;
mod envd;
mod exec;
mod output;
mod template;
mod terminal;

use std::process::ExitCode;

use clap::Subcommand;

pub use self::bench::{BenchArgs, run as run_bench};

use self::api::Api;
use self::config::Config;

/// `wrenn sandbox` arguments.
#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    cmd: SandboxCmd,
}

/// `wrenn template` arguments.
#[derive(Debug, clap::Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    cmd: template::TemplateCmd,
}

/// Runs a template subcommand.
pub fn run_template(args: TemplateArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(&args.conn)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let api = Api::new(&config)?;
        template::run(&api, config.json, args.cmd).await
    })
}

/// Where Wrenn is and how to authenticate: the same knobs as the E2B SDKs.
#[derive(Debug, Clone, clap::Args)]
struct ConnArgs {
    /// Base URL of the REST API.
    #[arg(long, global = true, env = "E2B_API_URL", value_name = "URL")]
    api_url: Option<String>,
    /// Base URL of the edge proxy for envd traffic (default: the API URL).
    #[arg(long, global = true, env = "E2B_SANDBOX_URL", value_name = "URL")]
    sandbox_url: Option<String>,
    /// API key (default: `$WRENN_STATE_DIR/api-key` or `/var/lib/wrenn/api-key`, as written
    /// by `wrenn up`).
    #[arg(
        long,
        global = true,
        env = "E2B_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
    /// Print the API's JSON responses instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SandboxCmd {
    /// Create a sandbox and print its ID.
    Create(CreateArgs),
    /// List running and paused sandboxes.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Run a command in a sandbox (`/bin/bash -l -c`), streaming its output; exits with its code.
    Exec(exec::ExecArgs),
    /// Open an interactive shell in a sandbox.
    #[command(alias = "term", alias = "shell")]
    Terminal(terminal::TerminalArgs),
    /// Kill a sandbox.
    #[command(alias = "rm")]
    Kill(IdArg),
    /// Pause a sandbox (memory and disk kept; `--filesystem`: only the disk).
    Pause(PauseArgs),
    /// Resume a paused sandbox (a running one just gets its timeout extended).
    Resume(ResumeArgs),
    /// Show a sandbox.
    #[command(alias = "get")]
    Info(IdArg),
    /// Copy a running or paused sandbox (memory, processes and disk) into new sandboxes; prints
    /// each child's ID (or its error).
    Fork(ForkArgs),
}

#[derive(Debug, clap::Args)]
struct ForkArgs {
    /// Sandbox ID.
    id: String,
    /// How many copies (1-20).
    #[arg(long, short = 'n', default_value_t = 1)]
    count: u32,
    /// Seconds each copy lives; server default if unset.
    #[arg(long)]
    timeout: Option<i64>,
}

#[derive(Debug, clap::Args)]
struct IdArg {
    /// Sandbox ID.
    id: String,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Template ID or alias.
    #[arg(long, short, default_value = "base")]
    template: String,
    /// Seconds until the sandbox is killed (or paused, with --auto-pause); server default if unset.
    #[arg(long)]
    timeout: Option<i64>,
    /// Environment variable for every process in the sandbox (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_kv)]
    envs: Vec<(String, String)>,
    /// Metadata (repeatable).
    #[arg(long, short, value_name = "K=V", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// Pause instead of kill when the timeout expires.
    #[arg(long)]
    auto_pause: bool,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only sandboxes in this state (repeatable; default: running and paused).
    #[arg(long, value_parser = ["running", "paused"])]
    state: Vec<String>,
    /// Only sandboxes with this metadata (repeatable; all must match).
    #[arg(long, short, value_name = "K=V", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// Page size asked of the server (all pages are fetched).
    #[arg(long)]
    limit: Option<u32>,
}

#[derive(Debug, clap::Args)]
struct PauseArgs {
    /// Sandbox ID.
    id: String,
    /// Keep only the disk (synced): the resume boots it cold, without processes or memory.
    #[arg(long)]
    filesystem: bool,
}

#[derive(Debug, clap::Args)]
struct ResumeArgs {
    /// Sandbox ID.
    id: String,
    /// Seconds the sandbox lives after resuming.
    #[arg(long, default_value_t = 300)]
    timeout: i64,
    /// Boot the disk cold even if the pause kept the memory (processes and memory are lost).
    #[arg(long)]
    reboot: bool,
}

/// Parses `K=V` (the value may contain `=`; an empty key is refused).
fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected K=V, got {s:?}")),
    }
}

/// Runs a sandbox subcommand.
pub fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(&args.conn)?;
    // One thread is plenty for a CLI; blocking stdin reads happen on their own thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(dispatch(config, args.cmd));
    // Do not wait for blocking tasks (a stdin read may never return).
    rt.shutdown_background();
    result
}

async fn dispatch(config: Config, cmd: SandboxCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(&config)?;
    let json = config.json;
    match cmd {
        SandboxCmd::Create(a) => {
            let body = wrenn_api::NewSandbox {
                template_id: a.template,
                timeout: a.timeout,
                auto_pause: a.auto_pause.then_some(true),
                metadata: Some(a.metadata.into_iter().collect()),
                env_vars: Some(a.envs.into_iter().collect()),
                ..Default::default()
            };
            let sbx = api.create(&body).await?;
            if json {
                output::print_json(&sbx)?;
            } else {
                println!("{}", output::str_field(&sbx, "sandboxID"));
            }
        }
        SandboxCmd::List(a) => {
            let items = api.list(&a.state, &a.metadata, a.limit).await?;
            if json {
                output::print_json(&serde_json::Value::Array(items))?;
            } else {
                print!("{}", output::table(&items));
            }
        }
        SandboxCmd::Kill(a) => {
            api.kill(&a.id).await?;
            if !json {
                println!("killed {}", a.id);
            }
        }
        SandboxCmd::Fork(a) => {
            let forks = api.fork(&a.id, a.count, a.timeout).await?;
            if json {
                output::print_json(&serde_json::Value::Array(forks.clone()))?;
            }
            let mut failed = false;
            for f in &forks {
                if let Some(sbx) = f.get("sandbox") {
                    if !json {
                        println!("{}", output::str_field(sbx, "sandboxID"));
                    }
                } else {
                    failed = true;
                    let msg = f["error"]["message"].as_str().unwrap_or("failed to start");
                    eprintln!("error: a copy failed: {msg}");
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        SandboxCmd::Pause(a) => {
            api.pause(&a.id, !a.filesystem).await?;
            if !json {
                let how = if a.filesystem {
                    " (filesystem only)"
                } else {
                    ""
                };
                println!("paused {}{how}", a.id);
            }
        }
        SandboxCmd::Resume(a) => {
            let (sbx, resumed) = api.connect(&a.id, Some(a.timeout), a.reboot).await?;
            if json {
                output::print_json(&sbx)?;
            } else if resumed {
                println!("resumed {}", a.id);
            } else {
                println!(
                    "{} was already running; its timeout is now {}s",
                    a.id, a.timeout
                );
            }
        }
        SandboxCmd::Info(a) => {
            let detail = api.info(&a.id).await?;
            if json {
                output::print_json(&detail)?;
            } else {
                print!("{}", output::detail(&detail));
            }
        }
        SandboxCmd::Exec(a) => return exec::run(&config, &api, a).await,
        SandboxCmd::Terminal(a) => return terminal::run(&config, &api, a).await,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv() {
        assert_eq!(parse_kv("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_kv("A="), Ok(("A".into(), String::new())));
        assert!(parse_kv("=x").is_err());
        assert!(parse_kv("nokey").is_err());
    }
}
