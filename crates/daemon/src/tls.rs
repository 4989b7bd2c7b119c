//! TLS for the daemon's TCP API, so that the bearer token never crosses a
//! network in clear.
//!
//! Certificates come from a directory laid out as QEMU's `tls-creds-x509`
//! and libnbd expect (`server-cert.pem`, the chain, leaf first;
//! `server-key.pem`, its PKCS#8, PKCS#1 or SEC1 key), so that admins reuse
//! what they have. TLS 1.3, and 1.2 for older clients.
//!
//! [`TlsListener`] hands axum only connections whose handshake completed.
//! Handshakes run concurrently and each is bounded, so a client that
//! connects and says nothing holds up no one.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The server's certificate chain in a certificates directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key in a certificates directory.
pub const SERVER_KEY: &str = "server-key.pem";

/// Longest a client may take to complete its handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// The server side of TLS, from a certificates directory.
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the certificate chain {}", cert_path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read the private key {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable server identity",
                cert_path.display(),
                key_path.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// A TCP listener whose connections are TLS, handshake done.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
    /// Where the certificates come from, for messages.
    dir: PathBuf,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>, dir: &Path) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
            dir: dir.to_owned(),
        }
    }

    fn start_handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some((tls, peer)),
                Ok(Err(err)) => {
                    tracing::info!(%peer, "API client refused: TLS handshake failed: {err}");
                    None
                }
                Err(_) => {
                    tracing::info!(%peer, "API client refused: no TLS handshake within {HANDSHAKE_LIMIT:?}");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => self.start_handshake(stream, peer),
                    Err(err) => {
                        // Out of descriptors and the like: back off a little,
                        // as axum's own TCP listener does.
                        tracing::warn!(certificates = %self.dir.display(), "API accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
