//! Where an NBD server listens: a Unix socket or a TCP address, as given on
//! the command line, and the signal that stops it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use dmm_nbd::{Server, ServerTls, TlsMode};
use dmm_tls::{CertificateDir, PeerCheck};
use tokio::net::TcpListener;

/// Where and under which name an NBD export is offered.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Listen on a Unix socket at this path.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Listen on TCP ADDR[:PORT] (port 10809 when omitted).
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub listen: Option<String>,

    /// Export name; clients asking for the empty name get it too.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export: String,
}

/// TLS of an NBD server, with the option names nbdkit uses.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Offer TLS to NBD clients (on), require it (require: a client in
    /// clear gets NBD_REP_ERR_TLS_REQD and no export), or not (off).
    #[arg(long, value_name = "off|on|require", default_value = "off")]
    pub tls: TlsMode,

    /// Certificates directory in QEMU's layout: server-cert.pem and
    /// server-key.pem, and ca-cert.pem to verify clients (`dmm tls issue`
    /// makes one).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,

    /// Require NBD clients to present a certificate signed by ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,

    /// Accept only clients whose certificate is valid for one of these
    /// names (implies --tls-verify-peer).
    #[arg(long, value_name = "NAME,…", value_delimiter = ',')]
    pub tls_allow: Vec<String>,
}

impl TlsArgs {
    /// The server's TLS, or `None` with `--tls=off`; clients are asked for
    /// a certificate as `--tls-verify-peer` and `--tls-allow` say, or else
    /// as `otherwise` does.
    pub fn server_tls(&self, otherwise: PeerCheck) -> Result<Option<ServerTls>> {
        if self.tls == TlsMode::Off {
            if self.tls_verify_peer || !self.tls_allow.is_empty() {
                anyhow::bail!("--tls-verify-peer and --tls-allow need --tls=on or --tls=require");
            }
            return Ok(None);
        }
        let Some(dir) = &self.tls_certificates else {
            anyhow::bail!("--tls={} needs --tls-certificates DIR", self.tls);
        };
        let peers = match (self.tls_verify_peer, self.tls_allow.is_empty()) {
            (false, true) => otherwise,
            _ => PeerCheck::Verified {
                allow: self.tls_allow.clone(),
            },
        };
        let config = dmm_tls::server_config(&CertificateDir::new(dir), &peers)?;
        Ok(ServerTls::new(self.tls, config))
    }
}

/// The IANA port of NBD.
pub const NBD_PORT: u16 = 10809;

/// Resolves `ADDR[:PORT]` (port 10809 when omitted).
pub async fn resolve(text: &str) -> Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, NBD_PORT));
    }
    let with_port = if text
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        text.to_owned()
    } else {
        format!("{text}:{NBD_PORT}")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("cannot resolve {text:?}"))?
        .next()
        .with_context(|| format!("{text:?} resolves to no address"))
}

/// The listeners a command was asked to open.
pub struct Listeners {
    pub unix: Option<(PathBuf, tokio::net::UnixListener)>,
    pub tcp: Option<TcpListener>,
}

impl Listeners {
    /// Opens the Unix socket and/or TCP listener.
    pub async fn open(socket: Option<PathBuf>, listen: Option<&str>) -> Result<Listeners> {
        let unix = match socket {
            Some(path) => {
                let listener = dmm_nbd::bind_unix(&path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                Some((path, listener))
            }
            None => None,
        };
        let tcp = match listen {
            Some(text) => {
                let addr = resolve(text).await?;
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                Some(listener)
            }
            None => None,
        };
        Ok(Listeners { unix, tcp })
    }

    /// Human description of where clients can connect.
    pub fn describe(&self) -> Vec<String> {
        let mut places = Vec::new();
        if let Some((path, _)) = &self.unix {
            places.push(format!("unix:{}", path.display()));
        }
        if let Some(addr) = self.tcp.as_ref().and_then(|l| l.local_addr().ok()) {
            places.push(format!("tcp:{addr}"));
        }
        places
    }

    /// Serves on every listener until the server shuts down; removes the
    /// Unix socket file afterwards.
    pub async fn serve(self, server: &Server) {
        let (socket_path, unix) = match self.unix {
            Some((path, listener)) => (Some(path), Some(listener)),
            None => (None, None),
        };
        let unix = async {
            if let Some(listener) = unix {
                server.serve_unix(listener).await;
            }
        };
        let tcp = async {
            if let Some(listener) = self.tcp {
                server.serve_tcp(listener).await;
            }
        };
        tokio::join!(unix, tcp);
        if let Some(path) = socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
