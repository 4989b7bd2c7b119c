//! The HTTP/JSON API: every verb of the CLI, an event stream, the
//! OpenAPI document that describes them, and Prometheus metrics
//! (`/metrics`, [`crate::metrics`]).
//!
//! The same router serves the Unix socket (protected by its file mode) and,
//! when asked, TCP listeners (with TLS, or on loopback only), where every
//! request must carry the bearer token or a dashboard session cookie
//! ([`crate::access`]). Errors are JSON
//! `{"error": "…"}` with one line that names the problem: 400 for a bad
//! request, 404 for an unknown migration, 409 for a verb not valid in the
//! migration's state, 500 when the action itself failed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use dmm_catalog::{MigrationId, MigrationRecord, Verb};
use futures::stream::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;

use crate::access::{self, Access};
use crate::client::Digests;
use crate::cluster::{ClusterView, Node, Whereabouts};
use crate::error::{Error, ErrorKind};
use crate::metrics::{self, Requests};
use crate::peers::{Hello, PeerStatus, Peers};
use crate::properties;
use crate::receive::{ReceiveRequest, Receiving};
use crate::settings::Shown;
use crate::supervisor::{Notice, Supervisor};
use crate::ui::{self, Dashboard};
use crate::view::{QueueMove, QueueView, View};

/// The OpenAPI description of this router.
pub const OPENAPI: &str = include_str!("openapi.json");

type Shared = State<Arc<Supervisor>>;

/// A failure as an HTTP response.
pub struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(err: Error) -> ApiError {
        let status = match err.kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.line())
    }
}

impl From<dmm_catalog::Error> for ApiError {
    fn from(err: dmm_catalog::Error) -> ApiError {
        Error::from(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Reply<T> = Result<Json<T>, ApiError>;

async fn view(supervisor: &Supervisor, record: MigrationRecord) -> Result<View, ApiError> {
    let queue = supervisor.queue()?;
    view_in(supervisor, record, &queue).await
}

/// The view of a migration, with its place in `queue` if it waits there.
async fn view_in(
    supervisor: &Supervisor,
    record: MigrationRecord,
    queue: &[MigrationId],
) -> Result<View, ApiError> {
    let progress = supervisor.progress(record.id).await?;
    let verbs = Verb::ALL
        .iter()
        .filter(|verb| verb.rule().valid.contains(&record.state))
        .map(Verb::to_string)
        .collect();
    let queue_position = queue
        .iter()
        .position(|&id| id == record.id)
        .map(|at| at + 1);
    Ok(View {
        effective: properties::effective(&record.properties, record.kind),
        record,
        progress,
        verbs,
        queue_position,
    })
}

pub(crate) fn migid(text: &str) -> Result<MigrationId, ApiError> {
    text.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{text:?} is not a migid (a number, as `dmm list` shows)"),
        )
    })
}

/// The request of `POST /api/migrations`.
#[derive(Deserialize)]
pub struct CreateRequest {
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub halted: bool,
}

async fn create(
    State(supervisor): Shared,
    Json(request): Json<CreateRequest>,
) -> Result<(StatusCode, Json<View>), ApiError> {
    let record = supervisor
        .create(request.properties, request.halted)
        .await?;
    Ok((StatusCode::CREATED, Json(view(&supervisor, record).await?)))
}

async fn list(State(supervisor): Shared) -> Reply<Vec<View>> {
    let records = supervisor.catalog().list()?;
    let queue = supervisor.queue()?;
    let mut views = Vec::with_capacity(records.len());
    for record in records {
        views.push(view_in(&supervisor, record, &queue).await?);
    }
    Ok(Json(views))
}

async fn show(State(supervisor): Shared, Path(id): Path<String>) -> Reply<View> {
    let record = supervisor.catalog().get(migid(&id)?)?;
    Ok(Json(view(&supervisor, record).await?))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(supervisor): Shared,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let verb = Verb::Delete { force: query.force };
    supervisor.apply(migid(&id)?, verb).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct HaltQuery {
    #[serde(default)]
    remove: bool,
}

async fn verb(
    State(supervisor): Shared,
    Path((id, verb)): Path<(String, String)>,
    Query(halt): Query<HaltQuery>,
) -> Reply<View> {
    let id = migid(&id)?;
    let Some(verb) = path_verb(&verb, halt.remove) else {
        let names: Vec<&str> = PATH_VERBS.iter().map(|v| v.name()).collect();
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown verb {verb:?} ({})", names.join(", ")),
        ));
    };
    let record = supervisor.apply(id, verb).await?;
    Ok(Json(view(&supervisor, record).await?))
}

