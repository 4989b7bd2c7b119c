//! The supervisor: every migration's lifecycle, from the verbs of the CLI
//! to the engine and back to the catalog.
//!
//! Each verb is checked against the lifecycle table
//! ([`dmm_catalog::RULES`]), records its intent in the catalog, acts, and
//! records the outcome (phased commits), so that a daemon killed in the
//! middle knows on restart what it was doing ([`Supervisor::recover`]).
//! An open migration is an [`Engine`] of its kind plus the task that
//! drives it (and, for a kind served over NBD, its export in the daemon's
//! shared export table); the task mirrors the engine's state in the
//! catalog as it changes. Nothing here knows what a kind moves.

mod handoff;
mod queue;
mod recovery;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dmm_catalog::{
    Catalog, Event, Failure, Intent, Leads, MigrationId, MigrationRecord, State, Verb,
};
use dmm_nbd::{Export, ExportTable};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::cluster::Node;
use crate::engine::{self, Engine, Ran, Report};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::Layout;
use crate::peers::Peers;
use crate::properties;
use crate::receive::{self, Handoffs, Receiver};
use crate::schedule::Schedule;
use crate::spec::Spec;

/// How often a running engine's progress is mirrored and published.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// The environment variable that makes the daemon kill itself with
/// SIGKILL right after recording the intent of the verb it names (as the
/// catalog spells it, e.g. `halt --remove`): how the tests interrupt a
/// verb between its intent and its act.
pub const CRASH_AFTER_INTENT: &str = "DMM_CRASH_AFTER_INTENT";

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
    /// The queue's order or `maxrunning` changed.
    Queue(crate::view::QueueView),
}

