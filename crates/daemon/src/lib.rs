//! dmm's daemon: a long-running service that supervises many migrations at
//! once.
//!
//! It keeps the [catalog](dmm_catalog) in the state directory, serves every
//! volume by export name on one NBD listener (`nbd.sock`, plus TCP when
//! asked), answers the HTTP API on `api.sock` (plus TCP with a bearer token
//! when asked, over TLS unless on loopback), and drives each migration's engine ([`supervisor`]). On
//! SIGTERM it stops every migration resumably; after a crash, it finishes
//! the transitions that were under way and resumes every migration where it
//! was.

mod access;
mod api;
mod client;
mod cluster;
mod engine;
mod error;
mod layout;
mod metrics;
mod peers;
mod properties;
mod receive;
mod schedule;
mod settings;
mod spec;
mod supervisor;
mod tls;
mod ui;
mod view;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use dmm_catalog::Catalog;
use dmm_nbd::{ExportTable, Server, ServerConfig};

use crate::supervisor::Supervisor;

pub use client::{Client, ClientError, Endpoint, Health};
pub use cluster::{ClusterView, Joining, Whereabouts};
pub use dmm_catalog::{Event, Intent, Kind, MigrationId, MigrationRecord, State, Verb};
pub use dmm_stream::StreamReport;
pub use dmm_tree::{TreePhase, TreeReport};
pub use engine::Report;
pub use layout::Layout;
pub use peers::{Hello, PeerStatus};
pub use properties::{PropertyError, lookup as lookup_property};
pub use settings::Shown as Setting;
pub use supervisor::CRASH_AFTER_INTENT;
pub use view::{QueueMove, QueueView, View};

