//! The volume engine ([`dmm_volume::Migration`]) behind the [`Engine`]
//! interface: its stores opened from the specification, its virtual
//! device exported over NBD, its phases mapped to catalog states.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use dmm_catalog::State;
use dmm_control::Controls;
use std::time::Duration;

use dmm_nbd::{Access, NbdStore, OpenedStore, open_store};
use dmm_store::{BlockStore, Op};
use dmm_volume::{Activity, Migration, MigrationError, Phase, Progress, RemoteDigests, Strategy};

use super::{Engine, Ran, Report, Snapshot};
use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::peers::Peers;
use crate::receive::ReceiveRequest;
use crate::spec::{Spec, VolumeSpec};

/// An open volume migration.
pub struct VolumeEngine {
    migration: Migration,
    export: String,
    /// `switchover=manual`: the switchover waits for the admin.
    manual: AtomicBool,
    /// The destination's node when it is a peer, and how to reach it.
    peer: Option<PeerLink>,
}

/// The peer a volume moves to.
struct PeerLink {
    name: String,
    client: Client,
    /// The reception, asked for again when the peer comes back.
    request: ReceiveRequest,
    peers: Arc<Peers>,
}

/// How long a request to a peer's export waits for it to come back before
/// it fails: short, because clients' mirrored writes wait that long before
/// the migration falls back to tracking them on the source.
const PEER_RECONNECT_WITHIN: Duration = Duration::from_secs(3);

/// How long a request to a peer's export waits for its reply before the
/// connection is presumed dead (a network cut sends no reset).
const PEER_REPLY_WITHIN: Duration = Duration::from_secs(5);

/// Failures in a row, the peer answering each time, before a move gives up
/// (a destination that fails for another reason than being away).
const FAILURES_WITH_PEER_UP: u32 = 3;

/// Digests of the destination's chunks computed by the peer that holds
/// it: verification moves only them.
struct PeerDigests {
    client: Client,
    /// The volume's export name on this node, which names it to the peer.
    export: String,
}

#[async_trait]
impl RemoteDigests for PeerDigests {
    async fn digests(&self, ranges: Vec<(u64, u64)>) -> dmm_store::Result<Vec<blake3::Hash>> {
        let failed = |detail: String| {
            dmm_store::Error::new(dmm_store::ErrorKind::Disconnected, Op::Read, "peer digests")
                .with_detail(detail)
        };
        let hex = self
            .client
            .peer_digests(&self.export, &ranges)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if hex.len() != ranges.len() {
            return Err(failed(format!(
                "{} digests for {} ranges",
                hex.len(),
                ranges.len()
            )));
        }
        hex.iter()
            .map(|h| blake3::Hash::from_hex(h).map_err(|e| failed(e.to_string())))
            .collect()
    }
}

fn failed(err: MigrationError) -> Error {
    let kind = match err.kind() {
        dmm_volume::ErrorKind::Refused => ErrorKind::Invalid,
        dmm_volume::ErrorKind::InvalidState => ErrorKind::Conflict,
        _ => ErrorKind::Failed,
    };
    Error::new(kind, err.report())
}

/// The stores of a migration, and the peer its destination is on.
struct Stores {
    source: OpenedStore,
    target: OpenedStore,
    peer: Option<PeerLink>,
}