/// The verbs of `POST /api/migrations/{id}/{verb}` (set and delete have
/// their own methods).
const PATH_VERBS: [Verb; 8] = [
    Verb::Start,
    Verb::Pause,
    Verb::Resume,
    Verb::Stop,
    Verb::Halt { remove: false },
    Verb::Switchover,
    Verb::Commit,
    Verb::Rollback,
];

fn path_verb(name: &str, remove: bool) -> Option<Verb> {
    match PATH_VERBS.into_iter().find(|v| v.name() == name)? {
        Verb::Halt { .. } => Some(Verb::Halt { remove }),
        verb => Some(verb),
    }
}

async fn get_properties(
    State(supervisor): Shared,
    Path(id): Path<String>,
) -> Reply<BTreeMap<String, String>> {
    let record = supervisor.catalog().get(migid(&id)?)?;
    Ok(Json(properties::effective(&record.properties, record.kind)))
}

async fn set_properties(
    State(supervisor): Shared,
    Path(id): Path<String>,
    Json(changes): Json<BTreeMap<String, String>>,
) -> Reply<View> {
    let record = supervisor.set(migid(&id)?, changes).await?;
    Ok(Json(view(&supervisor, record).await?))
}

/// The body of `POST /api/migrations/{id}/retry`.
#[derive(Deserialize)]
struct RetryRequest {
    path: String,
}

/// Retries a tree migration's file in error now.
async fn retry(
    State(supervisor): Shared,
    Path(id): Path<String>,
    Json(request): Json<RetryRequest>,
) -> Reply<View> {
    let record = supervisor.retry(migid(&id)?, &request.path).await?;
    Ok(Json(view(&supervisor, record).await?))
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    after: i64,
}

async fn log(
    State(supervisor): Shared,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Reply<Vec<dmm_catalog::Event>> {
    let events = supervisor.catalog().events(migid(&id)?, query.after)?;
    Ok(Json(events))
}

async fn events(State(supervisor): Shared) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = BroadcastStream::new(supervisor.subscribe()).filter_map(|notice| async move {
        let notice = notice.ok()?;
        let kind = match &notice {
            Notice::State { .. } => "state",
            Notice::Log { .. } => "log",
            Notice::Progress { .. } => "progress",
            Notice::Queue(_) => "queue",
        };
        Event::default().event(kind).json_data(&notice).ok().map(Ok)
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics(
    State(supervisor): Shared,
    Extension(requests): Extension<Arc<Requests>>,
) -> Result<impl IntoResponse, ApiError> {
    let text = metrics::render(&supervisor, &requests).await?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text))
}

#[derive(Deserialize)]
struct CatalogQuery {
    #[serde(default = "default_rows")]
    limit: u32,
}

fn default_rows() -> u32 {
    200
}

/// The catalog's tables, newest rows first, read-only (`GET /api/catalog`):
/// what an admin looks at to recover from an error without a shell.
async fn catalog_tables(
    State(supervisor): Shared,
    Query(query): Query<CatalogQuery>,
) -> Reply<Vec<dmm_catalog::TableRows>> {
    Ok(Json(supervisor.catalog().tables(query.limit.min(10_000))?))
}

/// Every property: name, default, whether it may change while the
/// migration runs, the kinds it applies to (null: every kind), and its
/// help.
async fn property_table() -> Json<serde_json::Value> {
    let table: Vec<_> = properties::PROPERTIES
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "default": p.default,
                "live": p.change == properties::Change::Live,
                "applies": (!p.applies.is_empty())
                    .then(|| p.applies.iter().map(|kind| kind.as_str()).collect::<Vec<_>>()),
                "help": p.help,
            })
        })
        .collect();
    Json(json!(table))
}

/// The daemon's settings (`GET /api/config`).
async fn get_config(State(supervisor): Shared) -> Reply<BTreeMap<String, Shown>> {
    Ok(Json(supervisor.settings()?))
}

/// Changes daemon settings (`PATCH /api/config`, `{"maxrunning": "2"}`).
async fn set_config(
    State(supervisor): Shared,
    Json(changes): Json<BTreeMap<String, String>>,
) -> Reply<BTreeMap<String, Shown>> {
    Ok(Json(supervisor.configure(&changes)?))
}

