//! `dmm migrate`: move a volume while clients use it over NBD.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use dmm_nbd::{Access, Export, ExportTable, Server, ServerConfig, open_store};
use dmm_store::BlockStore;
use dmm_volume::{
    ErrorKind, Migration, MigrationConfig, MigrationError, Phase, Priority, Strategy, Verify,
};

use crate::Global;
use crate::listen::{ExportArgs, Listeners, termination};
use crate::report::{self, Style};
use dmm_control::{human, parse_size};

/// Migrate a volume from SRC to DST while clients keep using it.
///
/// The volume is exported over NBD for the whole migration (and after it):
/// clients connect once and never reconnect, before, during or after the
/// switchover. SRC and DST are raw image files, block devices or NBD URIs
/// (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH). The state is
/// saved as the copy goes: after a crash or a stop, the same command
/// resumes where it was. Once the destination holds the whole volume and
/// verification passed, the migration is committed (the source is no
/// longer used). Without --socket or --listen, the export listens on the
/// Unix socket nbd.sock in the migration's state directory.
#[derive(Args)]
pub struct MigrateArgs {
    /// Source: image file, block device or NBD URI.
    source: String,

    /// Destination: image file, block device or NBD URI (at least as large
    /// as the source).
    destination: String,

    /// precopy, mirror, aio, slr, lr, redirect or auto (precopy that
    /// escalates to mirror when the dirty set stops shrinking).
    #[arg(long, default_value = "auto")]
    strategy: Strategy,

    // Without --socket or --listen: nbd.sock in the state directory.
    #[command(flatten)]
    export: ExportArgs,

    /// Copy bandwidth limit in bytes per second (suffixes K, M, G).
    #[arg(long, value_name = "BYTES_PER_S", value_parser = parse_size)]
    rate: Option<u64>,

    /// Chunk size: the unit of copying, locking and dirty tracking.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    segsize: u64,

    /// Chunks copied at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    in_flight: usize,

    /// low, normal or high: how hard the copy competes with clients.
    #[arg(long, default_value = "normal")]
    priority: Priority,

    /// Exit once the destination holds the whole volume and the source is
    /// no longer needed, as soon as no client is connected (clients still
    /// connected keep being served from the destination until the last one
    /// disconnects); `=force` exits at once, failing the I/O of connected
    /// clients. Without it dmm keeps serving the volume until SIGINT or
    /// SIGTERM.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "idle")]
    exit_when_done: Option<ExitWhenDone>,

    /// none or full: compare both stores chunk by chunk (BLAKE3) before
    /// committing.
    #[arg(long, default_value = "full")]
    verify: Verify,

    /// Roll the migration back instead: copy destination-only chunks back
    /// so that the source is complete and current, and serve the source.
    #[arg(long)]
    rollback: bool,
}

/// Bytes of the store that hold data (not holes or known zeroes).
pub async fn allocated_bytes(store: &dyn BlockStore) -> Result<u64> {
    let mut at = 0;
    let mut data = 0;
    while at < store.size() {
        let extents = store.extents(at, store.size() - at).await?;
        let Some(last) = extents.last() else { break };
        data += extents
            .iter()
            .filter(|e| !e.kind.reads_as_zero())
            .map(|e| e.len)
            .sum::<u64>();
        at = last.end();
    }
    Ok(data)
}

/// When `--exit-when-done` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExitWhenDone {
    /// Once the last client has disconnected.
    Idle,
    /// At once, whoever is connected.
    Force,
}

/// How often the number of connected clients is looked at while dmm
/// waits for the last one to go.
const CLIENTS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// After the migration is done: serves the connected clients until the
/// last one disconnects (or a signal comes), saying so.
async fn serve_remaining_clients(server: &Server, style: Style) -> Result<()> {
    let clients = server.clients();
    if clients == 0 {
        return Ok(());
    }
    if style == Style::Json {
        let line = serde_json::json!({ "event": "waiting-for-clients", "clients": clients });
        println!("{line}");
    } else {
        eprintln!(
            "dmm: done; {clients} client(s) still connected: serving the volume from the              destination until the last one disconnects (--exit-when-done=force exits at once)"
        );
    }
    let gone = async {
        while server.clients() > 0 {
            tokio::time::sleep(CLIENTS_EVERY).await;
        }
    };
    tokio::select! {
        () = gone => {}
        signal = termination() => signal?,
    }
    if style == Style::Json {
        println!("{}", serde_json::json!({ "event": "clients-gone" }));
    }
    Ok(())
}