/// Opens the source (read-only is enough for `redirect`, which never
/// writes it) and the target: a path or URI, or `NODE:/PATH` on a peer,
/// which the peer is asked to receive (the volume's size, its allocated
/// bytes and its export name are the metadata it gets first) and which is
/// then reached over NBD with TLS.
async fn open_stores(spec: &VolumeSpec, peers: &Arc<Peers>) -> Result<Stores> {
    let source_access = Access {
        read_only: false,
        fall_back_to_read_only: spec.config.strategy == Strategy::Redirect,
    };
    let open = |what: &'static str| {
        move |err| Error::caused(ErrorKind::Failed, format!("cannot open the {what}"), err)
    };
    let source = open_store(&spec.source, source_access)
        .await
        .map_err(open("source"))?;
    let Some((peer, path)) = peers.peer_target(&spec.target) else {
        let target = open_store(&spec.target, Access::default())
            .await
            .map_err(open("target"))?;
        return Ok(Stores {
            source,
            target,
            peer: None,
        });
    };
    let request = ReceiveRequest {
        path: path.to_owned(),
        size: source.store.size(),
        allocated: allocated(&*source.store).await.map_err(open("source"))?,
        export: spec.export.clone(),
    };
    let uri = peers.prepare_target(peer, &request).await?;
    let store = NbdStore::connect_uri(&uri)
        .await
        .map_err(open("target"))?
        .reconnecting_within(PEER_RECONNECT_WITHIN)
        .replies_within(PEER_REPLY_WITHIN);
    let client = peers.client(peer).ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            format!("{peer} is not a peer of this node"),
        )
    })?;
    Ok(Stores {
        source,
        target: OpenedStore {
            store: Arc::new(store),
            name: spec.target.clone(),
        },
        peer: Some(PeerLink {
            name: peer.to_owned(),
            client,
            request,
            peers: peers.clone(),
        }),
    })
}

/// The bytes `store` holds data in (its holes left out).
async fn allocated(store: &dyn BlockStore) -> dmm_store::Result<u64> {
    let extents = store.extents(0, store.size()).await?;
    Ok(extents
        .iter()
        .filter(|e| e.kind != dmm_store::ExtentKind::Hole)
        .map(|e| e.len)
        .sum())
}

/// Opens both stores and negotiates, recording nothing.
pub async fn check(spec: &VolumeSpec, peers: &Arc<Peers>) -> Result<()> {
    let stores = open_stores(spec, peers).await?;
    dmm_volume::negotiate(&*stores.source.store, &*stores.target.store, &spec.config)
        .map_err(|err| Error::new(ErrorKind::Invalid, err.to_string()))
}

impl VolumeEngine {
    pub async fn open(spec: &VolumeSpec, dir: &Path, peers: &Arc<Peers>) -> Result<VolumeEngine> {
        let Stores {
            source,
            target,
            peer,
        } = open_stores(spec, peers).await?;
        let names = (source.name, target.name);
        let migration =
            Migration::open(source.store, target.store, names, dir, spec.config.clone())
                .await
                .map_err(failed)?;
        if spec.manual_switchover {
            migration.controls().hold_switchover();
        }
        if let Some(peer) = &peer {
            migration.hash_destination_with(Arc::new(PeerDigests {
                client: peer.client.clone(),
                export: spec.export.clone(),
            }));
        }
        Ok(VolumeEngine {
            migration,
            export: spec.export.clone(),
            manual: AtomicBool::new(spec.manual_switchover),
            peer,
        })
    }

    /// Runs the migration; one moving to a peer that cannot be reached
    /// waits for it (clients served by the source, their writes tracked)
    /// and runs again when it answers, resending only the chunks written
    /// meanwhile and those whose copy the failure cut short.
    async fn run_until_done(&self) -> std::result::Result<Phase, MigrationError> {
        let mut failures_with_peer_up = 0;
        loop {
            let result = self.migration.run().await;
            let (Some(peer), Err(err)) = (&self.peer, &result) else {
                return result;
            };
            if err.kind() != dmm_volume::ErrorKind::Store {
                return result;
            }
            let reason = format!("{} cannot be reached: {}", peer.name, err.report());
            tracing::warn!(peer = %peer.name, "{reason}; the move waits for it");
            self.migration.wait_for_destination(reason);
            match self.wait_for_peer(peer).await {
                Waited::Stopped => return result,
                Waited::WasAway => failures_with_peer_up = 0,
                Waited::WasUp => failures_with_peer_up += 1,
            }
            if failures_with_peer_up >= FAILURES_WITH_PEER_UP {
                return result;
            }
            tracing::info!(peer = %peer.name, "the peer answers again; the move resumes");
        }
    }

