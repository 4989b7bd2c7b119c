//! A client of the daemon's API, for the CLI and the tests: HTTP/1.1 over
//! the state directory's Unix socket (or TCP with a token).

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { address: String, token: String },
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not listening.
    #[error("{0}")]
    NotRunning(String),
    /// The daemon answered with an error (its message).
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
    #[error("talking to the daemon: {0}")]
    Transport(String),
}

/// One API client.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Client {
        Client { endpoint }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let transport = |e: hyper::Error| ClientError::Transport(e.to_string());
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    ClientError::NotRunning(format!(
                        "the dmm daemon is not running (cannot reach {}: {e}); start it with `dmm daemon`",
                        path.display()
                    ))
                })?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(transport)?;
                tokio::spawn(connection);
                Ok(sender)
            }
            Endpoint::Tcp { address, .. } => {
                let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| {
                    ClientError::NotRunning(format!(
                        "the dmm daemon is not reachable at {address}: {e}"
                    ))
                })?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(transport)?;
                tokio::spawn(connection);
                Ok(sender)
            }
        }
    }

    /// Sends a request; returns the JSON body (or `Null` for no content).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
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
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Transport(e.to_string()))?
        };
        if status.is_success() {
            return Ok(json);
        }
        let message = json["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("the daemon answered {status}"));
        Err(ClientError::Refused { status, message })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
        self.call(Method::POST, path, body).await
    }
}
