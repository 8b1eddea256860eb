//! `wrenn`: thin entry point; the subcommands live in the library.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "Wrenn: self-hostable microVM sandboxes, E2B-compatible"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the control plane, a host agent and the proxy in one process (SQLite by default).
    Up(wrenn::up::UpArgs),
    /// Start a control plane (API and edge proxy) for hosts that run `wrenn agent`; several
    /// replicas may share one PostgreSQL database.
    Server(wrenn::server::ServerArgs),
    /// Start a host agent that joins a `wrenn server` and runs its sandboxes.
    Agent(wrenn::agent::AgentArgs),
    /// Work with sandboxes through a running Wrenn (create, list, exec, terminal, ...).
    #[command(alias = "sbx")]
    Sandbox(wrenn::cli::SandboxArgs),
    /// Build, list and delete templates (`wrenn template build -f Dockerfile --name NAME`).
    #[command(alias = "tpl")]
    Template(wrenn::cli::TemplateArgs),
    /// Measure a running Wrenn (create, first command, pause/resume, files, memory, capacity)
    /// and write docs/performance.md.
    Bench(wrenn::cli::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up(args) => wrenn::up::run(args),
        Cmd::Server(args) => wrenn::server::run(args),
        Cmd::Agent(args) => wrenn::agent::run(args),
        Cmd::Sandbox(args) => wrenn::cli::run(args),
        Cmd::Template(args) => wrenn::cli::run_template(args),
        Cmd::Bench(args) => wrenn::cli::run_bench(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
