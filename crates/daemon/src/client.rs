//! A typed client of the daemon's API, for the CLI and the tests: HTTP/1.1
//! over the state directory's Unix socket (or TCP with a token), one
//! method per call of the API, answers as [`View`]s.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use dmm_catalog::{Event, MigrationId, Verb};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::cluster::{ClusterView, Whereabouts};
use crate::peers::{Hello, PeerStatus};
use crate::receive::{ReceiveRequest, Receiving};
use crate::settings::Shown as Setting;
use crate::view::{QueueMove, QueueView, View};

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp {
        address: String,
        token: String,
    },
    /// A peer daemon's API over mutual TLS: its certificate must be valid
    /// for `name`; this node presents its own.
    Peer {
        address: String,
        name: String,
        tls: std::sync::Arc<rustls::ClientConfig>,
    },
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not listening.
    #[error("{0}")]
    NotRunning(String),
    /// The daemon answered with an error (its message).
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
    /// The exchange itself failed.
    #[error("talking to the daemon: {what}")]
    Transport {
        what: &'static str,
        #[source]
        source: Cause,
    },
}

fn transport(what: &'static str) -> impl FnOnce(Cause) -> ClientError {
    move |source| ClientError::Transport { what, source }
}

/// The answer of `POST /api/peer/digests`: BLAKE3 digests in hex.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Digests {
    pub digests: Vec<String>,
}

