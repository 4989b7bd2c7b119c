//! Who may use the TCP listeners: the bearer token, or a dashboard
//! session cookie; and what happens to those who keep guessing.
//!
//! The Unix socket needs neither (its file mode admits the daemon's owner
//! only). On TCP every request must carry `Authorization: Bearer <token>`
//! or the cookie of a live dashboard session ([`Sessions`]), except the
//! dashboard's login, which exchanges a one-time code for that cookie.
//! An address that presents ten wrong credentials (token, cookie or code)
//! within a minute gets 429 until the minute ends, and each refusal is
//! logged. A request with no credential at all is refused (401) without
//! counting: a browser whose session ended is not guessing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Json, Response};
use axum::serve::IncomingStream;
use serde_json::json;
use tokio::net::TcpListener;

use crate::peers::Peers;
use crate::tls::TlsListener;
use crate::ui::{LOGIN_PATH, Sessions, sessions};

/// What the TCP listeners accept.
pub struct Access {
    /// BLAKE3 of `Bearer <token>`, when the daemon has a token.
    token: Option<blake3::Hash>,
    pub sessions: Arc<Sessions>,
    failures: AuthFailures,
    /// Peer daemons, who use `/api/peer/` with their certificates.
    peers: Arc<Peers>,
}

impl Access {
    pub fn new(token: Option<&str>, sessions: Arc<Sessions>, peers: Arc<Peers>) -> Access {
        Access {
            token: token.map(|t| blake3::hash(format!("Bearer {t}").as_bytes())),
            sessions,
            failures: AuthFailures::default(),
            peers,
        }
    }

    /// Counts a wrong credential from `peer` (and logs it).
    pub fn failed(&self, peer: Option<IpAddr>, what: &str) {
        if let Some(ip) = peer {
            self.failures.failed(ip, what);
        }
    }

    /// What `headers` prove.
    fn judge(&self, headers: &HeaderMap) -> Credential {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            // Comparing hashes keeps the comparison independent of the token.
            let presented = blake3::hash(value.as_bytes());
            return match self.token == Some(presented) {
                true => Credential::Valid,
                false => Credential::Wrong("wrong bearer token"),
            };
        }
        match sessions::secret_in(headers) {
            Some(secret) if self.sessions.check(secret) => Credential::Valid,
            // An ended session is the browser's normal course, not a guess.
            _ => Credential::Missing,
        }
    }
}

enum Credential {
    Valid,
    Missing,
    Wrong(&'static str),
}

/// The peer's address, from axum's `ConnectInfo`.
pub fn peer_of(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|info| info.0.address.ip())
}

/// The names the client's TLS certificate is valid for (none without one).
fn certificate_names(request: &Request) -> &[String] {
    request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map_or(&[], |info| &info.0.certificate)
}

/// The routes peer daemons call, with their certificates.
pub const PEER_ROUTES: &str = "/api/peer/";

/// Axum middleware of the TCP listeners.
pub async fn require(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let peer = peer_of(&request);
    if let Some(ip) = peer
        && let Some(wait) = access.failures.locked_out(ip)
    {
        return too_many_failures(wait);
    }
    if request.uri().path().starts_with(PEER_ROUTES) {
        let names = certificate_names(&request);
        if access.peers.recognize(names).is_some() {
            return next.run(request).await;
        }
        tracing::warn!(peer = ?peer, certificate = ?names, "peer route refused: not a known peer's certificate");
        let body = Json(json!({
            "error": "only this daemon's peers, by their certificates, use /api/peer/"
        }));
        return (StatusCode::FORBIDDEN, body).into_response();
    }
    if request.uri().path() == LOGIN_PATH {
        // The login handler checks the code and counts a wrong one.
        return next.run(request).await;
    }
    match access.judge(request.headers()) {
        Credential::Valid => next.run(request).await,
        Credential::Wrong(what) => {
            access.failed(peer, what);
            unauthorized(request.headers())
        }
        Credential::Missing => unauthorized(request.headers()),
    }
}

/// 401: a page saying how to log in for a browser, JSON for the rest.
pub fn unauthorized(headers: &HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        let page = Html(
            "<!doctype html><meta charset=utf-8><title>dmm: log in</title>\
             <p>This dmm dashboard needs a login. On the daemon's machine, run \
             <code>dmm ui</code> and open the URL it prints (each URL works once).</p>",
        );
        return (StatusCode::UNAUTHORIZED, page).into_response();
    }
    let body = Json(json!({ "error": "missing or wrong bearer token" }));
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        body,
    )
        .into_response()
}

fn too_many_failures(wait: Duration) -> Response {
    let body = Json(json!({
        "error": format!("too many requests with a wrong token; try again in {} s", wait.as_secs() + 1)
    }));
    let retry = (wait.as_secs() + 1).to_string();
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, retry)],
        body,
    )
        .into_response()
}

/// The client of a TCP connection, for the middleware (axum's
/// `ConnectInfo`): its address, and over TLS the names its certificate is
/// valid for, if it presented one (verified against the CA).
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    pub certificate: Arc<[String]>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Peer {
        Peer {
            address: *stream.remote_addr(),
            certificate: Arc::new([]),
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Peer {
        let names = stream
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(dmm_tls::peer_names)
            .unwrap_or_default();
        Peer {
            address: *stream.remote_addr(),
            certificate: names.into(),
        }
    }
}

/// Wrong credentials a peer may present within [`FAILURE_WINDOW`] before
/// it is refused until the window ends.
const FAILURES_ALLOWED: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peers remembered at most: the oldest windows go first.
const PEERS_REMEMBERED: usize = 4096;

/// Failed authentications per peer address, in fixed windows.
#[derive(Default)]
struct AuthFailures {
    peers: parking_lot::Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthFailures {
    /// How long `ip` must still wait, if it used up its failures.
    fn locked_out(&self, ip: IpAddr) -> Option<Duration> {
        let peers = self.peers.lock();
        let &(count, since) = peers.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (count >= FAILURES_ALLOWED).then_some(left)
    }

    fn failed(&self, ip: IpAddr, what: &str) {
        let mut peers = self.peers.lock();
        if peers.len() >= PEERS_REMEMBERED {
            peers.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = peers.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        match entry.0 {
            n if n < FAILURES_ALLOWED => {
                tracing::warn!(peer = %ip, failures = n, "API request refused: {what}");
            }
            FAILURES_ALLOWED => tracing::warn!(
                peer = %ip,
                "API: {FAILURES_ALLOWED} requests with a wrong credential within {} s; \
                 refusing this address until the window ends",
                FAILURE_WINDOW.as_secs()
            ),
            _ => {}
        }
    }
}
