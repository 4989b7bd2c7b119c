//! `dmm`, the command line of the live data migration manager.
//!
//! Each subcommand lives in its own module under `commands/`; this file only
//! parses arguments, sets up logging and the runtime, and turns an error
//! into one line on stderr and a non-zero exit.

mod commands;
mod listen;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dmm_daemon::Verb;

/// Large I/O buffers are allocated and freed at a high rate; mimalloc
/// reuses their pages instead of faulting in fresh ones each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long an idle blocking-pool thread waits for work before it exits.
/// A burst of large reads or slow writes starts one thread per request in
/// flight, each with its stack and allocator cache; tokio's default of 10 s
/// keeps them all (tens of MiB) long after the burst. Starting a thread
/// again costs tens of microseconds, next to the milliseconds of I/O it
/// serves.
const BLOCKING_THREAD_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// dmm moves data from a source store to a destination store while
/// applications keep reading and writing it.
///
/// One-shot commands (migrate, verify, serve, demo) work alone; the
/// management verbs (create, start, stat, …) talk to `dmm daemon` through
/// the state directory.
#[derive(Parser)]
#[command(name = "dmm", version, about, long_about)]
struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace). RUST_LOG
    /// overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// dmm's state directory (default: $DMM_STATE_DIR, else
    /// $XDG_STATE_HOME/dmm, else ~/.local/state/dmm; /var/lib/dmm as root).
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,

    /// Machine-readable output: JSON (JSON lines for progress).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

/// Options every command sees.
pub struct Global {
    pub state_dir: PathBuf,
    pub json: bool,
}

#[derive(Subcommand)]
enum Command {
    Migrate(commands::migrate::MigrateArgs),
    Verify(commands::verify::VerifyArgs),
    Serve(commands::serve::ServeArgs),
    Demo(commands::demo::DemoArgs),
    Daemon(commands::daemon::DaemonArgs),
    Create(commands::admin::CreateArgs),
    Delete(commands::admin::DeleteArgs),
    /// Start (or restart) a migration.
    Start(commands::admin::MigidArgs),
    /// Suspend the copy in memory (clients keep working).
    Pause(commands::admin::MigidArgs),
    /// Resume a paused migration.
    Resume(commands::admin::MigidArgs),
    /// Suspend a migration with its state on disk and its resources freed.
    Stop(commands::admin::MigidArgs),
    Halt(commands::admin::HaltArgs),
    Set(commands::admin::SetArgs),
    Get(commands::admin::GetArgs),
    /// List the migrations.
    List,
    /// Show every migration in detail.
    Show,
    Stat(commands::admin::StatArgs),
    /// Let a migration with switchover=manual switch to the destination.
    Switchover(commands::admin::MigidArgs),
    /// Release the source once the destination holds everything and
    /// verification passed.
    Commit(commands::admin::MigidArgs),
    /// Roll back: copy destination-only data back, so the source holds the
    /// whole volume again.
    Rollback(commands::admin::MigidArgs),
    /// Show a migration's event log.
    Log(commands::admin::MigidArgs),
    Retry(commands::admin::RetryArgs),
    Config(commands::node::ConfigArgs),
    Queue(commands::node::QueueArgs),
    /// List the peer daemons, each asked over mutual TLS who it is.
    Peers,
    /// List the nodes of the daemon's cluster on etcd, up or down, and the
    /// volumes each owns.
    Nodes,
    Where(commands::node::WhereArgs),
    Ui(commands::ui::UiArgs),
    Tls(commands::tls::TlsArgs),
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

async fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    use commands::admin;
    match command {
        Command::Migrate(args) => commands::migrate::run(args, global).await,
        Command::Verify(args) => commands::verify::run(args, global).await,
        Command::Serve(args) => commands::serve::run(args).await,
        Command::Demo(args) => commands::demo::run(args).await,
        Command::Daemon(args) => commands::daemon::run(args, global).await,
        Command::Create(args) => admin::create(args, global).await,
        Command::Delete(args) => admin::delete(args, global).await,
        Command::Start(args) => admin::verb(Verb::Start, args, global).await,
        Command::Pause(args) => admin::verb(Verb::Pause, args, global).await,
        Command::Resume(args) => admin::verb(Verb::Resume, args, global).await,
        Command::Stop(args) => admin::verb(Verb::Stop, args, global).await,
        Command::Halt(args) => admin::halt(args, global).await,
        Command::Set(args) => admin::set(args, global).await,
        Command::Get(args) => admin::get(args, global).await,
        Command::List => admin::list(global).await,
        Command::Show => admin::show(global).await,
        Command::Stat(args) => admin::stat(args, global).await,
        Command::Switchover(args) => admin::verb(Verb::Switchover, args, global).await,
        Command::Commit(args) => admin::verb(Verb::Commit, args, global).await,
        Command::Rollback(args) => admin::verb(Verb::Rollback, args, global).await,
        Command::Log(args) => admin::log(args, global).await,
        Command::Retry(args) => admin::retry(args, global).await,
        Command::Config(args) => commands::node::config(args, global).await,
        Command::Queue(args) => commands::node::queue(args, global).await,
        Command::Peers => commands::node::peers(global).await,
        Command::Nodes => commands::node::nodes(global).await,
        Command::Where(args) => commands::node::whereabouts(args, global).await,
        Command::Ui(args) => commands::ui::run(args, global).await,
        Command::Tls(args) => commands::tls::run(args),
    }
}

/// A command-line error on one line: the problem, then the usage.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .map(|line| match line.strip_prefix("Usage:") {
            Some(usage) => format!("(usage:{usage})"),
            None => line.strip_prefix("error: ").unwrap_or(line).to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> ExitCode {
    use clap::error::ErrorKind;
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            eprintln!("dmm: {}", one_line(&err.to_string()));
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_IDLE)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("dmm: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let global = Global {
        state_dir: dmm_daemon::Layout::state_dir(cli.state_dir.as_deref()),
        json: cli.json,
    };
    let result = runtime.block_on(run(cli.command, &global));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dmm: {err:#}");
            ExitCode::FAILURE
        }
    }
}