/// The start queue (`GET /api/queue`).
async fn get_queue(State(supervisor): Shared) -> Reply<QueueView> {
    Ok(Json(supervisor.queue_view()?))
}

/// Moves a queued migration (`POST /api/queue`, `{"migration": 3,
/// "position": 1}`).
async fn move_in_queue(
    State(supervisor): Shared,
    Json(request): Json<QueueMove>,
) -> Reply<QueueView> {
    supervisor.move_in_queue(request.migration, request.position)?;
    Ok(Json(supervisor.queue_view()?))
}

/// What this daemon says about itself to a peer.
async fn peer_hello(Extension(peers): Extension<Arc<Peers>>) -> Json<Hello> {
    Json(peers.hello())
}

/// Receives a volume from the peer whose certificate made the request
/// (`POST /api/peer/receive`).
async fn peer_receive(
    State(supervisor): Shared,
    Extension(peers): Extension<Arc<Peers>>,
    request: axum::extract::Request,
) -> Reply<Receiving> {
    let peer = calling_peer(&request, &peers)?;
    let wanted: ReceiveRequest = json_body(request).await?;
    let in_use = supervisor.paths_in_use()?;
    let receiving = supervisor.receiver().receive(&peer, &wanted, &in_use)?;
    Ok(Json(receiving))
}

/// A volume the calling peer moves here, by its export name there.
#[derive(Deserialize)]
struct PeerVolume {
    export: String,
    /// `serve`: the sender's NBD listener, which requests go through
    /// until it commits.
    #[serde(default)]
    owner_nbd: String,
    /// `digests`: the byte ranges to hash.
    #[serde(default)]
    ranges: Vec<(u64, u64)>,
}

/// The calling peer and what it asks about.
async fn peer_volume(
    request: axum::extract::Request,
    peers: &Peers,
) -> Result<(String, PeerVolume), ApiError> {
    let peer = calling_peer(&request, peers)?;
    Ok((peer, json_body(request).await?))
}

/// The handoff: serves a volume received from the calling peer under its
/// export name (`POST /api/peer/serve`, `{"export": "vm1", "owner_nbd":
/// "10.0.0.1:10809"}`).
async fn peer_serve(
    State(supervisor): Shared,
    Extension(peers): Extension<Arc<Peers>>,
    request: axum::extract::Request,
) -> Reply<serde_json::Value> {
    let (peer, wanted) = peer_volume(request, &peers).await?;
    supervisor
        .receiver()
        .serve(&peer, &wanted.export, &wanted.owner_nbd)
        .await?;
    Ok(Json(json!({ "export": wanted.export })))
}

/// The commit: this node owns a volume handed over (`POST /api/peer/own`).
async fn peer_own(
    State(supervisor): Shared,
    Extension(peers): Extension<Arc<Peers>>,
    request: axum::extract::Request,
) -> Reply<serde_json::Value> {
    let (peer, wanted) = peer_volume(request, &peers).await?;
    supervisor.receiver().own(&peer, &wanted.export)?;
    Ok(Json(json!({ "export": wanted.export })))
}

/// The sender deleted its migration (`POST /api/peer/release`).
async fn peer_release(
    State(supervisor): Shared,
    Extension(peers): Extension<Arc<Peers>>,
    request: axum::extract::Request,
) -> Reply<serde_json::Value> {
    let (peer, wanted) = peer_volume(request, &peers).await?;
    supervisor.receiver().release(&peer, &wanted.export)?;
    Ok(Json(json!({ "export": wanted.export })))
}

/// Digests of chunks of a volume received, computed here: the sender
/// verifies without reading the volume back (`POST /api/peer/digests`,
/// `{"export": "vm1", "ranges": [[0, 1048576], …]}`).
async fn peer_digests(
    State(supervisor): Shared,
    Extension(peers): Extension<Arc<Peers>>,
    request: axum::extract::Request,
) -> Reply<Digests> {
    let (peer, wanted) = peer_volume(request, &peers).await?;
    let digests = supervisor
        .receiver()
        .digests(&peer, &wanted.export, &wanted.ranges)
        .await?;
    Ok(Json(Digests {
        digests: digests.iter().map(|d| d.to_hex().to_string()).collect(),
    }))
}

