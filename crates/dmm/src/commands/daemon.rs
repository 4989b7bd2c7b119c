//! `dmm daemon`: the long-running service (see the `dmm-daemon` crate).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use dmm_daemon::DaemonConfig;

use crate::Global;
use crate::listen::termination;

/// Run the migration daemon: catalog, NBD exports, HTTP API.
///
/// Everything lives in the state directory: catalog.db (SQLite), api.sock
/// (the API, owner only), nbd.sock (every volume, by export name) and
/// volumes/<migid>/ (copy state). SIGINT/SIGTERM stop every migration
/// resumably; a restarted daemon resumes them.
#[derive(Args)]
pub struct DaemonArgs {
    /// Also serve NBD on TCP ADDR:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<String>,

    /// Also serve the API on TCP ADDR:PORT (requests need the bearer token
    /// of --token-file). Without --tls-certificates only a loopback address
    /// is accepted.
    #[arg(long, value_name = "ADDR:PORT", requires = "token_file")]
    listen: Option<String>,

    /// File holding the API's bearer token (at least 16 characters).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// Serve the TCP API over TLS with server-cert.pem and server-key.pem
    /// from DIR (the layout QEMU and libnbd use).
    #[arg(long, value_name = "DIR", requires = "listen")]
    tls_certificates: Option<PathBuf>,
}

pub async fn run(args: DaemonArgs, global: &Global) -> Result<()> {
    let config = DaemonConfig {
        state_dir: global.state_dir.clone(),
        nbd_listen: args.nbd_listen,
        api_listen: args.listen,
        token_file: args.token_file,
        tls_certificates: args.tls_certificates,
    };
    eprintln!("dmm daemon: state directory {}", config.state_dir.display());
    dmm_daemon::run(config, async {
        let _ = termination().await;
    })
    .await
}
