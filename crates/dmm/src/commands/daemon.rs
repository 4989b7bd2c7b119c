//! `dmm daemon`: the long-running service (see the `dmm-daemon` crate).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use dmm_daemon::{DaemonConfig, Joining};

use crate::Global;
use crate::listen::{TlsArgs, termination};

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

    /// NBD's TLS; --tls-certificates also puts the TCP API (--listen) on
    /// TLS, with the same server-cert.pem and server-key.pem.
    #[command(flatten)]
    tls: TlsArgs,

    /// This node's name: the name its certificates are valid for, as its
    /// peers list it.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,

    /// A peer daemon: its name (its certificate's) and its API's TCP
    /// address. Peers call each other's API with mutual TLS (needs
    /// --listen and --tls-certificates with client-cert.pem).
    #[arg(long = "peer", value_name = "NAME=ADDR:PORT", value_parser = peer)]
    peers: Vec<(String, String)>,

    /// Join the cluster on this etcd (its client URLs, comma-separated):
    /// the node registers itself (needs --node), owns the volumes it
    /// exports, and serves each only while it knows its lease is alive.
    #[arg(long, value_name = "URL,...", value_delimiter = ',', requires = "node")]
    etcd: Vec<String>,

    /// The node's lease in the cluster: a node that stops renewing it is
    /// down after this long, and stops serving its volumes a third of it
    /// sooner.
    #[arg(long, value_name = "DURATION", default_value = "6s", value_parser = lease_ttl)]
    lease_ttl: std::time::Duration,
}

/// `--lease-ttl`: whole seconds, at least 2.
fn lease_ttl(text: &str) -> Result<std::time::Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl.as_secs() < 2 || ttl.subsec_nanos() != 0 {
        return Err(format!("{text}: a lease is whole seconds, at least 2s"));
    }
    Ok(ttl)
}

/// `--peer NAME=ADDR:PORT`.
fn peer(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, address)) if !name.is_empty() && address.contains(':') => {
            Ok((name.to_owned(), address.to_owned()))
        }
        _ => Err(format!("{text:?} is not NAME=ADDR:PORT")),
    }
}

pub async fn run(args: DaemonArgs, global: &Global) -> Result<()> {
    // With peers, NBD clients are asked for a certificate: the exports a
    // daemon offers a peer are visible to that peer's certificate only.
    let check = match args.peers.is_empty() {
        true => dmm_tls::PeerCheck::Anyone,
        false => dmm_tls::PeerCheck::Optional,
    };
    let nbd_tls = args.tls.server_tls(check)?;
    if args.tls.tls_certificates.is_some() && args.listen.is_none() && nbd_tls.is_none() {
        bail!("--tls-certificates is for the TCP API (--listen) or NBD's TLS (--tls=on|require)");
    }
    let config = DaemonConfig {
        state_dir: global.state_dir.clone(),
        nbd_listen: args.nbd_listen,
        api_listen: args.listen,
        token_file: args.token_file,
        tls_certificates: args.tls.tls_certificates,
        nbd_tls,
        node: args.node,
        peers: args.peers.into_iter().collect(),
        cluster: (!args.etcd.is_empty()).then_some(Joining {
            endpoints: args.etcd,
            lease_ttl: args.lease_ttl,
        }),
    };
    eprintln!("dmm daemon: state directory {}", config.state_dir.display());
    dmm_daemon::run(config, async {
        let _ = termination().await;
    })
    .await
}
