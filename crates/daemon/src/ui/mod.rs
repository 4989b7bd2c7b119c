//! The web dashboard: a page served by the daemon itself, its assets
//! embedded in the binary (no CDN, no build step), and its login.
//!
//! `dmm ui` asks the daemon for a login URL ([`login_url`]). Without an
//! address of its own the URL points at the daemon's TCP API listener if
//! it has one, else at a loopback listener the daemon opens on the first
//! request (a port the kernel picks, or `--listen`) and keeps until it
//! stops. Every TCP listener serves the same router behind
//! [`crate::access`]: the page runs on the session cookie the login gives,
//! scripts on the bearer token.
//!
//! The page itself (`assets/`) is plain HTML, CSS and JavaScript: it
//! calls the same JSON API as the CLI, follows `/api/events` through
//! `fetch` (so the cookie rides along), and draws its charts on a canvas.
//! Its text comes from one message catalog (`assets/messages.json`).

mod history;
pub(crate) mod sessions;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

pub use history::History;
pub use sessions::Sessions;

use crate::access::{self, Access};
use crate::api::ApiError;
use crate::error::{Error, ErrorKind};

/// Where a login code is exchanged for the session cookie.
pub const LOGIN_PATH: &str = "/ui/login";

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");
const MESSAGES: &str = include_str!("assets/messages.json");

/// A request for a dashboard listener: the address asked for (`None`:
/// any loopback port), answered with the address bound.
pub struct OpenListener {
    pub listen: Option<String>,
    pub reply: oneshot::Sender<Result<SocketAddr, String>>,
}

/// What the dashboard's routes share.
pub struct Dashboard {
    pub sessions: Arc<Sessions>,
    pub history: Arc<History>,
    /// The base URL of the daemon's TCP API (`https://…` with TLS).
    api_url: Option<String>,
    open: mpsc::Sender<OpenListener>,
}

impl Dashboard {
    pub fn new(
        sessions: Arc<Sessions>,
        history: Arc<History>,
        api_url: Option<String>,
        open: mpsc::Sender<OpenListener>,
    ) -> Dashboard {
        Dashboard {
            sessions,
            history,
            api_url,
            open,
        }
    }

    /// The base URL a login should use.
    async fn base_url(&self, listen: Option<String>) -> Result<String, Error> {
        if listen.is_none()
            && let Some(url) = &self.api_url
        {
            return Ok(url.clone());
        }
        let (reply, answer) = oneshot::channel();
        let failed = |what: &str| Error::new(ErrorKind::Failed, what);
        self.open
            .send(OpenListener { listen, reply })
            .await
            .map_err(|_| failed("the daemon is stopping"))?;
        let bound = answer
            .await
            .map_err(|_| failed("the daemon is stopping"))?
            .map_err(|reason| Error::new(ErrorKind::Invalid, reason))?;
        Ok(format!("http://{bound}"))
    }
}

/// Whether the listener a request came through speaks TLS (its cookie is
/// then marked `Secure`).
#[derive(Debug, Clone, Copy)]
pub struct Secure(pub bool);

/// The dashboard's routes: the page, its assets, login and logout, and the
/// API call that makes a login URL.
pub fn routes() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { page(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/style.css",
            get(|| async { page(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/messages.json",
            get(|| async { page(MESSAGES, "application/json") }),
        )
        .route(LOGIN_PATH, get(login))
        .route("/ui/logout", post(logout))
        .route("/api/ui/login", post(login_url))
        .route("/api/migrations/{id}/history", get(history))
}

/// A migration's recent samples (`GET /api/migrations/{id}/history`).
async fn history(
    Extension(dashboard): Extension<Arc<Dashboard>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<history::Sample>>, ApiError> {
    Ok(Json(dashboard.history.of(crate::api::migid(&id)?)))
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    code: String,
}

/// Exchanges a one-time code for the session cookie, then shows the page.
async fn login(
    Extension(access): Extension<Arc<Access>>,
    secure: Option<Extension<Secure>>,
    Query(query): Query<LoginQuery>,
    request: Request,
) -> Response {
    let Some(session) = access.sessions.redeem(&query.code) else {
        access.failed(
            access::peer_of(&request),
            "unknown or used dashboard login code",
        );
        return access::unauthorized(request.headers());
    };
    let secure = secure.is_some_and(|Extension(Secure(tls))| tls);
    (
        [(header::SET_COOKIE, sessions::set_cookie(&session, secure))],
        Redirect::to("/"),
    )
        .into_response()
}

async fn logout(Extension(access): Extension<Arc<Access>>, request: Request) -> impl IntoResponse {
    if let Some(secret) = sessions::secret_in(request.headers()) {
        access.sessions.end(secret);
    }
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, sessions::clear_cookie())],
    )
}

/// The request of `POST /api/ui/login`.
#[derive(Deserialize, Default)]
pub struct LoginRequest {
    /// Serve the dashboard on this loopback address.
    #[serde(default)]
    pub listen: Option<String>,
}

/// A one-time login URL (`{"url": …}`), opening a listener if needed.
async fn login_url(
    Extension(dashboard): Extension<Arc<Dashboard>>,
    request: Option<Json<LoginRequest>>,
) -> Result<Json<Value>, ApiError> {
    let Json(request) = request.unwrap_or_default();
    let base = dashboard.base_url(request.listen).await?;
    let code = dashboard.sessions.new_code();
    Ok(Json(
        json!({ "url": format!("{base}{LOGIN_PATH}?code={code}") }),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The keys the page asks for: every literal `t('…')`, and the keys it
    /// builds from a state, a verb or a kind.
    fn keys_used() -> Vec<String> {
        let mut keys: Vec<String> = SCRIPT
            .match_indices("t('")
            .filter(|(at, _)| {
                let before = SCRIPT[..*at].chars().next_back().unwrap_or(' ');
                !(before.is_alphanumeric() || before == '_' || before == '.')
            })
            .filter_map(|(at, _)| {
                SCRIPT[at + 3..]
                    .split_once('\'')
                    .map(|(key, _)| key.to_owned())
            })
            .collect();
        keys.extend(dmm_catalog::State::ALL.map(|s| format!("state.{s}")));
        keys.extend(dmm_catalog::Verb::ALL.map(|v| format!("verb.{v}")));
        keys.extend(dmm_catalog::Kind::ALL.map(|k| format!("kind.{k}")));
        keys
    }

    #[test]
    fn english_has_every_text_and_german_every_text_of_the_overview() {
        let catalogs: BTreeMap<String, BTreeMap<String, String>> =
            serde_json::from_str(MESSAGES).unwrap();
        let used = keys_used();
        assert!(used.len() > 50, "{used:?}");
        for key in &used {
            if key == "verb.set" {
                continue;
            }
            assert!(catalogs["en"].contains_key(key), "English lacks {key}");
        }
        let overview = [
            "nav.",
            "live.",
            "tab.",
            "col.",
            "state.",
            "kind.",
            "queue.",
            "verification.",
        ];
        for key in used
            .iter()
            .filter(|k| overview.iter().any(|p| k.starts_with(p)))
        {
            assert!(catalogs["de"].contains_key(key), "German lacks {key}");
        }
    }
}
