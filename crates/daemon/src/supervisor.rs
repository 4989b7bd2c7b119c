//! The supervisor: every migration's lifecycle, from the verbs of the CLI
//! to the engine and back to the catalog.
//!
//! Each verb checks the migration's state, records its intent in the
//! catalog, acts, and records the outcome (phased commits), so that a daemon
//! killed in the middle knows on restart what it was doing
//! ([`Supervisor::recover`]). A running volume migration is a
//! [`dmm_volume::Migration`] plus the task that drives it and its NBD export
//! in the daemon's shared export table; a running tree migration is a
//! [`TreeJob`] (its access point mounted) plus the task that watches it.
//! The task maps the engine's phases to catalog states as they happen.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dmm_catalog::{Catalog, Event, Intent, MigrationId, MigrationRecord, State};
use dmm_nbd::{Export, ExportTable};
use dmm_volume::{Activity, Migration, Phase, Progress};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::properties;
use crate::stores;
use crate::tree_job::{TreeJob, TreePhase, TreeReport, TreeRunError};

/// Why a verb was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such migration.
    NotFound,
    /// Bad property, bad value, bad request.
    Invalid,
    /// Not valid in the migration's current state (or busy).
    Conflict,
    /// The action was tried and failed (a store cannot be opened, …).
    Failed,
}

/// A refused or failed verb: one line for the admin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OpError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }
}

impl From<dmm_catalog::Error> for OpError {
    fn from(err: dmm_catalog::Error) -> OpError {
        let kind = match err.kind {
            dmm_catalog::ErrorKind::NotFound => ErrorKind::NotFound,
            dmm_catalog::ErrorKind::Busy => ErrorKind::Conflict,
            _ => ErrorKind::Failed,
        };
        OpError::new(kind, err.to_string())
    }
}

type Outcome<T = MigrationRecord> = Result<T, OpError>;

/// What subscribers of the event stream receive.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Notice {
    State {
        migration: MigrationId,
        state: State,
        error: Option<String>,
    },
    Log {
        event: Event,
    },
    Progress {
        migration: MigrationId,
        progress: Report,
    },
}

/// A running migration's progress, as its kind reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Report {
    Volume(Box<Progress>),
    Tree(Box<TreeReport>),
}

/// The engine of an open migration.
#[derive(Clone)]
enum Job {
    Volume(Arc<Migration>),
    Tree(Arc<TreeJob>),
}

impl Job {
    fn controls(&self) -> &dmm_volume::Controls {
        match self {
            Job::Volume(migration) => migration.controls(),
            Job::Tree(tree) => tree.controls(),
        }
    }

    async fn report(&self) -> Report {
        match self {
            Job::Volume(migration) => Report::Volume(Box::new(migration.progress().await)),
            Job::Tree(tree) => Report::Tree(Box::new(tree.report())),
        }
    }

    /// Ends the migration for good (see each engine's `commit`).
    async fn commit(&self) -> Result<(), String> {
        match self {
            Job::Volume(migration) => migration.commit().await.map_err(|e| e.to_string()),
            Job::Tree(tree) => tree.commit().await.map_err(|e| e.to_string()),
        }
    }

    /// The volume engine, for the verbs only volumes have.
    fn volume(&self, verb: &str, id: MigrationId) -> Outcome<&Arc<Migration>> {
        match self {
            Job::Volume(migration) => Ok(migration),
            Job::Tree(_) => Err(OpError::new(
                ErrorKind::Conflict,
                format!("cannot {verb} migration {id}: it is a tree migration"),
            )),
        }
    }
}

/// A migration whose engine is open.
struct Engine {
    job: Job,
    /// The NBD export of a volume.
    export: Option<String>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Drives an engine until it needs the admin: `Ok(Some(message))` when it
/// is done, `Ok(None)` when stopped, `Err(message)` when it failed.
async fn run_job(job: &Job) -> Result<Option<&'static str>, String> {
    match job {
        Job::Volume(migration) => match migration.run().await {
            Ok(Phase::Verified) => Ok(Some(
                "the destination holds the whole volume; ready to commit",
            )),
            Ok(Phase::RolledBack) => Ok(Some("rolled back: the source holds the whole volume")),
            Ok(_) => Ok(Some("done")),
            Err(err) if err.kind() == dmm_volume::ErrorKind::Stopped => Ok(None),
            Err(err) => Err(err.report()),
        },
        Job::Tree(tree) => match tree.run().await {
            Ok(()) => Ok(Some(
                "every entry is migrated and verified; ready to commit",
            )),
            Err(TreeRunError::Stopped) => Ok(None),
            Err(err) => Err(err.to_string()),
        },
    }
}