/// The answer of `GET /api/health`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Longest a call to a peer daemon may take, connection and TLS included.
const PEER_CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One API client.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Client {
        Client { endpoint }
    }

    /// Creates a migration (started unless `halted`).
    pub async fn create(
        &self,
        properties: &BTreeMap<String, String>,
        halted: bool,
    ) -> Result<View, ClientError> {
        let body = json!({ "properties": properties, "halted": halted });
        self.call(Method::POST, "/api/migrations", Some(body)).await
    }

    pub async fn list(&self) -> Result<Vec<View>, ClientError> {
        self.call(Method::GET, "/api/migrations", None::<()>).await
    }

    pub async fn get(&self, id: MigrationId) -> Result<View, ClientError> {
        let path = format!("/api/migrations/{id}");
        self.call(Method::GET, &path, None::<()>).await
    }

    /// Applies a verb; `delete` answers with nothing.
    pub async fn apply(&self, id: MigrationId, verb: Verb) -> Result<Option<View>, ClientError> {
        let (method, path) = match verb {
            Verb::Delete { force } => (
                Method::DELETE,
                format!("/api/migrations/{id}?force={force}"),
            ),
            Verb::Halt { remove } => (
                Method::POST,
                format!("/api/migrations/{id}/halt?remove={remove}"),
            ),
            other => (
                Method::POST,
                format!("/api/migrations/{id}/{}", other.name()),
            ),
        };
        self.call(method, &path, None::<()>).await
    }

    /// Changes properties.
    pub async fn set(
        &self,
        id: MigrationId,
        changes: &BTreeMap<String, String>,
    ) -> Result<View, ClientError> {
        let path = format!("/api/migrations/{id}/properties");
        self.call(Method::PATCH, &path, Some(changes)).await
    }

    /// Retries a tree migration's file in error now.
    pub async fn retry(&self, id: MigrationId, path: &str) -> Result<View, ClientError> {
        let route = format!("/api/migrations/{id}/retry");
        self.call(Method::POST, &route, Some(json!({ "path": path })))
            .await
    }

    /// A migration's event log, oldest first.
    pub async fn log(&self, id: MigrationId) -> Result<Vec<Event>, ClientError> {
        let path = format!("/api/migrations/{id}/log");
        self.call(Method::GET, &path, None::<()>).await
    }

    /// The daemon's settings.
    pub async fn settings(&self) -> Result<BTreeMap<String, Setting>, ClientError> {
        self.call(Method::GET, "/api/config", None::<()>).await
    }

    /// Changes daemon settings.
    pub async fn configure(
        &self,
        changes: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, Setting>, ClientError> {
        self.call(Method::PATCH, "/api/config", Some(changes)).await
    }

    /// The start queue.
    pub async fn queue(&self) -> Result<QueueView, ClientError> {
        self.call(Method::GET, "/api/queue", None::<()>).await
    }

    /// Moves a queued migration to `position` (1: next to start).
    pub async fn move_in_queue(
        &self,
        migration: MigrationId,
        position: usize,
    ) -> Result<QueueView, ClientError> {
        let body = QueueMove {
            migration,
            position,
        };
        self.call(Method::POST, "/api/queue", Some(body)).await
    }

    /// What a peer daemon says about itself (over mutual TLS).
    pub async fn peer_hello(&self) -> Result<Hello, ClientError> {
        self.call(Method::GET, "/api/peer/hello", None::<()>).await
    }

    /// Asks a peer daemon to receive a volume (over mutual TLS).
    pub async fn peer_receive(&self, request: &ReceiveRequest) -> Result<Receiving, ClientError> {
        self.call(Method::POST, "/api/peer/receive", Some(request))
            .await
    }

    /// Asks a peer daemon to serve a volume it received, under its export
    /// name, through this node's NBD listener `nbd` (the handoff).
    pub async fn peer_serve(&self, export: &str, nbd: &str) -> Result<(), ClientError> {
        let body = json!({ "export": export, "owner_nbd": nbd });
        self.call::<serde_json::Value>(Method::POST, "/api/peer/serve", Some(body))
            .await
            .map(drop)
    }

    /// Tells a peer daemon it owns a volume it was handed (the commit).
    pub async fn peer_own(&self, export: &str) -> Result<(), ClientError> {
        let body = json!({ "export": export });
        self.call::<serde_json::Value>(Method::POST, "/api/peer/own", Some(body))
            .await
            .map(drop)
    }

    /// Tells a peer daemon this node's migration to it is gone.
    pub async fn peer_release(&self, export: &str) -> Result<(), ClientError> {
        let body = json!({ "export": export });
        self.call::<serde_json::Value>(Method::POST, "/api/peer/release", Some(body))
            .await
            .map(drop)
    }

    /// Digests of ranges of a volume a peer daemon receives, computed
    /// there.
    pub async fn peer_digests(
        &self,
        export: &str,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<String>, ClientError> {
        let body = json!({ "export": export, "ranges": ranges });
        let answer: Digests = self
            .call(Method::POST, "/api/peer/digests", Some(body))
            .await?;
        Ok(answer.digests)
    }

    /// This daemon's peers, each asked who it is.
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, ClientError> {
        self.call(Method::GET, "/api/peers", None::<()>).await
    }

    /// The nodes of the daemon's cluster (`dmm nodes`).
    pub async fn cluster_nodes(&self) -> Result<ClusterView, ClientError> {
        self.call(Method::GET, "/api/cluster/nodes", None::<()>)
            .await
    }

    /// Which node owns a volume (`dmm where`).
    pub async fn whereabouts(&self, volume: &str) -> Result<Whereabouts, ClientError> {
        let path = format!("/api/cluster/volumes/{}", path_segment(volume));
        self.call(Method::GET, &path, None::<()>).await
    }

    /// Whether the daemon answers, and its version.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(Method::GET, "/api/health", None::<()>).await
    }

    /// A one-time login URL of the dashboard; `listen` asks for the
    /// loopback address it is served on.
    pub async fn login_url(&self, listen: Option<&str>) -> Result<String, ClientError> {
        #[derive(serde::Deserialize)]
        struct Login {
            url: String,
        }
        let body = json!({ "listen": listen });
        let login: Login = self.call(Method::POST, "/api/ui/login", Some(body)).await?;
        Ok(login.url)
    }

    /// The OpenAPI document that describes the API.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/api/openapi.json", None::<()>)
            .await
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let io = match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    ClientError::NotRunning(format!(
                        "the dmm daemon is not running (cannot reach {}: {e}); start it with `dmm daemon`",
                        path.display()
                    ))
                })?;
                handshake(stream).await?
            }
            Endpoint::Tcp { address, .. } => {
                let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| {
                    ClientError::NotRunning(format!(
                        "the dmm daemon is not reachable at {address}: {e}"
                    ))
                })?;
                handshake(stream).await?
            }
            Endpoint::Peer { address, name, tls } => {
                let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| {
                    ClientError::NotRunning(format!(
                        "peer {name} is not reachable at {address}: {e}"
                    ))
                })?;
                let server = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| transport("name the peer")(e.into()))?;
                let secure = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(server, stream)
                    .await
                    .map_err(|e| {
                        ClientError::NotRunning(format!("peer {name} at {address}: TLS: {e}"))
                    })?;
                handshake(secure).await?
            }
        };
        Ok(io)
    }

    /// Sends a request; reads the JSON answer as `T` (no content reads as
    /// JSON `null`).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<impl Serialize>,
    ) -> Result<T, ClientError> {
        let Endpoint::Peer { name, address, .. } = &self.endpoint else {
            return self.exchange(method, path, body).await;
        };
        // A peer that hangs (stopped, cut off) must not hold up a verb or
        // the supervisor's follow-up of a migration.
        tokio::time::timeout(PEER_CALL_LIMIT, self.exchange(method, path, body))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::NotRunning(format!(
                    "peer {name} at {address} did not answer within {} s",
                    PEER_CALL_LIMIT.as_secs()
                )))
            })
    }

    /// One request and its answer.
    async fn exchange<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<impl Serialize>,
    ) -> Result<T, ClientError> {
        let mut sender = self.connect().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "dmm");
        if let Endpoint::Tcp { token, .. } = &self.endpoint {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                let text = serde_json::to_vec(&json).map_err(|e| transport("encode")(e.into()))?;
                Full::new(Bytes::from(text))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| transport("build the request")(e.into()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport("send")(e.into()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport("receive")(e.into()))?
            .to_bytes();
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|answer| answer["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("the daemon answered {status}"));
            return Err(ClientError::Refused { status, message });
        }
        serde_json::from_slice(bytes).map_err(|e| transport("decode the answer")(e.into()))
    }
}

async fn handshake<S>(stream: S) -> Result<Sender, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport("handshake")(e.into()))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `text` as one segment of a URL's path: every byte but the unreserved
/// ones percent-encoded.
fn path_segment(text: &str) -> String {
    let mut segment = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                segment.push(byte as char)
            }
            other => segment.push_str(&format!("%{other:02X}")),
        }
    }
    segment
}
