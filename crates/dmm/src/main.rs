//! `dmm`, the command line of the live data migration manager.
//!
//! Each subcommand lives in its own module under `commands/`; this file only
//! parses arguments, sets up logging and the runtime, and turns an error
//! into one line on stderr and a non-zero exit.

mod commands;
mod listen;
mod report;
mod stores;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Large I/O buffers are allocated and freed at a high rate; mimalloc
/// reuses their pages instead of faulting in fresh ones each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// dmm moves data from a source store to a destination store while
/// applications keep reading and writing it.
#[derive(Parser)]
#[command(name = "dmm", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace). RUST_LOG
    /// overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Migrate(commands::migrate::MigrateArgs),
    Verify(commands::verify::VerifyArgs),
    Serve(commands::serve::ServeArgs),
    Demo(commands::demo::DemoArgs),
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("dmm: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Migrate(args) => commands::migrate::run(args).await,
            Command::Verify(args) => commands::verify::run(args).await,
            Command::Serve(args) => commands::serve::run(args).await,
            Command::Demo(args) => commands::demo::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dmm: {err:#}");
            ExitCode::FAILURE
        }
    }
}
