//! The volume engine ([`dmm_volume::Migration`]) behind the [`Engine`]
//! interface: its stores opened from the specification, its virtual
//! device exported over NBD, its phases mapped to catalog states.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use dmm_catalog::State;
use dmm_control::Controls;
use dmm_nbd::{Access, OpenedStore, open_store};
use dmm_store::BlockStore;
use dmm_volume::{Activity, Migration, MigrationError, Phase, Progress, Strategy};

use super::{Engine, Ran, Report, Snapshot};
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
}

fn failed(err: MigrationError) -> Error {
    let kind = match err.kind() {
        dmm_volume::ErrorKind::Refused => ErrorKind::Invalid,
        dmm_volume::ErrorKind::InvalidState => ErrorKind::Conflict,
        _ => ErrorKind::Failed,
    };
    Error::new(kind, err.report())
}

/// Opens the source (read-only is enough for `redirect`, which never
/// writes it) and the target: a path or URI, or `NODE:/PATH` on a peer,
/// which the peer is asked to receive (the volume's size, its allocated
/// bytes and its export name are the metadata it gets first) and which is
/// then reached over NBD with TLS.
async fn open_stores(spec: &VolumeSpec, peers: &Peers) -> Result<(OpenedStore, OpenedStore)> {
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
    let target = match peers.peer_target(&spec.target) {
        Some((peer, path)) => {
            let request = ReceiveRequest {
                path: path.to_owned(),
                size: source.store.size(),
                allocated: allocated(&*source.store).await.map_err(open("source"))?,
                export: spec.export.clone(),
            };
            peers.prepare_target(peer, &request).await?
        }
        None => spec.target.clone(),
    };
    let target = open_store(&target, Access::default())
        .await
        .map_err(open("target"))?;
    Ok((source, target))
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
pub async fn check(spec: &VolumeSpec, peers: &Peers) -> Result<()> {
    let (source, target) = open_stores(spec, peers).await?;
    dmm_volume::negotiate(&*source.store, &*target.store, &spec.config)
        .map_err(|err| Error::new(ErrorKind::Invalid, err.to_string()))
}

impl VolumeEngine {
    pub async fn open(spec: &VolumeSpec, dir: &Path, peers: &Peers) -> Result<VolumeEngine> {
        let (source, target) = open_stores(spec, peers).await?;
        let names = (source.name, target.name);
        let migration =
            Migration::open(source.store, target.store, names, dir, spec.config.clone())
                .await
                .map_err(failed)?;
        if spec.manual_switchover {
            migration.controls().hold_switchover();
        }
        Ok(VolumeEngine {
            migration,
            export: spec.export.clone(),
            manual: AtomicBool::new(spec.manual_switchover),
        })
    }
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
        match self.migration.run().await {
            Ok(Phase::Verified) => Ok(Ran::Done(
                "the destination holds the whole volume; ready to commit",
            )),
            Ok(Phase::RolledBack) => {
                Ok(Ran::Done("rolled back: the source holds the whole volume"))
            }
            Ok(_) => Ok(Ran::Done("done")),
            Err(err) if err.kind() == dmm_volume::ErrorKind::Stopped => Ok(Ran::Stopped),
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
