//! The stream engine ([`dmm_stream::StreamStore`] behind its access
//! point) behind the [`Engine`] interface: the run moves streams along the
//! orbit as the policy says until stopped; a store whose streams are all
//! where the policy puts them is ready to commit, which seals them and
//! unmounts the access point.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use dmm_catalog::State;
use dmm_control::Controls;
use dmm_stream::{Policy, StreamReport, StreamStore};
use dmm_tree::AccessPoint;
use parking_lot::Mutex;

use super::{Engine, Ran, Report, Snapshot};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::{Spec, StreamSpec};

/// An open stream store.
pub struct StreamEngine {
    store: Arc<StreamStore>,
    access: Mutex<Option<AccessPoint>>,
    controls: Arc<Controls>,
    /// Read by the run at every pass: `dmm set` changes it live.
    policy: Arc<Mutex<Policy>>,
}

/// Checks the orbit's directories and the access point of a new store.
pub fn check(spec: &StreamSpec) -> Result<()> {
    for tier in spec.orbit.tiers() {
        let usable = match std::fs::metadata(&tier.dir) {
            Ok(meta) => meta.is_dir(),
            Err(_) => tier.dir.parent().is_some_and(Path::is_dir),
        };
        if !usable {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "tier {}: {} is not a directory, nor can it be created in one",
                    tier.name,
                    tier.dir.display()
                ),
            ));
        }
    }
    dmm_tree::check_mountpoint(&spec.access)
        .map_err(|err| Error::new(ErrorKind::Invalid, err.report()))
}

impl StreamEngine {
    /// Opens the store's journal in `dir` (resolving what a crash left)
    /// and mounts the access point.
    pub async fn open(spec: &StreamSpec, dir: &Path) -> Result<StreamEngine> {
        std::fs::create_dir_all(dir).map_err(|err| {
            let context = format!("cannot create {}", dir.display());
            Error::caused(ErrorKind::Failed, context, err)
        })?;
        let (orbit, journal) = (spec.orbit.clone(), dir.join("streams.db"));
        let store = Arc::new(blocking(move || StreamStore::open(orbit, &journal)).await?);
        let (mounted, path, users) = (store.clone(), spec.access.clone(), spec.access_users);
        let access = blocking(move || dmm_stream::mount(mounted, &path, users)).await?;
        Ok(StreamEngine {
            store,
            access: Mutex::new(Some(access)),
            controls: Arc::new(Controls::new(spec.rate, 1, spec.priority)),
            policy: Arc::new(Mutex::new(spec.policy)),
        })
    }

    fn report(&self) -> StreamReport {
        let policy = *self.policy.lock();
        self.store
            .report(&policy, self.controls.is_paused())
            .unwrap_or_else(|err| {
                tracing::warn!("{}", err.report());
                StreamReport::default()
            })
    }

    /// Unmounts the access point (unless clients use it, when
    /// `unless_busy`), then seals every stream: no append can follow.
    async fn seal_and_unmount(&self, unless_busy: bool) -> Result<()> {
        let access = self.access.lock().take();
        let store = self.store.clone();
        let unmounted = blocking(move || {
            if let Some(mut access) = access {
                let detached = match unless_busy {
                    true => access.unmount_unless_busy(),
                    false => access.detach(),
                };
                if let Err(err) = detached.and_then(|()| access.join()) {
                    return Ok(Some((access, err.report())));
                }
            }
            store.seal()?;
            Ok(None)
        })
        .await?;
        match unmounted {
            None => Ok(()),
            Some((access, why)) => {
                *self.access.lock() = Some(access);
                Err(Error::new(ErrorKind::Conflict, why))
            }
        }
    }
}

/// The catalog state a store's progress corresponds to: streams with a
/// move under way or due keep it running; once every stream is where the
/// policy puts it, it is ready to commit (switched-over, for every kind).
fn state_of(report: &StreamReport) -> State {
    match (report.paused, report.pending) {
        (true, _) => State::Paused,
        (false, 1..) => State::Running,
        (false, 0) => State::SwitchedOver,
    }
}

#[async_trait]
impl Engine for StreamEngine {
    fn controls(&self) -> &Controls {
        &self.controls
    }

    async fn run(&self) -> Result<Ran> {
        let (store, controls, policy) = (
            self.store.clone(),
            self.controls.clone(),
            self.policy.clone(),
        );
        // A thread of its own: the mover nices it (`keep_moving`).
        let (done, moved) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("dmm-stream-mover".into())
            .spawn(move || {
                let _ = done.send(store.keep_moving(|| *policy.lock(), &controls));
            })
            .map_err(|err| {
                Error::caused(ErrorKind::Failed, "cannot start the stream mover", err)
            })?;
        match moved.await {
            Ok(Ok(())) => Ok(Ran::Stopped),
            Ok(Err(err)) => Err(Error::new(ErrorKind::Failed, err.report())),
            Err(_) => Err(Error::new(
                ErrorKind::Failed,
                "the stream mover's thread ended without a word",
            )),
        }
    }

    async fn snapshot(&self) -> Snapshot {
        let report = self.report();
        Snapshot {
            state: state_of(&report),
            report: Report::Stream(Box::new(report)),
        }
    }

    fn apply(&self, spec: &Spec) {
        let live = spec.live();
        self.controls.set_rate(live.rate);
        self.controls.set_priority(live.priority);
        if let Spec::Stream(stream) = spec {
            *self.policy.lock() = stream.policy;
        }
    }

    async fn switchover(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Conflict,
            "it is a stream store: each stream switches to its new tier by itself, between two \
             appends, without the writer waiting; there is no switchover to ask for",
        ))
    }

    async fn rollback(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Conflict,
            "it is a stream store, whose moves do not roll back: a move that switched goes on \
             to its link (pause it to hold the drain); its source extent is released only \
             after the drain is verified",
        ))
    }

    async fn destination_only(&self) -> Result<u64> {
        Ok(0)
    }

    async fn commit(&self) -> Result<&'static str> {
        if let Some(row) = self.report().streams.iter().find(|s| s.moving.is_some()) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "stream {} is moving: commit once its move is linked",
                    row.name
                ),
            ));
        }
        self.seal_and_unmount(true).await?;
        Ok("committed: every stream is sealed on its tier; the access point is unmounted")
    }

    async fn close(&self) -> Result<()> {
        self.seal_and_unmount(false).await
    }
}

/// Runs blocking store work (journal, syncs, mounts) off the event loop.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> dmm_stream::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done.map_err(|err| Error::new(ErrorKind::Failed, err.report())),
        Err(err) => Err(Error::caused(
            ErrorKind::Failed,
            "the stream engine's thread failed",
            err,
        )),
    }
}
