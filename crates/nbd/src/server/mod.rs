//! The NBD server: listeners, connections, shutdown.
//!
//! A [`Server`] serves the exports of an [`ExportTable`] on any number of
//! Unix-socket and TCP listeners. Each connection runs the handshake, then
//! the transmission loop, in its own task; a protocol violation or a
//! vanished client ends that connection only. [`Server::shutdown`] stops the
//! listeners, lets in-flight requests finish and their replies go out, and
//! waits for every connection task to end.

mod exports;
mod handshake;
mod replies;
mod transmission;

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use exports::{Export, ExportExists, ExportTable, Route};

use crate::proto::ProtocolError;
use handshake::{Ending, TlsState};

/// Limits of a server; the defaults suit a local disk image.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest read or write payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Requests of one connection executing at once.
    pub max_in_flight: usize,
    /// Payload bytes of one connection held in memory at once.
    pub max_in_flight_bytes: usize,
    /// Time a client has to finish the handshake (TLS included).
    pub handshake_timeout: Duration,
    /// TLS, when offered.
    pub tls: Option<crate::ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_payload: 32 << 20,
            max_in_flight: 128,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("handshake not finished in time")]
    HandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// An NBD server over a table of exports.
pub struct Server {
    exports: std::sync::Arc<ExportTable>,
    config: ServerConfig,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl Server {
    pub fn new(exports: std::sync::Arc<ExportTable>, config: ServerConfig) -> Server {
        Server {
            exports,
            config,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        }
    }

    pub fn exports(&self) -> &ExportTable {
        &self.exports
    }

    /// Accepts connections on a Unix socket until shutdown.
    pub async fn serve_unix(&self, listener: UnixListener) {
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    enlarge_send_buffer(&stream);
                    self.spawn_connection(stream, "unix".to_owned())
                }
                Err(err) => accept_failed(err).await,
            }
        }
    }

    /// Accepts connections on a TCP listener until shutdown.
    pub async fn serve_tcp(&self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Small replies must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    enlarge_send_buffer(&stream);
                    self.spawn_connection(stream, peer.to_string());
                }
                Err(err) => accept_failed(err).await,
            }
        }
    }

    /// Serves one already-connected stream (any transport).
    pub fn spawn_connection<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let exports = self.exports.clone();
        let config = self.config.clone();
        let shutdown = self.shutdown.child_token();
        self.connections.spawn(async move {
            tracing::debug!(%peer, "client connected");
            match connection(stream, &exports, &config, shutdown).await {
                Ok(()) => tracing::debug!(%peer, "client disconnected"),
                // A certificate refused is worth an admin's attention.
                Err(err @ ConnectionError::Tls(_)) => {
                    tracing::warn!(%peer, "client refused: {err}")
                }
                Err(err) => tracing::info!(%peer, "client dropped: {err}"),
            }
        });
    }

    /// Stops accepting, lets in-flight requests finish, and waits for every
    /// connection to end.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.connections.close();
        self.connections.wait().await;
    }

    /// Connections open now (handshaking or transmitting).
    pub fn clients(&self) -> usize {
        self.connections.len()
    }

    /// Resolves once shutdown has begun.
    pub async fn stopping(&self) {
        self.shutdown.cancelled().await
    }
}

/// Lets a large read reply go out in few system calls (best effort: the
/// kernel caps it at `net.core.wmem_max`).
fn enlarge_send_buffer(socket: &impl std::os::fd::AsFd) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(socket, 4 << 20);
}

async fn accept_failed(err: io::Error) {
    // Out of file descriptors and the like: back off instead of spinning.
    tracing::warn!("accept failed: {err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn connection<S>(
    stream: S,
    exports: &ExportTable,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = negotiate(stream, exports, config);
    let (stream, ending) = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        outcome = tokio::time::timeout(config.handshake_timeout, handshake) => {
            outcome.map_err(|_| ConnectionError::HandshakeTimeout)??
        }
    };
    let Ending::Session(session) = ending else {
        return Ok(());
    };
    tracing::debug!(export = %session.export.name, "transmission starts");
    transmission::serve(stream, session, config, shutdown).await
}

/// The stream of a connection: as accepted, or encrypted after STARTTLS.
type Upgraded<S> = Either<S, tokio_rustls::server::TlsStream<S>>;

/// Runs the handshake, through a TLS upgrade if the client asks for one.
async fn negotiate<S>(
    mut stream: S,
    exports: &ExportTable,
    config: &ServerConfig,
) -> Result<(Upgraded<S>, Ending), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = handshake::greet(&mut stream).await?;
    let mut tls = TlsState {
        offered: config.tls.is_some(),
        required: config.tls.as_ref().is_some_and(|tls| tls.required),
        active: false,
    };
    let ending = handshake::options(
        &mut stream,
        exports,
        config.max_payload,
        no_zeroes,
        tls,
        &[],
    )
    .await?;
    let (Ending::StartTls, Some(server)) = (&ending, &config.tls) else {
        return Ok((Either::Left(stream), ending));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
    let mut secure = acceptor
        .accept(stream)
        .await
        .map_err(ConnectionError::Tls)?;
    let client = secure
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(dmm_tls::peer_names)
        .unwrap_or_default();
    tracing::debug!(?client, "TLS established");
    tls.active = true;
    let ending = handshake::options(
        &mut secure,
        exports,
        config.max_payload,
        no_zeroes,
        tls,
        &client,
    )
    .await?;
    Ok((Either::Right(secure), ending))
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by a
/// dead server but never a live one or a file that is not a socket.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    UnixListener::bind(path)
}
