//! wrenn-interpreter: the E2B code-interpreter server inside a Wrenn sandbox.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = wrenn_interpreter::Config::parse();
    wrenn_interpreter::init_logging(config.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wrenn-interpreter: start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wrenn_interpreter::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wrenn-interpreter: {}", wrenn_interpreter::error::chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
