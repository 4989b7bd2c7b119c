//! `dmm serve`: one disk image or block device as an NBD export.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dmm_nbd::{Export, ExportTable, Server, ServerConfig};
use dmm_store::{BlockStore, FileStore, OpenOptions};

use crate::listen::{ExportArgs, Listeners, TlsArgs, termination};

/// Serve a disk image or block device over NBD until SIGINT/SIGTERM.
///
/// Clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine,
/// nbd-client) connect to the export by its name or by the empty name. On
/// SIGINT or SIGTERM the server stops accepting, finishes in-flight
/// requests, flushes the image and exits 0. Without --socket or --listen,
/// dmm listens on TCP 127.0.0.1:10809.
#[derive(Args)]
pub struct ServeArgs {
    /// Raw disk image or block device to serve.
    path: PathBuf,

    // Without --socket or --listen: TCP on 127.0.0.1:10809.
    #[command(flatten)]
    export: ExportArgs,

    /// Refuse writes, trims and zeroing.
    #[arg(long)]
    read_only: bool,

    #[command(flatten)]
    tls: TlsArgs,
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let tls = args.tls.server_tls(dmm_tls::PeerCheck::Anyone)?;
    let options = OpenOptions {
        read_only: args.read_only,
    };
    let store = FileStore::open(&args.path, options).context("cannot serve")?;
    let store: Arc<dyn BlockStore> = Arc::new(store);
    let exports = Arc::new(ExportTable::new());
    exports.insert(Export::new(args.export.export.clone(), store.clone()))?;

    let listen = match (&args.export.socket, &args.export.listen) {
        (None, None) => Some("127.0.0.1"),
        (_, listen) => listen.as_deref(),
    };
    let listeners = Listeners::open(args.export.socket.clone(), listen).await?;
    let mode = if args.read_only {
        "read-only"
    } else {
        "read-write"
    };
    eprintln!(
        "dmm: serving {} ({} bytes, {mode}) as export {:?} on {}{}",
        args.path.display(),
        store.size(),
        args.export.export,
        listeners.describe().join(" and "),
        match &tls {
            Some(tls) if tls.required => ", TLS required",
            Some(_) => ", TLS offered",
            None => "",
        }
    );

    let config = ServerConfig {
        tls,
        ..ServerConfig::default()
    };
    let server = Server::new(exports, config);
    let stop = async {
        let signalled = termination().await;
        server.shutdown().await;
        signalled
    };
    let (signalled, ()) = tokio::join!(stop, listeners.serve(&server));
    signalled?;
    store.flush().await.context("final flush failed")?;
    eprintln!("dmm: stopped; {} flushed", args.path.display());
    Ok(())
}
