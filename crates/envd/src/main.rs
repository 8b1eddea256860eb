//! envd: the daemon inside every Wrenn sandbox.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = envd::Config::parse();
    envd::telemetry::init(config.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envd: start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(envd::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("envd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