/// A migration whose engine is open.
struct Open {
    engine: Arc<dyn Engine>,
    /// The NBD export, for a kind served over NBD.
    export: Option<String>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The daemon's migrations.
///
/// Locks of the daemon crate: `open` here; the dashboard's sessions
/// (`ui::Sessions`), its chart history (`ui::History`) and the API's
/// wrong-credential counts (`access`) each have one too. Every one of
/// them is a leaf: held only to read or change its map, never across an
/// await, never while another is taken, so they have no order among
/// themselves.
///
/// What a node tells the peer it moves a volume to.
enum PeerCall<'a> {
    /// Serve the export (the switchover), through this node.
    Serve(&'a str),
    /// Serve it alone (the commit).
    Own(&'a str),
    /// The migration is gone.
    Release(&'a str),
}

/// `open` is the supervisor's one lock: held only to look up, insert or
/// remove an entry, never across an await or while an engine is called, so
/// no other lock is ever taken under it. Waits for an engine's task end on
/// a stop request (the engines answer one within 2 s, tested). Calls to a
/// peer daemon (a target on another node: its reception, the handoff at
/// switchover) are bounded by the client's 10 s limit, so a peer that
/// hangs delays a verb or a follow-up by that much at most.
pub struct Supervisor {
    catalog: Arc<Catalog>,
    layout: Layout,
    exports: Arc<ExportTable>,
    open: Mutex<HashMap<MigrationId, Open>>,
    notices: broadcast::Sender<Notice>,
    /// Other daemons, for targets on them (`NODE:/PATH`).
    peers: Arc<Peers>,
    /// Wakes the queue's task: a state, the queue or `maxrunning` changed.
    queue_changed: tokio::sync::Notify,
    /// Volumes peers handed to this node, served through them until they
    /// commit.
    handoffs: Handoffs,
    /// This node in its cluster on etcd, if it is in one.
    node: Option<Arc<Node>>,
    /// Migrations whose handoff task runs ([`Supervisor::start_handoff`]).
    handing: Mutex<std::collections::HashSet<MigrationId>>,
    /// Held across each change of a volume's owner and the check of the
    /// migration's state that decides it, so a handoff retried in the
    /// background never follows a rollback's take-back. Taken before the
    /// catalog; never held while waiting for a verb.
    owner_changes: tokio::sync::Mutex<()>,
}

impl Supervisor {
    pub fn new(
        catalog: Arc<Catalog>,
        layout: &Layout,
        exports: Arc<ExportTable>,
        peers: Arc<Peers>,
        node: Option<Arc<Node>>,
    ) -> Arc<Supervisor> {
        let (notices, _) = broadcast::channel(1024);
        Arc::new(Supervisor {
            catalog,
            layout: layout.clone(),
            exports,
            open: Mutex::new(HashMap::new()),
            notices,
            peers,
            queue_changed: tokio::sync::Notify::new(),
            handoffs: Handoffs::default(),
            node,
            handing: Mutex::new(std::collections::HashSet::new()),
            owner_changes: tokio::sync::Mutex::new(()),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// This node's side of the volumes peers move to it.
    pub fn receiver(&self) -> Receiver<'_> {
        Receiver {
            catalog: &self.catalog,
            exports: &self.exports,
            peers: &self.peers,
            handoffs: &self.handoffs,
            node: self.node.as_ref(),
        }
    }

    /// Offers again the volumes peers moved or are moving to this node;
    /// one handed over is served again once its sender answers.
    pub fn restore_receptions(self: &Arc<Self>) {
        let waiting = match receive::restore(&self.receiver()) {
            Ok(waiting) => waiting,
            Err(err) => {
                tracing::error!(
                    "cannot offer the volumes received from peers: {}",
                    err.line()
                );
                return;
            }
        };
        for reception in waiting {
            let supervisor = self.clone();
            tokio::spawn(async move {
                receive::serve_when_owner_answers(&supervisor.receiver(), reception).await;
            });
        }
    }

    /// The paths this daemon's migrations read or write.
    pub fn paths_in_use(&self) -> Result<Vec<String>> {
        let records = self.catalog.list()?;
        Ok(records
            .iter()
            .flat_map(|r| ["source", "target"].map(|name| r.properties.get(name).cloned()))
            .flatten()
            .collect())
    }

    /// Receives state changes, log lines and progress.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Records a line in the migration's log (catalog, logfile, stream).
    fn note(&self, id: MigrationId, level: &str, message: &str) {
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
            append_line(id, path, &format!("{} {level} {message}\n", event.at));
        }
        let _ = self.notices.send(Notice::Log { event });
    }

    fn announce(&self, id: MigrationId, state: State, error: Option<String>) {
        self.queue_changed.notify_one();
        let _ = self.notices.send(Notice::State {
            migration: id,
            state,
            error,
        });
    }

    /// Records the end of a transition and tells subscribers.
    fn conclude(
        &self,
        intent: &Intent,
        state: State,
        error: Option<&str>,
    ) -> Result<MigrationRecord> {
        self.catalog.finish(intent, state, error)?;
        self.announce(intent.migration, state, error.map(str::to_owned));
        Ok(self.catalog.get(intent.migration)?)
    }

    /// Where a migration's engine keeps its state.
    fn state_dir(&self, record: &MigrationRecord) -> PathBuf {
        self.layout.engine_state(record.kind, record.id)
    }

    /// Creates a migration; starts it unless `halted`. The stores are opened
    /// and checked first: a request that cannot work records nothing.
    pub async fn create(
        self: &Arc<Self>,
        properties: BTreeMap<String, String>,
        halted: bool,
    ) -> Result<MigrationRecord> {
        let spec = Spec::of_new(&properties)?;
        engine::check(&spec, &self.peers).await?;
        if let (Some(node), Spec::Volume(volume)) = (&self.node, &spec) {
            node.owned_here(&volume.export).await?;
        }
        let state = match halted {
            true => State::Halted,
            false => State::Created,
        };
        let record = self.catalog.create(spec.kind(), state, &properties)?;
        self.note(record.id, "info", &format!("created ({state})"));
        if halted {
            return Ok(record);
        }
        self.apply(record.id, Verb::Start).await
    }

    /// Applies a verb (every verb but `set`, which carries its changes:
    /// [`Supervisor::set`]): checked against the lifecycle table, its
    /// intent recorded, its act done, its outcome recorded.
    pub async fn apply(self: &Arc<Self>, id: MigrationId, verb: Verb) -> Result<MigrationRecord> {
        let what = verb.name();
        let record = self.catalog.get(id)?;
        let rule = verb.rule();
        rule.check(record.state)
            .map_err(|e| Error::from(e).of(id, what))?;
        self.prepare(&record, verb)
            .await
            .map_err(|e| e.of(id, what))?;
        let intent = match rule.leads {
            Leads::To(state) => self.catalog.begin(id, verb, state)?,
            Leads::Admitted => self.catalog.admit(id, verb, self.max_running()?)?,
            Leads::Gone => self.catalog.begin(id, verb, record.state)?,
            Leads::Stays => {
                let act = self.act(&record, verb, record.state).await;
                act.map_err(|e| e.of(id, what))?;
                return Ok(self.catalog.get(id)?);
            }
        };
        crash_if_asked(verb);
        match self.act(&record, verb, intent.to).await {
            Ok(()) if rule.leads == Leads::Gone => Ok(record),
            Ok(()) => self.conclude(&intent, intent.to, None),
            Err(err) => Err(self.undo(&intent, err.of(id, what))?),
        }
    }

    /// A verb's act failed: the migration is left as the table says
    /// ([`Failure`]). Returns the error to report.
    fn undo(&self, intent: &Intent, err: Error) -> Result<Error> {
        match intent.verb.rule().failure {
            Failure::Failed => {
                let line = err.line();
                self.note(intent.migration, "error", &line);
                self.conclude(intent, State::Failed, Some(&line))?;
            }
            Failure::Unchanged => self.catalog.abandon(intent)?,
        }
        Ok(err)
    }

    /// What a verb checks before its intent is recorded (the act would
    /// fail or lose data).
    async fn prepare(self: &Arc<Self>, record: &MigrationRecord, verb: Verb) -> Result<()> {
        match verb {
            Verb::Halt { remove: true } => self.check_source_complete(record).await,
            Verb::Pause | Verb::Switchover => self.engine(record.id).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// The act of a verb leading to `to`, which recovery may repeat after
    /// a crash: each brings the engine (and its files) where the verb
    /// leads, whatever part of it was done before.
    async fn act(self: &Arc<Self>, record: &MigrationRecord, verb: Verb, to: State) -> Result<()> {
        let id = record.id;
        match verb {
            Verb::Start if to == State::Queued => self.note(
                id,
                "info",
                "queued: it starts when a slot frees (maxrunning; dmm queue shows the order)",
            ),
            Verb::Start | Verb::Resume => {
                if verb == Verb::Start {
                    self.catalog.record_start(id)?;
                }
                let engine = self.ensure_driven(record).await?;
                engine.controls().resume();
                self.note(
                    id,
                    "info",
                    if verb == Verb::Start {
                        "started"
                    } else {
                        "resumed"
                    },
                );
            }
            Verb::Pause => {
                self.engine(id)?.controls().pause();
                self.note(id, "info", "paused");
            }
            Verb::Stop => {
                self.close(id).await;
                self.note(id, "info", "stopped; its state is kept");
            }
            Verb::Halt { remove } => {
                self.close(id).await;
                if remove {
                    self.remove_state(record)?;
                }
                let how = if remove {
                    "its state was removed"
                } else {
                    "its state is kept"
                };
                self.note(id, "info", &format!("halted; {how}"));
            }
            Verb::Switchover => {
                self.engine(id)?.switchover().await?;
                self.note(id, "info", "switchover allowed");
            }
            Verb::Commit => {
                let engine = self.ensure_open(record).await?;
                let moved = self.moved_to_peer(record);
                if let Some((peer, export)) = &moved {
                    self.hand_over_in_cluster(export, peer).await?;
                }
                let message = engine.commit().await?;
                match moved {
                    // The engine stays open: its export keeps serving the
                    // clients connected here, every request going to the
                    // peer that owns the volume now.
                    Some((peer, export)) => {
                        self.tell_peer(id, &peer, PeerCall::Own(&export)).await;
                        if let Err(err) = self.committed_in_cluster(&export).await {
                            self.note(id, "error", &err.line());
                        }
                        self.note(
                            id,
                            "info",
                            &format!(
                                "{message}; {peer} owns export {export}; this node forwards \
                                 the clients connected here to it until the migration is deleted"
                            ),
                        )
                    }
                    None => {
                        self.close(id).await;
                        self.note(id, "info", message);
                    }
                }
            }
            Verb::Rollback => {
                let engine = self.ensure_open(record).await?;
                if let Some((peer, export)) = self.moved_to_peer(record) {
                    self.take_back_in_cluster(&export, &peer).await?;
                }
                engine.rollback().await?;
                self.ensure_driven(record).await?;
                self.note(id, "info", "rolling back");
            }
            Verb::Delete { .. } => {
                self.close(id).await;
                if let Some((peer, export)) = self.moved_to_peer(record) {
                    self.tell_peer(id, &peer, PeerCall::Release(&export)).await;
                }
                if let Err(err) = self.release_in_cluster(record).await {
                    tracing::warn!(migration = id, "{}", err.line());
                }
                if let Err(err) = self.remove_state(record) {
                    tracing::warn!(migration = id, "{}", err.line());
                }
                self.catalog.delete(id)?;
            }
            Verb::Set => {}
        }
        Ok(())
    }

    /// Deletes the engine's copy state (the next start begins from zero).
    fn remove_state(&self, record: &MigrationRecord) -> Result<()> {
        let dir = self.state_dir(record);
        match std::fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                let context = format!("cannot remove {}", dir.display());
                Err(Error::caused(ErrorKind::Failed, context, err))
            }
            _ => Ok(()),
        }
    }

    /// Refuses when destination-only data exists (a rollback is needed to
    /// bring it back to the source first).
    async fn check_source_complete(self: &Arc<Self>, record: &MigrationRecord) -> Result<()> {
        let spec = Spec::parse(record.id, &record.properties)?;
        if !engine::writes_source(&spec) || !self.state_dir(record).exists() {
            return Ok(());
        }
        let only_on_destination = match self.engine(record.id) {
            Ok(engine) => engine.destination_only().await?,
            Err(_) => {
                let engine = self.ensure_open(record).await?;
                let count = engine.destination_only().await;
                self.close(record.id).await;
                count?
            }
        };
        if only_on_destination > 0 {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{only_on_destination} chunks exist only on the destination; \
                     roll back first (dmm rollback {})",
                    record.id
                ),
            ));
        }
        Ok(())
    }

    /// Changes properties; live ones reach a running migration at once.
    pub async fn set(
        self: &Arc<Self>,
        id: MigrationId,
        changes: BTreeMap<String, String>,
    ) -> Result<MigrationRecord> {
        let record = self.catalog.get(id)?;
        Verb::Set
            .rule()
            .check(record.state)
            .map_err(|e| Error::from(e).of(id, "set"))?;
        for (name, value) in &changes {
            properties::check(name, value)?;
            properties::check_applies(name, record.kind)?;
            properties::check_change(name, record.state)?;
        }
        let mut properties = record.properties.clone();
        properties.extend(changes.clone());
        let spec = Spec::parse(id, &properties)?;
        self.catalog.set_properties(id, &changes)?;
        if let Ok(engine) = self.engine(id) {
            engine.apply(&spec);
        }
        let shown: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.note(id, "info", &format!("set {}", shown.join(" ")));
        Ok(self.catalog.get(id)?)
    }

    /// Retries a tree migration's entry in error at `path` now, while its
    /// copy runs (a stopped or failed one retries every entry when
    /// started).
    pub async fn retry(&self, id: MigrationId, path: &str) -> Result<MigrationRecord> {
        let record = self.catalog.get(id)?;
        if !record.state.holds_slot() {
            let line = format!(
                "it is {} (retry is valid while it runs or is paused; \
                 dmm start retries every entry)",
                record.state
            );
            return Err(Error::new(ErrorKind::Conflict, line).of(id, "retry"));
        }
        let engine = self.engine(id).map_err(|e| e.of(id, "retry"))?;
        engine.retry(path).map_err(|e| e.of(id, "retry"))?;
        self.note(id, "info", &format!("retrying {path} now"));
        Ok(record)
    }

    /// A migration's progress, if its engine is open.
    pub async fn progress(&self, id: MigrationId) -> Result<Option<Report>> {
        self.catalog.get(id)?;
        match self.engine(id) {
            Ok(engine) => Ok(Some(engine.snapshot().await.report)),
            Err(_) => Ok(None),
        }
    }

    /// The open engine of a migration.
    fn engine(&self, id: MigrationId) -> Result<Arc<dyn Engine>> {
        self.open
            .lock()
            .get(&id)
            .map(|open| open.engine.clone())
            .ok_or_else(|| Error::new(ErrorKind::Failed, "it has no open engine"))
    }

    /// The engine of a migration, opened (resuming its saved state) and
    /// exported if it was not.
    async fn ensure_open(self: &Arc<Self>, record: &MigrationRecord) -> Result<Arc<dyn Engine>> {
        if let Ok(engine) = self.engine(record.id) {
            return Ok(engine);
        }
        let spec = Spec::parse(record.id, &record.properties)?;
        let engine = engine::open(&spec, &self.state_dir(record), &self.peers).await?;
        let export = match self.claim(engine.export()).await {
            Ok(export) => export,
            Err(err) => {
                let _ = engine.close().await;
                return Err(err);
            }
        };
        if let Some((name, device)) = &export
            && let Err(err) = self
                .exports
                .insert(Export::new(name.clone(), device.clone()))
        {
            let _ = engine.close().await;
            return Err(Error::caused(ErrorKind::Conflict, "cannot export it", err));
        }
        let open = Open {
            engine: engine.clone(),
            export: export.map(|(name, _)| name),
            task: None,
        };
        self.open.lock().insert(record.id, open);
        Ok(engine)
    }

    /// The engine of a migration, open and driven by its task.
    async fn ensure_driven(self: &Arc<Self>, record: &MigrationRecord) -> Result<Arc<dyn Engine>> {
        let engine = self.ensure_open(record).await?;
        let mut open = self.open.lock();
        if let Some(slot) = open.get_mut(&record.id)
            && slot.task.as_ref().is_none_or(|task| task.is_finished())
        {
            let supervisor = self.clone();
            let driven = engine.clone();
            let id = record.id;
            slot.task = Some(tokio::spawn(
                async move { supervisor.drive(id, driven).await },
            ));
        }
        Ok(engine)
    }

    /// Runs the engine to its end, mirroring its progress in the catalog.
    async fn drive(self: Arc<Self>, id: MigrationId, engine: Arc<dyn Engine>) {
        let running = engine.run();
        tokio::pin!(running);
        let mut last = None;
        let mut scheduled = None;
        let outcome = loop {
            tokio::select! {
                outcome = &mut running => break outcome,
                () = tokio::time::sleep(FOLLOW_EVERY) => {
                    self.follow(id, &*engine, &mut last).await;
                    self.follow_schedule(id, &*engine, &mut scheduled);
                }
            }
        };
        self.follow(id, &*engine, &mut last).await;
        match outcome {
            Ok(Ran::Done(message)) => self.note(id, "info", message),
            Ok(Ran::Stopped) => {}
            Err(err) => {
                let line = err.line();
                self.note(id, "error", &line);
                if self
                    .catalog
                    .set_state(id, State::Failed, Some(&line))
                    .is_ok()
                {
                    self.announce(id, State::Failed, Some(line));
                }
            }
        }
    }

    /// Applies the rate of the migration's `schedule` when the timetable
    /// moves to another entry (`applied`: the minute of the day last looked
    /// at and the rate applied then). Entries start on whole minutes and
    /// `set` applies a new timetable at once, so the catalog is read once
    /// a minute, not on every tick.
    fn follow_schedule(
        &self,
        id: MigrationId,
        engine: &dyn Engine,
        applied: &mut Option<(u16, Option<u64>)>,
    ) {
        let minute = crate::schedule::minute_now();
        if applied.is_some_and(|(seen, _)| seen == minute) {
            return;
        }
        let Ok(record) = self.catalog.get(id) else {
            return;
        };
        let Some(schedule) = record.properties.get("schedule") else {
            return;
        };
        let Ok(schedule) = schedule.parse::<Schedule>() else {
            return;
        };
        let rate = schedule.rate_at(minute);
        let before = applied.replace((minute, rate));
        if before.is_some_and(|(_, was)| was == rate) {
            return;
        }
        if let Ok(spec) = Spec::parse(id, &record.properties) {
            engine.apply(&spec);
            if before.is_some() {
                let shown = rate.map_or_else(|| "no limit".to_owned(), |r| format!("{r} B/s"));
                self.note(id, "info", &format!("schedule: rate now {shown}"));
            }
        }
    }

    /// Mirrors the engine's state in the catalog, logs its new per-item
    /// errors, and publishes progress.
    async fn follow(
        self: &Arc<Self>,
        id: MigrationId,
        engine: &dyn Engine,
        last: &mut Option<State>,
    ) {
        let snapshot = engine.snapshot().await;
        for line in engine.take_news(&snapshot.report) {
            self.note(id, "error", &line);
        }
        let _ = self.notices.send(Notice::Progress {
            migration: id,
            progress: snapshot.report,
        });
        let Ok(record) = self.catalog.get(id) else {
            return;
        };
        let state = snapshot.state;
        // A verb in progress owns the state; a failure is final until a
        // verb; an engine being closed keeps the state it had (a paused
        // migration stopped by a shutdown is paused after the restart).
        let closing = engine.controls().stop_requested();
        if record.pending.is_some()
            || record.state == State::Failed
            || closing
            || *last == Some(state)
        {
            return;
        }
        *last = Some(state);
        if record.state != state && self.catalog.set_state(id, state, None).is_ok() {
            if state != State::Running {
                self.note(id, "info", &format!("now {state}"));
            }
            self.announce(id, state, None);
            // Handed over once the switchover is seen (verification may be
            // over before the follow-up looks).
            let handed = matches!(record.state, State::Verifying | State::SwitchedOver);
            if matches!(state, State::Verifying | State::SwitchedOver) && !handed {
                self.start_handoff(id);
            }
        }
    }

    /// Tells the peer a volume moved to it changed hands; a failure is
    /// logged on the migration. True if the peer acknowledged.
    async fn tell_peer(&self, id: MigrationId, peer: &str, call: PeerCall<'_>) -> bool {
        match self.ask_peer(peer, call).await {
            Ok(()) => true,
            Err(line) => {
                self.note(id, "error", &line);
                false
            }
        }
    }

    /// Tells the peer a volume moved to it changed hands; the failure on
    /// one line.
    async fn ask_peer(&self, peer: &str, call: PeerCall<'_>) -> std::result::Result<(), String> {
        let Some(client) = self.peers.client(peer) else {
            return Err(format!("no client certificate to call {peer} with"));
        };
        let (what, outcome) = match call {
            PeerCall::Serve(export) => {
                let nbd = self.peers.nbd.clone().unwrap_or_default();
                ("serve", client.peer_serve(export, &nbd).await)
            }
            PeerCall::Own(export) => ("own", client.peer_own(export).await),
            PeerCall::Release(export) => ("release", client.peer_release(export).await),
        };
        outcome.map_err(|err| format!("{peer} did not {what} the volume: {err}"))
    }

    /// The export name of a volume migration.
    fn export_of(&self, record: &MigrationRecord) -> Option<String> {
        match Spec::parse(record.id, &record.properties) {
            Ok(Spec::Volume(volume)) => Some(volume.export),
            _ => None,
        }
    }

    /// The peer and export of a volume migration whose target is on a
    /// peer (`NODE:/PATH`).
    fn moved_to_peer(&self, record: &MigrationRecord) -> Option<(String, String)> {
        let Ok(Spec::Volume(volume)) = Spec::parse(record.id, &record.properties) else {
            return None;
        };
        let (peer, _) = self.peers.peer_target(&volume.target)?;
        Some((peer.to_owned(), volume.export))
    }

    /// Stops the engine resumably and frees its resources (the export
    /// goes away).
    async fn close(&self, id: MigrationId) {
        let open = self.open.lock().remove(&id);
        let Some(open) = open else {
            return;
        };
        open.engine.controls().request_stop();
        if let Some(task) = open.task {
            let _ = task.await;
        }
        let (bytes, verification) = open.engine.snapshot().await.report.figures();
        let _ = self
            .catalog
            .record_figures(id, bytes, verification.as_deref());
        if let Some(export) = &open.export {
            self.exports.remove(export);
        }
        if let Err(err) = open.engine.close().await {
            self.note(id, "error", &format!("closing the engine: {}", err.line()));
        }
    }

    /// Stops every engine resumably (daemon shutdown). Catalog states stay
    /// as they are, so a restarted daemon resumes them.
    pub async fn shutdown(&self) {
        let ids: Vec<MigrationId> = self.open.lock().keys().copied().collect();
        for id in ids {
            self.close(id).await;
        }
    }
}

/// Appends a line to a migration's `logfile`: created owner-only, never
/// through a symbolic link, and only if it is a regular file (not a device
/// or a FIFO someone put there) that the daemon's user owns and that has
/// no other name (a hard link someone made to a file they could not write
/// themselves). Only the daemon's owner reaches the API socket, and a
/// token holder over TCP administers the daemon: the log goes nowhere its
/// owner could not write, and never where another user steers it.
fn append_line(id: MigrationId, path: &str, line: &str) {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let no_follow = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let owner = rustix::process::geteuid().as_raw();
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(no_follow.bits() as i32)
        .open(path)
        .and_then(|mut file| {
            let meta = file.metadata()?;
            let refused = match () {
                _ if !meta.is_file() => "not a regular file",
                _ if meta.uid() != owner => "owned by another user",
                _ if meta.nlink() != 1 => "it has other names (hard links)",
                _ => return file.write_all(line.as_bytes()),
            };
            Err(std::io::Error::other(refused))
        });
    if let Err(err) = appended {
        tracing::warn!(migration = id, "cannot write the log file {path}: {err}");
    }
}

/// Dies as a power cut or kill -9 would, right after the intent of the
/// verb named in [`CRASH_AFTER_INTENT`] is recorded.
fn crash_if_asked(verb: Verb) {
    if std::env::var(CRASH_AFTER_INTENT).is_ok_and(|named| named == verb.to_string()) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
