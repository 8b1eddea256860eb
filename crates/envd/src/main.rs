//! envd: the daemon inside every Wrenn sandbox.
//!
//! One binary, three roles, chosen before any flag parsing: invoked as `init` (the initramfs
//! execs `/.wrenn/init -> envd`) it is PID 1; `envd image …` runs the image build commands;
//! anything else is the daemon.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os();
    let argv0 = args.next();
    if envd::pid1::invoked_as_init(argv0.as_deref()) {
        return envd::pid1::main();
    }
    if args.next().is_some_and(|a| a == "image") {
        // From `image` on: clap takes it as the program name.
        return envd::image::main(std::env::args_os().skip(1));
    }
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