/// Checks the body of `POST /api/migrations` as the daemon does before it
/// opens anything (the JSON, each property, the kind, the required ones):
/// the entry point of the `api_bodies` fuzz target. `Err` is the reason
/// the API would answer 400 with.
pub fn check_create_body(body: &[u8]) -> std::result::Result<(), String> {
    let request: api::CreateRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    spec::Spec::of_new(&request.properties)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Checks `name=value` lines (as `dmm create -p` and `dmm set -p` take
/// them) one by one and as the properties of a new migration: the entry
/// point of the `properties` fuzz target.
pub fn check_property_lines(text: &str) -> std::result::Result<(), String> {
    let mut properties = std::collections::BTreeMap::new();
    for line in text.lines() {
        let (name, value) = line.split_once('=').ok_or("not name=value")?;
        properties::check(name, value).map_err(|e| e.to_string())?;
        properties.insert(name.to_owned(), value.to_owned());
    }
    spec::Spec::of_new(&properties)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    /// Also serve NBD on this TCP address.
    pub nbd_listen: Option<String>,
    /// Also serve the API on this TCP address (needs `token_file`).
    pub api_listen: Option<String>,
    /// File holding the bearer token for the TCP API.
    pub token_file: Option<PathBuf>,
    /// Serve the TCP API over TLS with the certificates in this directory
    /// (`server-cert.pem`, `server-key.pem`); without it the API listens on
    /// loopback addresses only.
    pub tls_certificates: Option<PathBuf>,
    /// TLS on the NBD listeners (offered or required).
    pub nbd_tls: Option<dmm_nbd::ServerTls>,
    /// This node's name (its certificates are valid for it).
    pub node: Option<String>,
    /// Peer daemons by name: the TCP address of each one's API.
    pub peers: std::collections::BTreeMap<String, String>,
    /// The cluster on etcd this node joins (`--etcd`), if any.
    pub cluster: Option<Joining>,
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: DaemonConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let layout = Layout::new(&config.state_dir);
    std::fs::create_dir_all(layout.root())
        .with_context(|| format!("cannot create {}", layout.root().display()))?;
    let _lock = lock(&layout)?;
    let token = match (&config.api_listen, &config.token_file) {
        (Some(_), None) => {
            bail!("--listen needs --token-file: the TCP API only takes authenticated requests")
        }
        (_, Some(path)) => Some(read_token(path)?),
        (None, None) => None,
    };
    let peers = Arc::new(peers_of(&config)?);
    let catalog = Arc::new(Catalog::open(&layout.catalog())?);
    let node = join_cluster(&config, &layout).await?;
    let exports = Arc::new(ExportTable::new());
    if let Some(node) = &node {
        cluster::Router::install(node.clone(), peers.clone(), &exports);
    }
    let supervisor = Supervisor::new(
        catalog,
        &layout,
        exports.clone(),
        peers.clone(),
        node.clone(),
    );
    // One server per kind of listener over the same exports: TLS covers
    // TCP; nbd.sock, which only the daemon's user reaches, stays plain.
    let nbd = Arc::new(Server::new(exports.clone(), ServerConfig::default()));
    let tcp_config = ServerConfig {
        tls: config.nbd_tls.clone(),
        ..ServerConfig::default()
    };
    let nbd_network = Arc::new(Server::new(exports, tcp_config));
    let nbd_unix = dmm_nbd::bind_unix(&layout.nbd_socket())
        .with_context(|| format!("cannot listen on {}", layout.nbd_socket().display()))?;
    let nbd_tcp = match &config.nbd_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for NBD on {address}"))?,
        ),
        None => None,
    };
    let api_unix = dmm_nbd::bind_unix(&layout.api_socket())
        .with_context(|| format!("cannot listen on {}", layout.api_socket().display()))?;
    std::fs::set_permissions(layout.api_socket(), std::fs::Permissions::from_mode(0o600))?;
    let api_tcp = match &config.api_listen {
        Some(address) => Some(
            api_listener(
                address,
                config.tls_certificates.as_deref(),
                !config.peers.is_empty(),
            )
            .await?,
        ),
        None => None,
    };
    supervisor.restore_receptions();
    supervisor.recover().await;
    tracing::info!(state_dir = %layout.root().display(), "dmm daemon ready");

    let stop = tokio_util::sync::CancellationToken::new();
    let queue = tokio::spawn(supervisor.clone().run_queue(stop.clone()));
    let nbd_serving = {
        let (nbd, network, stop) = (nbd.clone(), nbd_network.clone(), stop.clone());
        tokio::spawn(async move {
            let unix = nbd.serve_unix(nbd_unix);
            let tcp = async {
                if let Some(listener) = nbd_tcp {
                    network.serve_tcp(listener).await;
                }
            };
            tokio::select! {
                _ = async { tokio::join!(unix, tcp) } => {}
                () = stop.cancelled() => {}
            }
        })
    };
    let requests = Arc::new(metrics::Requests::default());
    let sessions = Arc::new(ui::Sessions::default());
    let access = Arc::new(access::Access::new(
        token.as_deref(),
        sessions.clone(),
        peers.clone(),
    ));
    let (open_listener, listener_requests) = tokio::sync::mpsc::channel(4);
    let api_url = api_tcp.as_ref().map(ApiListener::url).transpose()?;
    let history = Arc::new(ui::History::default());
    tokio::spawn(history.clone().follow(supervisor.subscribe()));
    let dashboard = Arc::new(ui::Dashboard::new(
        sessions,
        history,
        api_url,
        open_listener,
    ));
    let router = api::router(supervisor.clone(), requests, dashboard, peers, node.clone());
    let api_unix = {
        let (router, stop) = (router.clone(), stop.clone());
        tokio::spawn(async move {
            axum::serve(api_unix, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    let api_tcp = api_tcp.map(|listener| {
        let tls = matches!(listener, ApiListener::Tls(_));
        let router = api::tcp_router(router.clone(), access.clone(), tls);
        tokio::spawn(serve_tcp(listener, router, stop.clone()))
    });
    let dashboards = {
        let router = api::tcp_router(router, access, false);
        tokio::spawn(open_dashboards(listener_requests, router, stop.clone()))
    };

    shutdown.await;
    tracing::info!("stopping: every migration stays resumable");
    stop.cancel();
    let _ = queue.await;
    supervisor.shutdown().await;
    nbd.shutdown().await;
    nbd_network.shutdown().await;
    let _ = nbd_serving.await;
    let _ = api_unix.await;
    if let Some(task) = api_tcp {
        let _ = task.await;
    }
    let _ = dashboards.await;
    if let Some(node) = node {
        node.leave().await;
    }
    let _ = std::fs::remove_file(layout.api_socket());
    let _ = std::fs::remove_file(layout.nbd_socket());
    Ok(())
}

/// Joins the cluster on etcd when the daemon is given one.
async fn join_cluster(
    config: &DaemonConfig,
    layout: &Layout,
) -> Result<Option<Arc<cluster::Node>>> {
    let Some(joining) = &config.cluster else {
        return Ok(None);
    };
    let Some(name) = &config.node else {
        bail!("--etcd needs --node NAME: the name this node's certificate is valid for");
    };
    let node = cluster::Node::join(
        joining,
        name,
        config.api_listen.clone(),
        config.nbd_listen.clone(),
        layout.root(),
    )
    .await?;
    Ok(Some(node))
}

/// The TCP listener of the API.
enum ApiListener {
    /// Loopback only.
    Plain(tokio::net::TcpListener),
    Tls(tls::TlsListener),
}

impl ApiListener {
    /// The base URL a browser uses to reach it.
    fn url(&self) -> Result<String> {
        let (scheme, bound) = match self {
            ApiListener::Plain(tcp) => ("http", tcp.local_addr()?),
            ApiListener::Tls(tls) => ("https", axum::serve::Listener::local_addr(tls)?),
        };
        Ok(match bound.ip().is_unspecified() {
            true => format!("{scheme}://localhost:{}", bound.port()),
            false => format!("{scheme}://{bound}"),
        })
    }
}

/// Serves `router` on a TCP listener until `stop`.
async fn serve_tcp(
    listener: ApiListener,
    router: axum::Router,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let stopped = async move { stop.cancelled().await };
    let service = router.into_make_service_with_connect_info::<access::Peer>();
    match listener {
        ApiListener::Plain(tcp) => {
            axum::serve(tcp, service)
                .with_graceful_shutdown(stopped)
                .await
        }
        ApiListener::Tls(tls) => {
            axum::serve(tls, service)
                .with_graceful_shutdown(stopped)
                .await
        }
    }
}

/// Opens the dashboard's loopback listeners as `dmm ui` asks for them
/// (one for any port, one per address asked for), serving until `stop`.
async fn open_dashboards(
    mut requests: tokio::sync::mpsc::Receiver<ui::OpenListener>,
    router: axum::Router,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut opened: Vec<(Option<String>, std::net::SocketAddr)> = Vec::new();
    let mut serving = tokio::task::JoinSet::new();
    loop {
        let request = tokio::select! {
            request = requests.recv() => request,
            () = stop.cancelled() => None,
        };
        let Some(request) = request else { break };
        if let Some((_, bound)) = opened.iter().find(|(asked, _)| *asked == request.listen) {
            let _ = request.reply.send(Ok(*bound));
            continue;
        }
        let address = request
            .listen
            .clone()
            .unwrap_or_else(|| "127.0.0.1:0".to_owned());
        let bound = match dashboard_listener(&address).await {
            Ok(tcp) => tcp,
            Err(err) => {
                let _ = request.reply.send(Err(format!("{err:#}")));
                continue;
            }
        };
        let at = bound.local_addr().expect("a bound socket has an address");
        tracing::info!(%at, "dashboard listening");
        opened.push((request.listen, at));
        let _ = request.reply.send(Ok(at));
        serving.spawn(serve_tcp(
            ApiListener::Plain(bound),
            router.clone(),
            stop.clone(),
        ));
    }
    while serving.join_next().await.is_some() {}
}

/// Binds a dashboard listener: loopback only (its cookies and pages travel
/// in clear; off loopback, give the daemon `--listen` with TLS).
async fn dashboard_listener(address: &str) -> Result<tokio::net::TcpListener> {
    let tcp = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for the dashboard on {address}"))?;
    let bound = tcp.local_addr()?;
    if !bound.ip().is_loopback() {
        bail!(
            "refusing to serve the dashboard on {bound} in clear: listen on a loopback address \
             such as 127.0.0.1, or start the daemon with --listen and --tls-certificates"
        );
    }
    Ok(tcp)
}

/// This node and its peers, from the configuration: peers need the TCP
/// API on TLS (they call it with their certificates) and a client
/// certificate to call them with.
fn peers_of(config: &DaemonConfig) -> Result<peers::Peers> {
    let mut peers = peers::Peers {
        node: config.node.clone(),
        addresses: config.peers.clone(),
        nbd: config.nbd_listen.clone(),
        nbd_tls_required: config.nbd_tls.as_ref().is_some_and(|tls| tls.required),
        client: None,
        certificates: config.tls_certificates.clone(),
    };
    if config.peers.is_empty() {
        return Ok(peers);
    }
    let (Some(dir), Some(_)) = (&config.tls_certificates, &config.api_listen) else {
        bail!(
            "--peer needs the TCP API on TLS (--listen and --tls-certificates): peers call it with their certificates"
        );
    };
    let dir = dmm_tls::CertificateDir::new(dir);
    if !dir.has(dmm_tls::CLIENT_CERT) {
        bail!(
            "--peer needs {} in {} to call peers with (dmm tls issue makes it)",
            dmm_tls::CLIENT_CERT,
            dir.path().display()
        );
    }
    peers.client = Some(dmm_tls::client_config(&dir)?);
    Ok(peers)
}

/// Binds the API's TCP listener: with TLS when certificates are given
/// (asking peer daemons for their certificates when there are peers);
/// without, only on a loopback address, since the bearer token would
/// cross the network in clear.
async fn api_listener(
    address: &str,
    certificates: Option<&Path>,
    peers: bool,
) -> Result<ApiListener> {
    let check = match peers {
        true => dmm_tls::PeerCheck::Optional,
        false => dmm_tls::PeerCheck::Anyone,
    };
    let config = certificates
        .map(|dir| dmm_tls::server_config(&dmm_tls::CertificateDir::new(dir), &check))
        .transpose()?;
    let tcp = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for the API on {address}"))?;
    let bound = tcp.local_addr()?;
    match (config, certificates) {
        (Some(config), Some(dir)) => {
            tracing::info!(%bound, certificates = %dir.display(), "API on TCP with TLS");
            Ok(ApiListener::Tls(tls::TlsListener::new(tcp, config, dir)))
        }
        _ if bound.ip().is_loopback() => Ok(ApiListener::Plain(tcp)),
        _ => bail!(
            "refusing to serve the API on {bound} without TLS: the bearer token would cross \
             the network in clear; give --tls-certificates DIR ({} and {}) or listen on a \
             loopback address such as 127.0.0.1",
            dmm_tls::SERVER_CERT,
            dmm_tls::SERVER_KEY
        ),
    }
}

/// One daemon per state directory.
fn lock(layout: &Layout) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(layout.lock())
        .with_context(|| format!("cannot open {}", layout.lock().display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            anyhow::anyhow!(
                "another dmm daemon is running with the state directory {}",
                layout.root().display()
            )
        },
    )?;
    Ok(file)
}

fn read_token(path: &std::path::Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = token.trim().to_owned();
    if token.len() < 16 {
        bail!(
            "the token in {} is too short (at least 16 characters)",
            path.display()
        );
    }
    Ok(token)
}