/// The daemon's migrations.
pub struct Supervisor {
    catalog: Arc<Catalog>,
    volumes: PathBuf,
    trees: PathBuf,
    exports: Arc<ExportTable>,
    engines: Mutex<HashMap<MigrationId, Engine>>,
    notices: broadcast::Sender<Notice>,
}

/// The verbs and the states they are valid in.
fn refuse_unless(record: &MigrationRecord, verb: &str, valid: &[State]) -> Outcome<()> {
    if valid.contains(&record.state) {
        return Ok(());
    }
    let names: Vec<&str> = valid.iter().map(|s| s.as_str()).collect();
    Err(OpError::new(
        ErrorKind::Conflict,
        format!(
            "cannot {verb} migration {}: it is {} ({verb} is valid when {})",
            record.id,
            record.state,
            names.join(", ")
        ),
    ))
}

/// The catalog state an engine's progress corresponds to.
fn state_of(report: &Report) -> State {
    match report {
        Report::Volume(progress) => {
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
        // A tree's access point shows the target from the start; once
        // everything is migrated and verified it is ready to commit, which
        // the catalog calls switched-over for both kinds.
        Report::Tree(report) => match report.phase {
            TreePhase::Migrating if report.paused => State::Paused,
            TreePhase::Migrating => State::Running,
            TreePhase::Verifying => State::Verifying,
            TreePhase::Verified => State::SwitchedOver,
        },
    }
}

fn is_tree(record: &MigrationRecord) -> bool {
    record.kind == "tree"
}

impl Supervisor {
    pub fn new(
        catalog: Arc<Catalog>,
        layout: &crate::Layout,
        exports: Arc<ExportTable>,
    ) -> Arc<Supervisor> {
        let (notices, _) = broadcast::channel(1024);
        Arc::new(Supervisor {
            catalog,
            volumes: layout.volumes(),
            trees: layout.trees(),
            exports,
            engines: Mutex::new(HashMap::new()),
            notices,
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Receives state changes, log lines and progress.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Records a line in the migration's log (catalog, logfile, stream).
    pub fn note(&self, id: MigrationId, level: &str, message: &str) {
        match level {
            "error" => tracing::error!(migration = id, "{message}"),
            _ => tracing::info!(migration = id, "{message}"),
        }
        let Ok(event) = self.catalog.log(id, level, message) else {
            return;
        };
        if let Ok(record) = self.catalog.get(id)
            && let Some(path) = record.properties.get("logfile")
        {
            use std::io::Write;
            let line = format!("{} {level} {message}\n", event.at);
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(err) = appended {
                tracing::warn!(migration = id, "cannot write the log file {path}: {err}");
            }
        }
        let _ = self.notices.send(Notice::Log { event });
    }

    fn announce(&self, id: MigrationId, state: State, error: Option<String>) {
        let _ = self.notices.send(Notice::State {
            migration: id,
            state,
            error,
        });
    }

    /// Records the end of a transition and tells subscribers.
    fn conclude(&self, intent: &Intent, state: State, error: Option<&str>) -> Outcome {
        self.catalog.finish(intent, state, error)?;
        self.announce(intent.migration, state, error.map(str::to_owned));
        Ok(self.catalog.get(intent.migration)?)
    }

    /// Where a migration's engine keeps its state.
    fn state_dir(&self, record: &MigrationRecord) -> PathBuf {
        match is_tree(record) {
            true => self.trees.join(record.id.to_string()),
            false => self.volumes.join(record.id.to_string()),
        }
    }

    fn tree_config(&self, record: &MigrationRecord) -> dmm_tree::TreeConfig {
        let journal = self.state_dir(record).join("journal.db");
        properties::tree_config(record.id, &record.properties, journal)
    }

    /// Creates a migration; starts it unless `halted`. The stores are opened
    /// and checked first: a request that cannot work records nothing.
    pub async fn create(
        self: &Arc<Self>,
        properties: BTreeMap<String, String>,
        halted: bool,
    ) -> Outcome {
        properties::check_new(&properties).map_err(|m| OpError::new(ErrorKind::Invalid, m))?;
        self.check_stores(&properties).await?;
        let kind = properties::value(&properties, "kind").unwrap_or("volume");
        let state = if halted {
            State::Halted
        } else {
            State::Created
        };
        let record = self.catalog.create(kind, state, &properties)?;
        self.note(record.id, "info", &format!("created ({state})"));
        if halted {
            return Ok(record);
        }
        self.start(record.id).await
    }

    /// Opens the stores of a migration and negotiates (for a tree: checks
    /// source, target and access point), without recording anything.
    async fn check_stores(&self, properties: &BTreeMap<String, String>) -> Outcome<()> {
        if properties::value(properties, "kind") == Some("tree") {
            let config = properties::tree_config(0, properties, PathBuf::new());
            return dmm_tree::check(&config, true)
                .map_err(|e| OpError::new(ErrorKind::Invalid, e.to_string()));
        }
        let (source, target) = self.open_stores(properties).await?;
        let config = properties::config(properties);
        dmm_volume::negotiate(&*source.store, &*target.store, &config)
            .map_err(|e| OpError::new(ErrorKind::Invalid, e.to_string()))
    }

    async fn open_stores(
        &self,
        properties: &BTreeMap<String, String>,
    ) -> Outcome<(stores::Opened, stores::Opened)> {
        let get = |name| properties::value(properties, name).unwrap_or_default();
        let redirect = get("strategy") == "redirect";
        let failed = |e: anyhow::Error| OpError::new(ErrorKind::Failed, format!("{e:#}"));
        let source = stores::open(get("source"), false, redirect)
            .await
            .map_err(failed)?;
        let target = stores::open(get("target"), false, false)
            .await
            .map_err(failed)?;
        Ok((source, target))
    }

    /// Starts (or restarts) a migration.
    pub async fn start(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        if record.state == State::Paused {
            return self.resume(id).await;
        }
        let valid = [State::Created, State::Stopped, State::Halted, State::Failed];
        refuse_unless(&record, "start", &valid)?;
        let intent = self.catalog.begin(id, "start", State::Running)?;
        match self.launch(&record).await {
            Ok(()) => {
                self.note(id, "info", "started");
                self.conclude(&intent, State::Running, None)
            }
            Err(err) => {
                self.note(id, "error", &format!("cannot start: {}", err.message));
                self.conclude(&intent, State::Failed, Some(&err.message))?;
                Err(err)
            }
        }
    }

    /// Opens the engine (resuming its saved state), exports it, and starts
    /// the task that drives it.
    async fn launch(self: &Arc<Self>, record: &MigrationRecord) -> Outcome<()> {
        let job = self.open_engine(record).await?;
        self.drive(record.id, &job);
        Ok(())
    }

    async fn open_engine(self: &Arc<Self>, record: &MigrationRecord) -> Outcome<Job> {
        if let Some(engine) = self.engines.lock().get(&record.id) {
            return Ok(engine.job.clone());
        }
        let job = match is_tree(record) {
            true => Job::Tree(self.open_tree(record).await?),
            false => Job::Volume(self.open_volume(record).await?),
        };
        let export = match &job {
            Job::Volume(_) => Some(
                record
                    .properties
                    .get("export")
                    .cloned()
                    .unwrap_or_else(|| record.id.to_string()),
            ),
            Job::Tree(_) => None,
        };
        if let (Job::Volume(migration), Some(export)) = (&job, &export) {
            self.exports
                .insert(Export::new(export.clone(), migration.device()))
                .map_err(|e| OpError::new(ErrorKind::Conflict, e.to_string()))?;
        }
        self.engines.lock().insert(
            record.id,
            Engine {
                job: job.clone(),
                export,
                task: None,
            },
        );
        Ok(job)
    }

    /// Opens a tree engine: journal, access point, workers.
    async fn open_tree(&self, record: &MigrationRecord) -> Outcome<Arc<TreeJob>> {
        let config = self.tree_config(record);
        let dir = self.state_dir(record);
        std::fs::create_dir_all(&dir).map_err(|e| {
            OpError::new(
                ErrorKind::Failed,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        let controls = Arc::new(dmm_volume::Controls::new(config.rate, 1, config.priority));
        let verify = properties::value(&record.properties, "verify") != Some("none");
        let job = TreeJob::open(config, controls, verify)
            .await
            .map_err(|e| OpError::new(ErrorKind::Failed, e.to_string()))?;
        Ok(Arc::new(job))
    }

    async fn open_volume(&self, record: &MigrationRecord) -> Outcome<Arc<Migration>> {
        let (source, target) = self.open_stores(&record.properties).await?;
        let config = properties::config(&record.properties);
        let names = (source.name, target.name);
        let dir = self.state_dir(record);
        let migration = Migration::open(source.store, target.store, names, &dir, config)
            .await
            .map_err(|e| OpError::new(ErrorKind::Failed, e.to_string()))?;
        if properties::value(&record.properties, "switchover") == Some("manual") {
            migration.controls().hold_switchover();
        }
        Ok(Arc::new(migration))
    }

    /// Starts the task that runs the engine and reports on it.
    fn drive(self: &Arc<Self>, id: MigrationId, job: &Job) {
        let supervisor = self.clone();
        let job = job.clone();
        let task = tokio::spawn(async move { supervisor.run_engine(id, job).await });
        if let Some(slot) = self.engines.lock().get_mut(&id) {
            slot.task = Some(task);
        }
    }

    /// Runs the engine to its end, mirroring its progress in the catalog;
    /// returns `Ok(message)` when it is done, `Ok(None)` when stopped.
    async fn run_engine(self: Arc<Self>, id: MigrationId, job: Job) {
        let running = run_job(&job);
        tokio::pin!(running);
        let mut last = None;
        let outcome = loop {
            tokio::select! {
                outcome = &mut running => break outcome,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    self.follow(id, &job, &mut last).await;
                }
            }
        };
        self.follow(id, &job, &mut last).await;
        match outcome {
            Ok(Some(message)) => self.note(id, "info", message),
            Ok(None) => {}
            Err(message) => {
                self.note(id, "error", &message);
                if self
                    .catalog
                    .set_state(id, State::Failed, Some(&message))
                    .is_ok()
                {
                    self.announce(id, State::Failed, Some(message));
                }
            }
        }
    }

    /// Mirrors the engine's phase in the catalog, logs a tree's new
    /// per-file errors, and publishes progress.
    async fn follow(&self, id: MigrationId, job: &Job, last: &mut Option<State>) {
        let report = job.report().await;
        let state = state_of(&report);
        if let (Job::Tree(tree), Report::Tree(report)) = (job, &report) {
            for line in tree.new_errors(report) {
                self.note(id, "error", &line);
            }
        }
        let _ = self.notices.send(Notice::Progress {
            migration: id,
            progress: report,
        });
        let Ok(record) = self.catalog.get(id) else {
            return;
        };
        // A verb in progress owns the state; a failure is final until a verb.
        if record.pending.is_some() || record.state == State::Failed || *last == Some(state) {
            return;
        }
        *last = Some(state);
        if record.state != state && self.catalog.set_state(id, state, None).is_ok() {
            if state != State::Running {
                self.note(id, "info", &format!("now {state}"));
            }
            self.announce(id, state, None);
        }
    }

    fn engine(&self, id: MigrationId) -> Option<Job> {
        self.engines.lock().get(&id).map(|e| e.job.clone())
    }

    /// Suspends the copy in memory (clients keep working).
    pub async fn pause(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        refuse_unless(&record, "pause", &[State::Running])?;
        let engine = self.engine(id).ok_or_else(|| self.not_open(id))?;
        let intent = self.catalog.begin(id, "pause", State::Paused)?;
        engine.controls().pause();
        self.note(id, "info", "paused");
        self.conclude(&intent, State::Paused, None)
    }

    pub async fn resume(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        refuse_unless(&record, "resume", &[State::Paused])?;
        let intent = self.catalog.begin(id, "resume", State::Running)?;
        let engine = match self.engine(id) {
            Some(engine) => engine,
            None => {
                self.launch(&record).await?;
                self.engine(id).ok_or_else(|| self.not_open(id))?
            }
        };
        engine.controls().resume();
        self.note(id, "info", "resumed");
        self.conclude(&intent, State::Running, None)
    }

    fn not_open(&self, id: MigrationId) -> OpError {
        OpError::new(
            ErrorKind::Failed,
            format!("migration {id} has no open engine"),
        )
    }

    /// Stops the engine resumably and frees its resources (the export
    /// goes away).
    async fn close(&self, id: MigrationId) {
        let engine = self.engines.lock().remove(&id);
        let Some(engine) = engine else {
            return;
        };
        engine.job.controls().request_stop();
        if let Some(task) = engine.task {
            let _ = task.await;
        }
        if let Some(export) = &engine.export {
            self.exports.remove(export);
        }
        match &engine.job {
            Job::Volume(migration) => {
                let _ = migration.checkpoint().await;
            }
            Job::Tree(tree) => {
                if let Err(err) = tree.close().await {
                    self.note(id, "error", &format!("closing the tree migration: {err}"));
                }
            }
        }
    }

    /// Suspends a migration with its state on disk and its resources freed.
    pub async fn stop(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        let valid = [
            State::Running,
            State::Paused,
            State::Failed,
            State::Verifying,
            State::SwitchedOver,
        ];
        refuse_unless(&record, "stop", &valid)?;
        let intent = self.catalog.begin(id, "stop", State::Stopped)?;
        self.close(id).await;
        self.note(id, "info", "stopped; its state is kept");
        self.conclude(&intent, State::Stopped, None)
    }

    /// Halts a migration; with `remove`, its copy state is deleted (it
    /// starts from zero next time), which is refused while the destination
    /// holds data the source lacks.
    pub async fn halt(self: &Arc<Self>, id: MigrationId, remove: bool) -> Outcome {
        let record = self.catalog.get(id)?;
        let valid = [
            State::Created,
            State::Running,
            State::Paused,
            State::Stopped,
            State::Failed,
            State::Verifying,
            State::SwitchedOver,
            State::Halted,
        ];
        refuse_unless(&record, "halt", &valid)?;
        if remove {
            self.check_source_complete(&record).await?;
        }
        let intent = self.catalog.begin(id, "halt", State::Halted)?;
        self.close(id).await;
        if remove {
            let dir = self.state_dir(&record);
            if let Err(err) = std::fs::remove_dir_all(&dir)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                let message = format!("cannot remove {}: {err}", dir.display());
                self.catalog.abandon(&intent)?;
                return Err(OpError::new(ErrorKind::Failed, message));
            }
        }
        let how = if remove {
            "its state was removed"
        } else {
            "its state is kept"
        };
        self.note(id, "info", &format!("halted; {how}"));
        self.conclude(&intent, State::Halted, None)
    }

    /// Refuses when destination-only data exists (a rollback is needed to
    /// bring it back to the source first).
    /// A tree's source is never written, so it is always complete.
    async fn check_source_complete(self: &Arc<Self>, record: &MigrationRecord) -> Outcome<()> {
        if is_tree(record) || !self.state_dir(record).exists() {
            return Ok(());
        }
        let job = match self.engine(record.id) {
            Some(job) => job,
            None => {
                let job = self.open_engine(record).await?;
                self.close(record.id).await;
                job
            }
        };
        let engine = job.volume("check", record.id)?;
        let only_on_destination = engine.destination_only_chunks();
        if only_on_destination > 0 {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!(
                    "migration {}: {only_on_destination} chunks exist only on the destination; \
                     roll back first (dmm rollback {})",
                    record.id, record.id
                ),
            ));
        }
        Ok(())
    }

    /// Lets a `switchover=manual` migration switch to the destination.
    pub async fn switchover(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        refuse_unless(&record, "switchover", &[State::Running, State::Paused])?;
        if is_tree(&record) {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!(
                    "migration {id} is a tree migration: its access point shows the target \
                     from the start, so there is no switchover; commit it once it is done"
                ),
            ));
        }
        if properties::value(&record.properties, "switchover") != Some("manual") {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!(
                    "migration {id} switches over by itself (switchover=auto); \
                     set -p switchover=manual to decide when"
                ),
            ));
        }
        let engine = self.engine(id).ok_or_else(|| self.not_open(id))?;
        engine.controls().allow_switchover();
        self.note(id, "info", "switchover allowed");
        Ok(self.catalog.get(id)?)
    }

    /// Releases the source: the destination is the volume; the export goes
    /// away (clients use the destination directly from now on).
    pub async fn commit(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        if record.state != State::SwitchedOver {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!(
                    "cannot commit migration {id}: it is {} (commit is valid once the \
                     destination holds everything and verification passed: switched-over)",
                    record.state
                ),
            ));
        }
        let job = match self.engine(id) {
            Some(job) => job,
            None => self.open_engine(&record).await?,
        };
        let intent = self.catalog.begin(id, "commit", State::Committed)?;
        if let Err(message) = job.commit().await {
            self.catalog.abandon(&intent)?;
            return Err(OpError::new(ErrorKind::Conflict, message));
        }
        self.close(id).await;
        let message = match job {
            Job::Volume(_) => "committed: the source is released",
            Job::Tree(_) => "committed: the access point is unmounted; the target is a plain tree",
        };
        self.note(id, "info", message);
        self.conclude(&intent, State::Committed, None)
    }

    /// Rolls a migration back: destination-only chunks are copied back and
    /// the source holds the whole volume again.
    pub async fn rollback(self: &Arc<Self>, id: MigrationId) -> Outcome {
        let record = self.catalog.get(id)?;
        let valid = [
            State::Running,
            State::Paused,
            State::Stopped,
            State::Failed,
            State::Verifying,
            State::SwitchedOver,
        ];
        refuse_unless(&record, "rollback", &valid)?;
        if is_tree(&record) {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!(
                    "migration {id} is a tree migration, which does not roll back: its source \
                     was never written (changes made through the access point exist only in the \
                     target); halt it to go back to the source"
                ),
            ));
        }
        let intent = self.catalog.begin(id, "rollback", State::Running)?;
        let opened = match self.engine(id) {
            Some(engine) => Ok(engine),
            None => self.open_engine(&record).await,
        };
        let job = match opened {
            Ok(job) => job,
            Err(err) => {
                self.catalog.abandon(&intent)?;
                return Err(err);
            }
        };
        let engine = job.volume("roll back", id)?;
        if let Err(err) = engine.request_rollback() {
            self.catalog.abandon(&intent)?;
            return Err(OpError::new(ErrorKind::Conflict, err.to_string()));
        }
        engine.controls().resume();
        let idle = self
            .engines
            .lock()
            .get(&id)
            .is_none_or(|e| e.task.as_ref().is_none_or(|t| t.is_finished()));
        if idle {
            self.drive(id, &job);
        }
        self.note(id, "info", "rolling back");
        self.conclude(&intent, State::Running, None)
    }

    /// Deletes a migration: its engine, export, state and record.
    pub async fn delete(self: &Arc<Self>, id: MigrationId, force: bool) -> Outcome<()> {
        let record = self.catalog.get(id)?;
        let busy = matches!(
            record.state,
            State::Running | State::Paused | State::Verifying
        );
        if busy && !force {
            return Err(OpError::new(
                ErrorKind::Conflict,
                format!(
                    "migration {id} is {}: stop it first, or delete -f to force",
                    record.state
                ),
            ));
        }
        self.catalog.begin(id, "delete", record.state)?;
        self.close(id).await;
        let dir = self.state_dir(&record);
        if let Err(err) = std::fs::remove_dir_all(&dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(migration = id, "cannot remove {}: {err}", dir.display());
        }
        self.catalog.delete(id)?;
        Ok(())
    }

    /// Changes properties; live ones reach a running migration at once.
    pub async fn set(
        self: &Arc<Self>,
        id: MigrationId,
        changes: BTreeMap<String, String>,
    ) -> Outcome {
        let record = self.catalog.get(id)?;
        for (name, value) in &changes {
            properties::check(name, value).map_err(|m| OpError::new(ErrorKind::Invalid, m))?;
            properties::check_applies(name, &record.kind)
                .map_err(|m| OpError::new(ErrorKind::Invalid, m))?;
            properties::check_change(name, record.state)
                .map_err(|m| OpError::new(ErrorKind::Conflict, m))?;
        }
        self.catalog.set_properties(id, &changes)?;
        let record = self.catalog.get(id)?;
        if let Some(engine) = self.engine(id) {
            let controls = engine.controls();
            let config = properties::config(&record.properties);
            controls.set_rate(properties::rate_of(&record.properties));
            controls.set_priority(config.priority);
            controls.set_in_flight(config.in_flight);
            match properties::value(&record.properties, "switchover") {
                Some("manual") if changes.contains_key("switchover") => controls.hold_switchover(),
                Some("auto") => controls.allow_switchover(),
                _ => {}
            }
        }
        let shown: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.note(id, "info", &format!("set {}", shown.join(" ")));
        Ok(record)
    }

    /// A migration's progress, if its engine is open.
    pub async fn progress(&self, id: MigrationId) -> Outcome<Option<Report>> {
        self.catalog.get(id)?;
        match self.engine(id) {
            Some(job) => Ok(Some(job.report().await)),
            None => Ok(None),
        }
    }

    /// After a restart: finishes the transitions the previous daemon left
    /// half done, then reopens every migration that was running or serving.
    pub async fn recover(self: &Arc<Self>) {
        for intent in self.catalog.pending().unwrap_or_default() {
            self.redo(&intent).await;
        }
        for record in self.catalog.list().unwrap_or_default() {
            let reopen = match record.state {
                State::Running | State::Verifying | State::SwitchedOver => Some(true),
                State::Paused | State::Failed | State::RolledBack => Some(false),
                _ => None,
            };
            let Some(run) = reopen else { continue };
            if self.engine(record.id).is_some() {
                continue;
            }
            match self.open_engine(&record).await {
                Ok(engine) => {
                    if record.state == State::Paused {
                        engine.controls().pause();
                    }
                    if run || record.state == State::Paused {
                        self.drive(record.id, &engine);
                    }
                    self.note(
                        record.id,
                        "info",
                        &format!("resumed after a daemon restart ({})", record.state),
                    );
                }
                Err(err) => {
                    let message = format!("cannot resume after a restart: {}", err.message);
                    self.note(record.id, "error", &message);
                    let _ = self
                        .catalog
                        .set_state(record.id, State::Failed, Some(&message));
                }
            }
        }
    }

    /// Completes (or undoes) one transition found half done.
    async fn redo(self: &Arc<Self>, intent: &Intent) {
        let id = intent.migration;
        let Ok(record) = self.catalog.get(id) else {
            return;
        };
        self.note(
            id,
            "info",
            &format!(
                "finishing {} interrupted by a daemon restart",
                intent.operation
            ),
        );
        let result = match intent.operation.as_str() {
            "delete" => {
                let dir = self.state_dir(&record);
                let _ = std::fs::remove_dir_all(&dir);
                self.catalog.delete(id).map(|_| ()).map_err(OpError::from)
            }
            // The engine state on disk already reflects whatever part was
            // done: record the target state and let recovery reopen it.
            "start" | "resume" | "rollback" => self
                .catalog
                .finish(intent, State::Running, None)
                .map_err(Into::into),
            "commit" => match self.open_engine(&record).await {
                Ok(job) => {
                    let committed = job.commit().await;
                    self.close(id).await;
                    match committed {
                        Ok(()) => self
                            .catalog
                            .finish(intent, State::Committed, None)
                            .map_err(Into::into),
                        Err(_) => self
                            .catalog
                            .finish(intent, intent.from, None)
                            .map_err(Into::into),
                    }
                }
                Err(_) => self
                    .catalog
                    .finish(intent, intent.from, None)
                    .map_err(Into::into),
            },
            "halt" => {
                // A halt that was removing state finishes removing it.
                self.catalog
                    .finish(intent, State::Halted, None)
                    .map_err(Into::into)
            }
            _ => self
                .catalog
                .finish(intent, intent.to, None)
                .map_err(Into::into),
        };
        if let Err(err) = result {
            tracing::error!(migration = id, "cannot finish {}: {err}", intent.operation);
        }
    }

    /// Stops every engine resumably (daemon shutdown). Catalog states stay
    /// as they are, so a restarted daemon resumes them.
    pub async fn shutdown(&self) {
        let ids: Vec<MigrationId> = self.engines.lock().keys().copied().collect();
        for id in ids {
            self.close(id).await;
        }
    }
}