/// The configured peer whose certificate made `request`.
fn calling_peer(request: &axum::extract::Request, peers: &Peers) -> Result<String, ApiError> {
    let names = request
        .extensions()
        .get::<axum::extract::ConnectInfo<access::Peer>>()
        .map(|info| info.0.certificate.clone())
        .unwrap_or_else(|| Arc::new([]));
    peers.recognize(&names).map(str::to_owned).ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "only a peer, by its certificate, calls this".into(),
        )
    })
}

/// The request's JSON body (at most 64 KiB).
async fn json_body<T: serde::de::DeserializeOwned>(
    request: axum::extract::Request,
) -> Result<T, ApiError> {
    let body = axum::body::to_bytes(request.into_body(), 64 << 10)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Every peer, asked who it is (`dmm peers`).
async fn survey_peers(Extension(peers): Extension<Arc<Peers>>) -> Json<Vec<PeerStatus>> {
    Json(peers.survey().await)
}

/// This node in its cluster, or why there is none.
fn in_cluster(node: Option<Arc<Node>>) -> Result<Arc<Node>, ApiError> {
    node.ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            "this daemon is not in a cluster (start it with --etcd URLS and --node NAME)"
                .to_owned(),
        )
    })
}

/// The nodes of the cluster, and this node's fence (`dmm nodes`).
async fn cluster_nodes(Extension(node): Extension<Option<Arc<Node>>>) -> Reply<ClusterView> {
    Ok(Json(in_cluster(node)?.view().await?))
}

/// Who owns a volume (`dmm where`).
async fn cluster_volume(
    Extension(node): Extension<Option<Arc<Node>>>,
    Path(volume): Path<String>,
) -> Reply<Whereabouts> {
    Ok(Json(in_cluster(node)?.whereabouts(&volume).await?))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// The API routes and the dashboard's; `requests` times them (one for
/// every listener of a daemon).
pub fn router(
    supervisor: Arc<Supervisor>,
    requests: Arc<Requests>,
    dashboard: Arc<Dashboard>,
    peers: Arc<Peers>,
    node: Option<Arc<Node>>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/health", get(health))
        .route("/api/properties", get(property_table))
        .route("/api/catalog", get(catalog_tables))
        .route("/api/config", get(get_config).patch(set_config))
        .route("/api/peers", get(survey_peers))
        .route("/api/cluster/nodes", get(cluster_nodes))
        .route("/api/cluster/volumes/{volume}", get(cluster_volume))
        .route("/api/peer/hello", get(peer_hello))
        .route("/api/peer/receive", post(peer_receive))
        .route("/api/peer/serve", post(peer_serve))
        .route("/api/peer/own", post(peer_own))
        .route("/api/peer/release", post(peer_release))
        .route("/api/peer/digests", post(peer_digests))
        .route("/api/queue", get(get_queue).post(move_in_queue))
        .route("/api/openapi.json", get(openapi))
        .route("/api/events", get(events))
        .route("/api/migrations", get(list).post(create))
        .route("/api/migrations/{id}", get(show).delete(delete))
        .route(
            "/api/migrations/{id}/properties",
            get(get_properties).patch(set_properties),
        )
        .route("/api/migrations/{id}/log", get(log))
        .route("/api/migrations/{id}/retry", post(retry))
        .route("/api/migrations/{id}/{verb}", post(verb))
        .with_state(supervisor)
        .route_layer(middleware::from_fn_with_state(
            requests.clone(),
            metrics::track,
        ))
        .merge(ui::routes())
        .layer(Extension(requests))
        .layer(Extension(dashboard))
        .layer(Extension(peers))
        .layer(Extension(node))
}

/// The same routes for a TCP listener: every request needs the token or a
/// dashboard session ([`crate::access`]).
pub fn tcp_router(router: Router, access: Arc<Access>, secure: bool) -> Router {
    router
        .layer(middleware::from_fn_with_state(
            access.clone(),
            access::require,
        ))
        .layer(Extension(access))
        .layer(Extension(ui::Secure(secure)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_names_every_state() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut states: Vec<&str> = spec["components"]["schemas"]["State"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let mut all: Vec<&str> = dmm_catalog::State::ALL.map(|s| s.as_str()).to_vec();
        states.sort_unstable();
        all.sort_unstable();
        assert_eq!(states, all);
    }
}
