//! One interface for every kind of migration engine: what the supervisor
//! drives, whatever the kind moves.
//!
//! The supervisor's verbs call only [`Engine`]; each kind implements it in
//! its own file ([`volume`], [`tree`], [`stream`]) and is opened from its typed
//! [`Spec`] by [`open`]. A new kind is a new file here, a variant of
//! [`Spec`] and of [`Report`], and nothing in the supervisor.

mod stream;
mod tree;
mod volume;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use dmm_catalog::State;
use dmm_control::Controls;
use dmm_store::BlockStore;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::peers::Peers;
use crate::spec::Spec;

/// A running migration's progress, as its kind reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Report {
    Tree(Box<dmm_tree::TreeReport>),
    Volume(Box<dmm_volume::Progress>),
    Stream(Box<dmm_stream::StreamReport>),
}

impl Report {
    /// The figures a migration's summary keeps once its engine is closed:
    /// bytes copied (volumes: by the copier, over all runs; trees: written
    /// to the target) and what verification found, once it found
    /// anything.
    pub fn figures(&self) -> (u64, Option<String>) {
        let (bytes, verified, what, mismatches) = match self {
            Report::Volume(v) => (
                v.copied_bytes,
                v.verified_chunks,
                "chunks",
                v.mismatches.len(),
            ),
            Report::Tree(t) => (
                t.progress.counts.bytes_written,
                t.verified_files,
                "files",
                t.mismatches.len(),
            ),
            // A drain that differs from its source fails its move: the
            // moves counted were all verified equal.
            Report::Stream(s) => (
                s.figures.drained + s.figures.redirected,
                s.figures.moves,
                "drained extents",
                0,
            ),
        };
        let verification = match (verified, mismatches) {
            (_, 1..) => Some(format!("{mismatches} mismatches in {verified} {what}")),
            (1.., 0) => Some(format!("{verified} {what} verified, all equal")),
            (0, 0) => None,
        };
        (bytes, verification)
    }
}

/// An engine's progress and the catalog state it corresponds to.
pub struct Snapshot {
    pub state: State,
    pub report: Report,
}

/// How a run ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    /// The engine needs the admin (ready to commit, rolled back); the
    /// message goes to the migration's log.
    Done(&'static str),
    /// Stopped on request; the state on disk resumes it.
    Stopped,
}

/// A migration engine the supervisor has open.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Pause, stop, bandwidth and priority.
    fn controls(&self) -> &Controls;

    /// Moves the data until the engine needs the admin, it is stopped, or
    /// it fails.
    async fn run(&self) -> Result<Ran>;

    async fn snapshot(&self) -> Snapshot;

    /// Per-item errors in `report` not reported yet, as log lines.
    fn take_news(&self, _report: &Report) -> Vec<String> {
        Vec::new()
    }

    /// The device clients use, when the kind is served over NBD.
    fn export(&self) -> Option<(String, Arc<dyn BlockStore>)> {
        None
    }

    /// Retries the item in error at `path` now (a tree's file), without
    /// waiting for its backoff.
    fn retry(&self, path: &str) -> Result<()> {
        Err(Error::new(
            ErrorKind::Invalid,
            format!("cannot retry {path}: only a tree migration has per-file errors"),
        ))
    }

    /// Applies the live properties of a changed specification.
    fn apply(&self, spec: &Spec);

    /// Lets a migration that waits for the admin switch over.
    async fn switchover(&self) -> Result<()>;

    /// Starts bringing the source back to holding everything.
    async fn rollback(&self) -> Result<()>;

    /// Chunks of data that exist only on the destination (a halt that
    /// removes the copy state would lose them).
    async fn destination_only(&self) -> Result<u64>;

    /// Ends the migration for good; returns the log line saying so.
    async fn commit(&self) -> Result<&'static str>;

    /// Frees the engine's resources once it is stopped, keeping its state
    /// resumable.
    async fn close(&self) -> Result<()>;
}

/// Opens the engine of `spec`, resuming from the state in `dir` (a target
/// on a peer, `NODE:/PATH`, is prepared there first).
pub async fn open(spec: &Spec, dir: &Path, peers: &Arc<Peers>) -> Result<Arc<dyn Engine>> {
    match spec {
        Spec::Volume(volume) => Ok(Arc::new(
            volume::VolumeEngine::open(volume, dir, peers).await?,
        )),
        Spec::Tree(tree) => Ok(Arc::new(tree::TreeEngine::open(tree, dir).await?)),
        Spec::Stream(stream) => Ok(Arc::new(stream::StreamEngine::open(stream, dir).await?)),
    }
}

/// Checks that a new migration can work (stores open, sizes and formats
/// agree, directories usable) without recording anything.
pub async fn check(spec: &Spec, peers: &Arc<Peers>) -> Result<()> {
    match spec {
        Spec::Volume(volume) => volume::check(volume, peers).await,
        Spec::Tree(tree) => tree::check(tree),
        Spec::Stream(stream) => stream::check(stream),
    }
}

/// Whether the kind ever writes to its source (so that a halt that removes
/// the copy state must first be sure the source is complete).
pub fn writes_source(spec: &Spec) -> bool {
    matches!(spec, Spec::Volume(_))
}