/// The directory of one migration, named after its stores.
fn migration_dir(base: &std::path::Path, source: &str, destination: &str) -> PathBuf {
    let id = blake3_hex(&format!("{source}\n{destination}"));
    base.join("migrations").join(&id[..16])
}

fn blake3_hex(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

pub async fn run(args: MigrateArgs, global: &Global) -> Result<()> {
    let source_access = Access {
        read_only: false,
        fall_back_to_read_only: args.strategy == Strategy::Redirect,
    };
    let source = open_store(&args.source, source_access).await?;
    let destination = open_store(&args.destination, Access::default()).await?;
    let base = &global.state_dir;
    let dir = migration_dir(base, &source.name, &destination.name);
    let allocated = allocated_bytes(&*source.store).await.unwrap_or(0);
    let config = MigrationConfig {
        strategy: args.strategy,
        chunk_size: args.segsize,
        rate: args.rate,
        in_flight: args.in_flight,
        priority: args.priority,
        verify: args.verify,
        ..MigrationConfig::default()
    };
    let names = (source.name.clone(), destination.name.clone());
    let migration = Migration::open(source.store, destination.store, names, &dir, config).await?;
    let migration = Arc::new(migration);

    let exports = Arc::new(ExportTable::new());
    exports.insert(Export::new(args.export.export.clone(), migration.device()))?;
    let socket = match (&args.export.socket, &args.export.listen) {
        (None, None) => Some(dir.join("nbd.sock")),
        (socket, _) => socket.clone(),
    };
    let listeners = Listeners::open(socket, args.export.listen.as_deref()).await?;
    let style = Style::pick(global.json);
    if style != Style::Json {
        eprintln!(
            "dmm: migrating {} -> {} ({}, {} strategy), state in {}; clients connect to {}",
            args.source,
            args.destination,
            human(migration.device().size()),
            args.strategy,
            dir.display(),
            listeners.describe().join(" and ")
        );
    }
    let server = Arc::new(Server::new(exports, ServerConfig::default()));
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { listeners.serve(&server).await })
    };
    if args.rollback {
        migration.request_rollback()?;
    }
    if style == Style::Json {
        println!(
            "{}",
            report::json_line("started", &migration.progress().await)
        );
    }
    let reporter = report::spawn(migration.clone(), style);
    let outcome = run_until_signal(&migration).await;
    reporter.stop().await;
    let stopped = matches!(&outcome, Err(err) if err.kind() == ErrorKind::Stopped);
    let result = finish(&migration, outcome, style, allocated).await;
    if let Err(err) = &result
        && !stopped
        && args.exit_when_done.is_none()
    {
        eprintln!("dmm: {err:#}; still serving the volume until SIGINT or SIGTERM");
    }
    match args.exit_when_done {
        _ if stopped => {}
        None => termination().await?,
        Some(ExitWhenDone::Idle) if result.is_ok() => {
            serve_remaining_clients(&server, style).await?
        }
        Some(_) => {}
    }
    server.shutdown().await;
    serving.await?;
    migration
        .device()
        .flush()
        .await
        .context("final flush failed")?;
    let _ = migration.checkpoint().await;
    result
}

/// Runs the migration; SIGINT/SIGTERM stops it resumably.
async fn run_until_signal(migration: &Arc<Migration>) -> Result<Phase, MigrationError> {
    let running = migration.run();
    tokio::pin!(running);
    tokio::select! {
        outcome = &mut running => outcome,
        _ = termination() => {
            migration.controls().request_stop();
            running.await
        }
    }
}

/// Commits a verified migration and prints the report.
async fn finish(
    migration: &Migration,
    outcome: Result<Phase, MigrationError>,
    style: Style,
    allocated: u64,
) -> Result<()> {
    let outcome = match outcome {
        Ok(Phase::Verified) => migration.commit().await.map(|()| Phase::Committed),
        other => other,
    };
    let progress = migration.progress().await;
    let event = match &outcome {
        Ok(Phase::Committed) => "committed",
        Ok(Phase::RolledBack) => "rolled-back",
        Ok(_) => "done",
        Err(err) if err.kind() == ErrorKind::Stopped => "stopped",
        Err(_) => "failed",
    };
    if style == Style::Json {
        println!("{}", report::json_line(event, &progress));
    } else {
        println!(
            "dmm migrate: {event}\n{}",
            report::summary(&progress, allocated)
        );
    }
    match outcome {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == ErrorKind::Stopped => {
            bail!("stopped; run the same command again to resume")
        }
        Err(err) => Err(err.into()),
    }
}