    /// Waits until the peer answers and offers the reception again (asked
    /// every few seconds), or a stop request.
    async fn wait_for_peer(&self, peer: &PeerLink) -> Waited {
        let mut away = false;
        let mut pause = Duration::from_millis(500);
        // The export's link does not dial again within its window of the
        // last attempt: the first probe waits that long.
        tokio::select! {
            () = tokio::time::sleep(PEER_RECONNECT_WITHIN) => {}
            () = self.controls().until_interrupted() => return self.interrupted(),
        }
        loop {
            let asked = tokio::select! {
                asked = peer.peers.prepare_target(&peer.name, &peer.request) => asked,
                () = self.controls().until_interrupted() => return self.interrupted(),
            };
            match asked {
                Ok(_) if away => return Waited::WasAway,
                Ok(_) => {
                    // It answered at once: give a restarting export a moment.
                    tokio::time::sleep(pause).await;
                    return Waited::WasUp;
                }
                Err(err) => {
                    away = true;
                    tracing::debug!(peer = %peer.name, "still away: {}", err.line());
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.controls().until_interrupted() => return self.interrupted(),
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

impl VolumeEngine {
    /// A wait for the peer ends on a stop request, or on a rollback
    /// request (the migration runs again to roll back).
    fn interrupted(&self) -> Waited {
        match self.controls().stop_requested() {
            true => Waited::Stopped,
            false => Waited::WasAway,
        }
    }
}

/// How a wait for a peer ended.
enum Waited {
    Stopped,
    /// It did not answer at first, and then did.
    WasAway,
    /// It answered at once: the failure was not its absence.
    WasUp,
}

/// The catalog state a volume's progress corresponds to.
fn state_of(progress: &Progress) -> State {
    let paused = progress.activity == Activity::Paused;
    match progress.phase {
        Phase::Copying | Phase::RollingBack if paused => State::Paused,
        Phase::Copying | Phase::RollingBack => State::Running,
        Phase::SwitchedOver => State::Verifying,
        Phase::Verified => State::SwitchedOver,
        Phase::Committed => State::Committed,
        Phase::RolledBack => State::RolledBack,
    }
}

#[async_trait]
impl Engine for VolumeEngine {
    fn controls(&self) -> &Controls {
        self.migration.controls()
    }

    async fn run(&self) -> Result<Ran> {
        match self.run_until_done().await {
            Ok(Phase::Verified) => Ok(Ran::Done(
                "the destination holds the whole volume; ready to commit",
            )),
            Ok(Phase::RolledBack) => {
                Ok(Ran::Done("rolled back: the source holds the whole volume"))
            }
            Ok(_) => Ok(Ran::Done("done")),
            Err(err)
                if err.kind() == dmm_volume::ErrorKind::Stopped
                    || self.controls().stop_requested() =>
            {
                Ok(Ran::Stopped)
            }
            Err(err) => Err(failed(err)),
        }
    }

    async fn snapshot(&self) -> Snapshot {
        let progress = self.migration.progress().await;
        Snapshot {
            state: state_of(&progress),
            report: Report::Volume(Box::new(progress)),
        }
    }

    fn export(&self) -> Option<(String, Arc<dyn BlockStore>)> {
        Some((self.export.clone(), self.migration.device()))
    }

    fn apply(&self, spec: &Spec) {
        let Spec::Volume(spec) = spec else {
            return;
        };
        let controls = self.controls();
        controls.set_rate(spec.config.rate);
        controls.set_priority(spec.config.priority);
        controls.set_in_flight(spec.config.in_flight);
        let was_manual = self.manual.swap(spec.manual_switchover, Ordering::AcqRel);
        match spec.manual_switchover {
            true if !was_manual => controls.hold_switchover(),
            true => {}
            false => controls.allow_switchover(),
        }
    }

    async fn switchover(&self) -> Result<()> {
        if !self.manual.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Conflict,
                "it switches over by itself (switchover=auto); set -p switchover=manual to decide when",
            ));
        }
        self.controls().allow_switchover();
        Ok(())
    }

    async fn rollback(&self) -> Result<()> {
        self.migration.request_rollback().map_err(failed)?;
        self.controls().resume();
        Ok(())
    }

    async fn destination_only(&self) -> Result<u64> {
        Ok(self.migration.destination_only_chunks())
    }

    async fn commit(&self) -> Result<&'static str> {
        self.migration.commit().await.map_err(failed)?;
        Ok("committed: the source is released")
    }

    async fn close(&self) -> Result<()> {
        self.migration.checkpoint().await.map_err(failed)
    }
}
