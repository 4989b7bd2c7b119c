//! One volume migration, from negotiation to commit or rollback.
//!
//! The phases (seed 000): negotiate (refuse what cannot work, with the
//! reason), restore or create the state, copy under the strategy (bulk
//! pass, incremental passes, final sync), switch over (clients held only
//! for the last few chunks and the flip, and that pause measured), verify
//! (BLAKE3 per chunk, mismatches listed), then commit (the source is
//! released) or roll back (destination-only chunks copied back, so the
//! source is complete and current).
//!
//! [`Migration::run`] drives the phases until the migration is verified or
//! rolled back; [`Migration::commit`] is a separate decision. The copier
//! checkpoints every few seconds, so a restarted migration resumes where
//! it was.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dmm_store::BlockStore;
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;

use crate::chunks::{ChunkMap, ChunkState};
use crate::device::{Run, VirtualDevice};
use crate::error::{Context, ErrorKind, MigrationError, Operation};
use crate::pacing::Pacer;
use crate::persist::{Checkpoint, Meta, Phase, Position, Record, StateDir, StateFiles};
use crate::progress::{Activity, Progress, RateMeter};
use crate::strategy::{Mode, Strategy};
use dmm_control::{Controls, Priority, RateLimiter, ValueError};

/// Largest pause the precopy final copy aims for.
const FINAL_PAUSE_TARGET: Duration = Duration::from_millis(5);

/// What a sweep waits for.
enum Event<T> {
    Done(Option<T>),
    Throttled,
    Checkpointed(Outcome),
}

/// Whether to compare the stores after the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    None,
    #[default]
    Full,
}

impl std::str::FromStr for Verify {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Verify, ValueError> {
        match text {
            "none" => Ok(Verify::None),
            "full" => Ok(Verify::Full),
            _ => Err(ValueError::new(
                "a verification",
                text,
                "choose none or full",
            )),
        }
    }
}

/// How to run a migration.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    pub strategy: Strategy,
    /// Chunk size (`segsize`): the unit of copying, locking and tracking.
    pub chunk_size: u64,
    /// Copy bandwidth limit in bytes per second.
    pub rate: Option<u64>,
    /// Chunks copied at once (before the priority's scaling).
    pub in_flight: usize,
    pub priority: Priority,
    pub verify: Verify,
    /// Time between checkpoints while copying.
    pub checkpoint_every: Duration,
    /// Precopy passes before declaring non-convergence.
    pub max_passes: u32,
}

impl Default for MigrationConfig {
    fn default() -> MigrationConfig {
        MigrationConfig {
            strategy: Strategy::Auto,
            chunk_size: 1 << 20,
            rate: None,
            in_flight: 8,
            priority: Priority::Normal,
            verify: Verify::Full,
            checkpoint_every: Duration::from_secs(2),
            max_passes: 12,
        }
    }
}

/// The first few offsets of a list, for a message.
fn offsets(list: &[u64]) -> String {
    let shown: Vec<String> = list.iter().take(8).map(|o| o.to_string()).collect();
    let more = if list.len() > 8 { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

type Outcome<T = ()> = Result<T, MigrationError>;

/// A migration in progress (or finished, still serving).
pub struct Migration {
    meta: Meta,
    config: MigrationConfig,
    state: StateDir,
    device: Arc<VirtualDevice>,
    position: Arc<Mutex<Position>>,
    controls: Controls,
    activity: Mutex<Activity>,
    error: Mutex<Option<String>>,
    meter: Mutex<RateMeter>,
    limiter: Mutex<RateLimiter>,
    longest_pause_us: AtomicU64,
    verified_chunks: Arc<AtomicU64>,
    last_checkpoint: Mutex<Instant>,
    checkpointing: tokio::sync::Mutex<()>,
    started: Instant,
}

/// Refuses migrations that cannot work, each with its reason. Also used to
/// check a request before anything is recorded.
pub fn negotiate(
    source: &dyn BlockStore,
    destination: &dyn BlockStore,
    config: &MigrationConfig,
) -> Outcome {
    let refuse = |reason: String| {
        Err(MigrationError::new(ErrorKind::Refused, Operation::Negotiate).with_detail(reason))
    };
    if destination.size() < source.size() {
        return refuse(format!(
            "the destination {} holds {} bytes, less than the source {} ({} bytes)",
            destination.target(),
            destination.size(),
            source.target(),
            source.size()
        ));
    }
    if destination.capabilities().read_only {
        return refuse(format!(
            "the destination {} is read-only",
            destination.target()
        ));
    }
    if source.capabilities().read_only && config.strategy != Strategy::Redirect {
        return refuse(format!(
            "the source {} is read-only; only --strategy redirect never writes to the source",
            source.target()
        ));
    }
    if let (Some(a), Some(b)) = (source.identity(), destination.identity())
        && a == b
    {
        return refuse(format!(
            "{} and {} are the same file or device",
            source.target(),
            destination.target()
        ));
    }
    let chunk = config.chunk_size;
    if !chunk.is_power_of_two() || !(4096..=1 << 30).contains(&chunk) {
        return refuse(format!(
            "segsize {chunk} must be a power of two from 4 KiB to 1 GiB"
        ));
    }
    let block = u64::from(destination.capabilities().preferred_block_size);
    if block > chunk {
        return refuse(format!(
            "the destination's block size ({block} bytes) is larger than segsize ({chunk})"
        ));
    }
    Ok(())
}

/// The routing mode a phase implies.
fn mode_of(phase: Phase, copy_mode: Mode) -> Mode {
    match phase {
        Phase::Copying => copy_mode,
        Phase::SwitchedOver | Phase::Verified => Mode::Destination { tracking: true },
        Phase::Committed => Mode::Destination { tracking: false },
        Phase::RollingBack => Mode::RollingBack,
        Phase::RolledBack => Mode::Source,
    }
}

impl Migration {
    /// Negotiates and restores (or creates) the migration's state in
    /// `state_dir`. `names` identify source and destination for the
    /// record in the state directory.
    pub async fn open(
        source: Arc<dyn BlockStore>,
        destination: Arc<dyn BlockStore>,
        names: (String, String),
        state_dir: &Path,
        config: MigrationConfig,
    ) -> Outcome<Migration> {
        negotiate(&*source, &*destination, &config)?;
        let state = StateDir::open(state_dir)?;
        Migration::open_with(source, destination, names, state, config).await
    }

    /// [`Migration::open`] with the state in `files`: crash tests give it
    /// files that can lose power ([`CrashFiles`](crate::CrashFiles)).
    pub async fn open_on(
        source: Arc<dyn BlockStore>,
        destination: Arc<dyn BlockStore>,
        names: (String, String),
        files: Arc<dyn StateFiles>,
        config: MigrationConfig,
    ) -> Outcome<Migration> {
        negotiate(&*source, &*destination, &config)?;
        let state = StateDir::on(files);
        Migration::open_with(source, destination, names, state, config).await
    }

    async fn open_with(
        source: Arc<dyn BlockStore>,
        destination: Arc<dyn BlockStore>,
        names: (String, String),
        state: StateDir,
        config: MigrationConfig,
    ) -> Outcome<Migration> {
        let wanted = Meta {
            source: names.0,
            destination: names.1,
            volume_size: source.size(),
            chunk_size: config.chunk_size,
            strategy: config.strategy,
        };
        let meta = match state.load_meta()? {
            Some(saved) => check_resume(&saved, &wanted, state.location())?,
            None => {
                state.save_meta(&wanted)?;
                wanted
            }
        };
        let chunks = Arc::new(ChunkMap::new(meta.volume_size, meta.chunk_size));
        let boot = boot_id();
        let mut position = match state.load_checkpoint()? {
            Some(checkpoint) => {
                chunks.load_bitmaps(&checkpoint.both, &checkpoint.destination);
                let mut position = checkpoint.position;
                position.reconcile |= may_have_drifted(&position, &boot, &*source, &*destination)
                    || may_be_split(&position);
                position
            }
            None => Position {
                generation: 0,
                phase: Phase::Copying,
                mode: meta.strategy.initial_mode(),
                pass: 0,
                cursor: 0,
                copied_bytes: 0,
                mismatches: Vec::new(),
                boot: None,
                reconcile: false,
            },
        };
        position.boot = boot;
        for record in state.replay(position.generation)? {
            match record {
                Record::Chunk { chunk, state } if chunk < chunks.len() => {
                    chunks.set(chunk, state);
                }
                Record::Chunk { .. } => {}
                Record::Phase(phase) => position.phase = phase,
            }
        }
        let journal = state.journal(position.generation)?;
        let mode = mode_of(position.phase, position.mode);
        let device = Arc::new(VirtualDevice::new(
            source,
            destination,
            chunks,
            mode,
            journal,
        ));
        let controls = Controls::new(config.rate, config.in_flight, config.priority);
        Ok(Migration {
            meta,
            config,
            state,
            device,
            position: Arc::new(Mutex::new(position)),
            controls,
            activity: Mutex::new(Activity::Starting),
            error: Mutex::new(None),
            meter: Mutex::new(RateMeter::default()),
            limiter: Mutex::new(RateLimiter::default()),
            longest_pause_us: AtomicU64::new(0),
            verified_chunks: Arc::new(AtomicU64::new(0)),
            last_checkpoint: Mutex::new(Instant::now()),
            checkpointing: tokio::sync::Mutex::new(()),
            started: Instant::now(),
        })
    }

    /// Says the migration waits for its destination to come back (why:
    /// `reason`) until [`Migration::run`] runs it again.
    pub fn wait_for_destination(&self, reason: String) {
        self.set_activity(Activity::WaitingForDestination);
        *self.error.lock() = Some(reason);
    }

    /// Verification asks `remote` for the destination's digests (a store
    /// on another node hashed there) instead of reading it back.
    pub fn hash_destination_with(&self, remote: Arc<dyn crate::RemoteDigests>) {
        self.device.hash_destination_with(remote);
    }

    /// The volume to export to clients.
    pub fn device(&self) -> Arc<VirtualDevice> {
        self.device.clone()
    }

    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    pub fn phase(&self) -> Phase {
        self.position.lock().phase
    }

    /// What the migration is doing now, as last set (without the
    /// adjustments [`Migration::progress`] makes for a pause).
    pub fn activity(&self) -> Activity {
        *self.activity.lock()
    }

    /// How many chunks only the destination holds: what a rollback would
    /// have to copy back before the source is the volume again.
    pub fn destination_only_chunks(&self) -> u64 {
        self.device.chunks().count(ChunkState::Destination)
    }

    /// Waits a while for the admin to allow the switchover.
    async fn wait_for_switchover(&self) -> Outcome {
        self.set_activity(Activity::WaitingForSwitchover);
        self.controls
            .wait_switchover(Duration::from_millis(500))
            .await;
        match self.interruption() {
            Some(kind) => Err(MigrationError::new(kind, Operation::SwitchOver)),
            None => Ok(()),
        }
    }

    /// The error kind a pending stop or rollback request ends a step with.
    fn interruption(&self) -> Option<ErrorKind> {
        if self.controls.stop_requested() {
            Some(ErrorKind::Stopped)
        } else if self.controls.rollback_requested() {
            Some(ErrorKind::Interrupted)
        } else {
            None
        }
    }

    /// Journals a phase change and makes it durable.
    async fn record_phase(&self, phase: Phase, operation: Operation) -> Outcome {
        let ledger = self.device.ledger();
        ledger.record_phase(phase)?;
        let synced = ledger.sync_journal().await;
        synced.map_err(|err| self.ledger_failure(err, operation))
    }

    /// The error of a ledger step: the state error if the ledger froze
    /// (the journal failed), else the store's.
    fn ledger_failure(&self, err: dmm_store::Error, operation: Operation) -> MigrationError {
        let store = MigrationError::new(ErrorKind::Store, operation).with_source(err);
        self.device.ledger().frozen_error().unwrap_or(store)
    }

    fn set_activity(&self, activity: Activity) {
        *self.activity.lock() = activity;
    }

    /// Drives the migration until it is verified (ready to commit) or
    /// rolled back. Errors leave the state resumable and clients served
    /// wherever the data is complete.
    pub async fn run(&self) -> Outcome<Phase> {
        *self.error.lock() = None;
        // A destination failure of an earlier run was that run's to report.
        self.device.ledger().take_destination_failure();
        let result = self.drive().await;
        match &result {
            Ok(_) => self.set_activity(Activity::Idle),
            Err(err) if err.kind() == ErrorKind::Stopped => self.set_activity(Activity::Idle),
            Err(err) => {
                self.set_activity(Activity::Failed);
                *self.error.lock() = Some(err.report());
                self.fall_back().await;
                // Keep whatever progress was made.
                let _ = self.checkpoint().await;
            }
        }
        result
    }

    async fn drive(&self) -> Outcome<Phase> {
        if self.device.ledger().is_frozen() {
            // The state directory failed in an earlier run: a checkpoint
            // records what the journal could not, and thaws the ledger.
            self.checkpoint().await?;
        }
        self.reconcile().await?;
        loop {
            let phase = self.phase();
            tracing::debug!(?phase, "step");
            if self.controls.take_rollback_request()
                && matches!(
                    phase,
                    Phase::Copying | Phase::SwitchedOver | Phase::Verified
                )
            {
                self.begin_rollback().await?;
                continue;
            }
            if self.controls.stop_requested() {
                return Err(MigrationError::new(ErrorKind::Stopped, Operation::Run));
            }
            let step = match phase {
                Phase::Copying => self.copy_phase().await,
                Phase::SwitchedOver => self.verify_phase().await,
                Phase::RollingBack => self.rollback_phase().await,
                Phase::Verified | Phase::Committed | Phase::RolledBack => return Ok(phase),
            };
            match step {
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                other => other?,
            }
        }
    }

    /// After a crash that may have lost what the stores had not flushed,
    /// a chunk recorded in both stores can differ between them: a client
    /// write reached one and not the other, or reached one while its
    /// journal record was lost. Reads of such a chunk go to one side (the
    /// mode's), and must stay there: this compares every chunk held by
    /// both and hands each that differs to the side reads come from, before
    /// anything flips routing or verifies. Clients are served meanwhile.
    async fn reconcile(&self) -> Outcome {
        if !self.position.lock().reconcile {
            return Ok(());
        }
        if !matches!(self.phase(), Phase::Committed | Phase::RolledBack) {
            self.set_activity(Activity::Reconciling);
            let handed = self.compare_both().await?;
            tracing::info!(
                handed,
                "compared the chunks both stores hold after a crash; \
                 those that differ now live on one side"
            );
        }
        self.position.lock().reconcile = false;
        self.checkpoint().await
    }

    /// Compares every `Both` chunk, a few at once; returns how many
    /// differed and were handed to one side.
    async fn compare_both(&self) -> Outcome<u64> {
        let chunks = self.device.chunks().clone();
        let mut running = FuturesUnordered::new();
        let (mut next, mut runs_from, mut handed) = (0, 0, 0);
        loop {
            while running.len() < self.controls.copies_in_flight()
                && !self.controls.stop_requested()
            {
                let Some(chunk) = chunks.next_in(ChunkState::Both, next) else {
                    break;
                };
                let bytes = chunks.bytes(chunk);
                if chunk >= runs_from {
                    let run = self.device.verify_zero_run(chunk).await;
                    match run.during_chunk(Operation::Reconcile, bytes)? {
                        Run::Done(count) => {
                            next = chunk + count;
                            continue;
                        }
                        Run::Data { until } => runs_from = until,
                    }
                }
                next = chunk + 1;
                let device = self.device.clone();
                running.push(tokio::spawn(async move {
                    let result = device.reconcile_chunk(chunk).await;
                    result.during_chunk(Operation::Reconcile, bytes)
                }));
            }
            match running.next().await {
                Some(joined) => {
                    let differed = joined.map_err(|e| {
                        MigrationError::new(ErrorKind::Internal, Operation::Reconcile)
                            .with_detail(e.to_string())
                    })??;
                    handed += u64::from(differed);
                }
                None if self.controls.stop_requested() => {
                    return Err(MigrationError::new(
                        ErrorKind::Stopped,
                        Operation::Reconcile,
                    ));
                }
                None => return Ok(handed),
            }
        }
    }

    /// After a failure, keep clients on a store that has all their data.
    async fn fall_back(&self) {
        let mut mode = self.device.pause_clients().await;
        if matches!(*mode, Mode::Mirror | Mode::AsyncMirror) {
            // The source is complete; stop sending writes to a failing
            // destination, but keep tracking what they dirty.
            *mode = Mode::TrackDirty;
            self.position.lock().mode = Mode::TrackDirty;
        }
        drop(mode);
        self.device.detach_aio();
    }

    async fn copy_phase(&self) -> Outcome {
        // A failure may have left a mirroring strategy tracking only.
        let expected = match self.meta.strategy {
            Strategy::Mirror => Some(Mode::Mirror),
            Strategy::Aio => Some(Mode::AsyncMirror),
            _ => None,
        };
        if let Some(expected) = expected
            && self.position.lock().mode != expected
        {
            self.set_mode(expected).await?;
        }
        match self.meta.strategy {
            Strategy::Precopy | Strategy::Auto => self.precopy().await,
            Strategy::Slr => {
                if self.position.lock().mode == Mode::TrackDirty {
                    self.pass().await?;
                    self.set_mode(Mode::Mirror).await?;
                }
                self.pass().await?;
                self.switch_over().await
            }
            Strategy::Aio => {
                let queue = self.device.start_aio();
                self.pass().await?;
                queue.drained().await;
                self.pass().await?;
                self.switch_over().await
            }
            Strategy::Mirror | Strategy::Lr | Strategy::Redirect => {
                self.pass().await?;
                self.switch_over().await
            }
        }
    }

    /// Precopy: passes over the dirty set until it is small enough for a
    /// pause of a few milliseconds. Auto escalates to mirroring as soon as
    /// a pass fails to halve the dirty set; plain precopy gives up once it
    /// stops shrinking (or after `max_passes`).
    async fn precopy(&self) -> Outcome {
        let mut history: Vec<u64> = Vec::new();
        loop {
            if self.position.lock().mode == Mode::Mirror {
                self.pass().await?;
                return self.switch_over().await;
            }
            self.pass().await?;
            let dirty = self.device.chunks().count(ChunkState::Source);
            let per_chunk = Duration::from_secs_f64(
                self.meta.chunk_size as f64 / self.meter.lock().rate().max(1 << 20) as f64,
            );
            let affordable = (FINAL_PAUSE_TARGET.as_secs_f64() / per_chunk.as_secs_f64()) as u64;
            if dirty <= affordable.max(1) {
                // With a manual switchover, keep the dirty set small while
                // waiting for it.
                while !self.controls.switchover_allowed() {
                    self.wait_for_switchover().await?;
                    self.pass().await?;
                }
                return self.switch_over().await;
            }
            // Auto does not wait for a pass that leaves more than half of
            // the previous dirty set: the writes are outrunning the copy.
            let outrun = self.meta.strategy == Strategy::Auto
                && history.last().is_some_and(|&previous| dirty * 2 > previous);
            history.push(dirty);
            let passes = self.position.lock().pass;
            let shrinking = match history.len() {
                0..=2 => true,
                n => (dirty as f64) < 0.9 * history[n - 3] as f64,
            };
            if shrinking && !outrun && passes < self.config.max_passes {
                continue;
            }
            if self.meta.strategy == Strategy::Auto {
                tracing::info!(
                    dirty,
                    passes,
                    "dirty set stopped shrinking; escalating to mirror"
                );
                self.set_mode(Mode::Mirror).await?;
            } else {
                let kind = ErrorKind::NotConverging { passes, dirty };
                return Err(MigrationError::new(kind, Operation::Copy));
            }
        }
    }

    /// Changes the routing mode of the copy phase (clients held for the
    /// flip), and checkpoints it.
    async fn set_mode(&self, next: Mode) -> Outcome {
        tracing::debug!(?next, "set mode");
        let mut mode = self.device.pause_clients().await;
        *mode = next;
        self.position.lock().mode = next;
        drop(mode);
        self.checkpoint().await
    }

    /// One copy pass over the chunks still only on the source.
    async fn pass(&self) -> Outcome {
        self.set_activity(Activity::Copying);
        let device = self.device.clone();
        let copied = self
            .sweep(ChunkState::Source, |chunk| {
                let device = device.clone();
                async move { copy_chunk(&device, chunk, ChunkState::Source, Operation::Copy).await }
            })
            .await?;
        let mut position = self.position.lock();
        position.pass += 1;
        position.cursor = 0;
        tracing::debug!(pass = position.pass, copied, "pass done");
        Ok(())
    }

    /// Runs `work` on every chunk in `state` (as of when the sweep reaches
    /// it), ascending from the saved cursor, with up to the configured
    /// number in flight, honouring pause, rate limit and priority, yielding
    /// to busy clients (`pacing.rs`), checkpointing as it goes. Returns the
    /// bytes the work reported.
    ///
    /// Each chunk's work is its own task: a chunk lock is never held across
    /// the sweep's own waits (rate limit, pacing, checkpoint), and CPU-heavy
    /// work spreads over the runtime's threads.
    async fn sweep<F, Fut>(&self, state: ChunkState, work: F) -> Outcome<u64>
    where
        F: Fn(u64) -> Fut,
        Fut: std::future::Future<Output = Result<u64, MigrationError>> + Send + 'static,
    {
        let chunks = self.device.chunks().clone();
        let mut next = self.position.lock().cursor;
        let mut running = FuturesUnordered::new();
        let mut active = BTreeSet::new();
        let mut total = 0;
        let mut failure = None;
        let mut resume_at = tokio::time::Instant::now();
        let mut pacer = Pacer::default();
        // No chunk before this one can start a run of zeroes.
        let mut runs_from = 0;
        // A checkpoint runs alongside the copies, never in their way.
        let mut checkpointing: Option<Pin<Box<dyn Future<Output = Outcome> + Send + '_>>> = None;
        loop {
            // A stop or rollback request ends the wait for bandwidth: the
            // chunks not started yet stay to be copied, resumably.
            let throttled = !self.controls.interrupted() && tokio::time::Instant::now() < resume_at;
            let window = pacer.window(
                self.device.clients().busy(),
                self.controls.priority(),
                self.controls.copies_in_flight(),
            );
            while failure.is_none() && !throttled && running.len() < window {
                if self.controls.is_paused() && running.is_empty() {
                    self.set_activity(Activity::Paused);
                    self.controls.wait_unpaused().await;
                    self.set_activity(Activity::Copying);
                }
                if self.controls.interrupted() || self.controls.is_paused() {
                    break;
                }
                let Some(chunk) = chunks.next_in(state, next) else {
                    break;
                };
                if chunk >= runs_from {
                    let run = self.zero_run(state, chunk).await;
                    match run.during_chunk(sweep_operation(state), chunks.bytes(chunk)) {
                        Ok(Run::Done(count)) => {
                            next = chunk + count;
                            continue;
                        }
                        Ok(Run::Data { until }) => runs_from = until,
                        Err(err) => {
                            failure.get_or_insert(err);
                            break;
                        }
                    }
                }
                next = chunk + 1;
                active.insert(chunk);
                let job = tokio::spawn(work(chunk));
                let started = Instant::now();
                running.push(async move { (chunk, started, job.await) });
            }
            if running.is_empty() && !throttled && checkpointing.is_none() {
                break;
            }
            let event = tokio::select! {
                done = running.next(), if !running.is_empty() => Event::Done(done),
                () = tokio::time::sleep_until(resume_at), if throttled => Event::Throttled,
                () = self.controls.until_interrupted(), if throttled => Event::Throttled,
                saved = async { checkpointing.as_mut().expect("checked").await },
                    if checkpointing.is_some() => Event::Checkpointed(saved),
            };
            let (chunk, started, result) = match event {
                Event::Done(Some(done)) => done,
                Event::Done(None) | Event::Throttled => continue,
                Event::Checkpointed(saved) => {
                    checkpointing = None;
                    if let Err(err) = saved {
                        failure.get_or_insert(err);
                    }
                    continue;
                }
            };
            active.remove(&chunk);
            match result {
                Ok(Ok(bytes)) => {
                    total += bytes;
                    let busy = self.device.clients().busy();
                    let pace = pacer.ended(busy, self.controls.priority(), started.elapsed());
                    let wait = self.account(bytes).max(pace);
                    resume_at = tokio::time::Instant::now() + wait;
                }
                Ok(Err(err)) => {
                    failure.get_or_insert(err);
                }
                Err(panicked) => {
                    let (offset, len) = chunks.bytes(chunk);
                    let err = MigrationError::new(ErrorKind::Internal, sweep_operation(state))
                        .at(offset, len)
                        .with_detail("a copy task failed")
                        .with_source(panicked);
                    failure.get_or_insert(err);
                }
            }
            if failure.is_none() {
                failure = self.device.ledger().frozen_error();
            }
            self.position.lock().cursor = active.first().copied().unwrap_or(next);
            let due = self.last_checkpoint.lock().elapsed() >= self.config.checkpoint_every;
            if failure.is_none() && due && checkpointing.is_none() {
                checkpointing = Some(Box::pin(self.checkpoint()));
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if let Some(err) = self.device.ledger().take_destination_failure() {
            return Err(err).during(Operation::Mirror);
        }
        if let Some(kind) = self.interruption() {
            self.checkpoint().await?;
            return Err(MigrationError::new(kind, sweep_operation(state)));
        }
        Ok(total)
    }

    /// Handles the run of zeroes that starts at `chunk`, if one does: a
    /// copy moves it without data, a verification counts it as equal.
    async fn zero_run(&self, state: ChunkState, chunk: u64) -> dmm_store::Result<Run> {
        match state {
            ChunkState::Both => {
                let run = self.device.verify_zero_run(chunk).await?;
                if let Run::Done(count) = run {
                    self.verified_chunks.fetch_add(count, Ordering::Relaxed);
                }
                Ok(run)
            }
            from => self.device.copy_zero_run(chunk, from).await,
        }
    }

    /// Counts copied bytes; returns how long to wait before the next copy
    /// to stay within the bandwidth limit.
    fn account(&self, bytes: u64) -> Duration {
        self.position.lock().copied_bytes += bytes;
        self.meter.lock().record(bytes);
        self.limiter.lock().spend(bytes, self.controls.rate())
    }

    /// Snapshots the chunk states, flushes both stores, then saves the
    /// snapshot: a copy is durable before the checkpoint that records it.
    pub async fn checkpoint(&self) -> Outcome {
        let _one_at_a_time = self.checkpointing.lock().await;
        let ledger = self.device.ledger();
        let generation = ledger.generation() + 1;
        let journal = self.state.journal(generation)?;
        let (both, destination) = ledger.begin_checkpoint(journal);
        let position = {
            let mut position = self.position.lock();
            position.generation = generation;
            position.clone()
        };
        // The copies the snapshot relies on become durable.
        ledger
            .settle_checkpoint()
            .await
            .map_err(|err| self.ledger_failure(err, Operation::Checkpoint))?;
        let checkpoint = Checkpoint {
            position,
            both,
            destination,
        };
        self.state.save_checkpoint(&checkpoint)?;
        ledger.retire_previous_journal();
        self.state.prune_journals(generation)?;
        *self.last_checkpoint.lock() = Instant::now();
        Ok(())
    }

    /// Holds clients, copies what is still only on the source, makes the
    /// destination durable, records the switch, and flips routing to the
    /// destination. The time clients are held is measured.
    ///
    /// The flip itself is not made durable inside the pause: every client
    /// write after it records its chunk's new state by the usual rules, and
    /// those alone route reads right after a crash. The checkpoint that
    /// follows records the new phase, once the copies it relies on are
    /// flushed.
    async fn switch_over(&self) -> Outcome {
        while !self.controls.switchover_allowed() {
            self.wait_for_switchover().await?;
        }
        tracing::debug!("switchover starts");
        self.set_activity(Activity::Switching);
        if let Some(queue) = self.device.aio_attached() {
            // Empty the queue while clients still run; the pause only waits
            // for what they add meanwhile.
            queue.drained().await;
        }
        let started = Instant::now();
        let mut mode = self.device.pause_clients().await;
        if let Some(queue) = self.device.aio_attached() {
            queue.drained().await;
        }
        let chunks = self.device.chunks().clone();
        let mut copies = FuturesUnordered::new();
        let mut next = 0;
        loop {
            while copies.len() < self.controls.copies_in_flight() {
                let Some(chunk) = chunks.next_in(ChunkState::Source, next) else {
                    break;
                };
                next = chunk + 1;
                copies.push(copy_chunk(
                    &self.device,
                    chunk,
                    ChunkState::Source,
                    Operation::SwitchOver,
                ));
            }
            match copies.next().await {
                Some(copied) => {
                    self.position.lock().copied_bytes += copied?;
                }
                None => break,
            }
        }
        drop(copies);
        *mode = Mode::Destination { tracking: true };
        drop(mode);
        let paused = started.elapsed();
        self.longest_pause_us
            .fetch_max(paused.as_micros() as u64, Ordering::Relaxed);
        tracing::info!(pause_ms = paused.as_secs_f64() * 1e3, "switched over");
        self.device.detach_aio();
        self.position.lock().phase = Phase::SwitchedOver;
        self.checkpoint().await
    }

    /// Compares every chunk held by both stores (BLAKE3 per chunk).
    async fn verify_phase(&self) -> Outcome {
        if self.config.verify == Verify::Full {
            self.set_activity(Activity::Verifying);
            let device = self.device.clone();
            self.sweep(ChunkState::Both, |chunk| {
                let device = device.clone();
                let (verified, position) = (self.verified_chunks.clone(), self.position.clone());
                async move {
                    let bytes = device.chunks().bytes(chunk);
                    let same = device.verify_chunk(chunk).await;
                    if same.during_chunk(Operation::Verify, bytes)? == Some(false) {
                        position.lock().mismatches.push(bytes.0);
                    }
                    verified.fetch_add(1, Ordering::Relaxed);
                    Ok(0)
                }
            })
            .await?;
            let found = {
                let mut position = self.position.lock();
                position.cursor = 0;
                position.mismatches.sort_unstable();
                position.mismatches.clone()
            };
            if !found.is_empty() {
                self.checkpoint().await?;
                let detail = format!("{} chunks, at offsets {}", found.len(), offsets(&found));
                return Err(
                    MigrationError::new(ErrorKind::Mismatch, Operation::Verify).with_detail(detail)
                );
            }
        }
        self.position.lock().phase = Phase::Verified;
        self.checkpoint().await
    }

    /// Releases the source: the destination is the volume from now on.
    pub async fn commit(&self) -> Outcome {
        let (phase, mismatches) = {
            let position = self.position.lock();
            (position.phase, position.mismatches.len())
        };
        let ready = phase == Phase::Verified
            || (phase == Phase::SwitchedOver && self.config.verify == Verify::None);
        if phase == Phase::Committed {
            return Ok(());
        }
        if !ready || mismatches > 0 {
            let why = match mismatches {
                0 => "the destination does not hold the whole volume yet".to_owned(),
                _ => format!("{mismatches} chunks failed verification"),
            };
            let phase = serde_json::to_string(&phase).unwrap_or_default();
            let detail = format!("the migration is {}: {why}", phase.trim_matches('"'));
            return Err(
                MigrationError::new(ErrorKind::InvalidState, Operation::Commit).with_detail(detail),
            );
        }
        let mut mode = self.device.pause_clients().await;
        self.record_phase(Phase::Committed, Operation::Commit)
            .await?;
        *mode = Mode::Destination { tracking: false };
        drop(mode);
        self.position.lock().phase = Phase::Committed;
        self.checkpoint().await
    }

    /// Asks the migration to roll back; [`Migration::run`] does it.
    pub fn request_rollback(&self) -> Outcome {
        if self.phase() == Phase::Committed {
            let detail = "the migration is committed: the source has been released";
            return Err(
                MigrationError::new(ErrorKind::InvalidState, Operation::Rollback)
                    .with_detail(detail),
            );
        }
        self.controls.request_rollback();
        Ok(())
    }

    async fn begin_rollback(&self) -> Outcome {
        let mut mode = self.device.pause_clients().await;
        if let Some(queue) = self.device.aio_attached() {
            queue.drained().await;
        }
        self.record_phase(Phase::RollingBack, Operation::Rollback)
            .await?;
        *mode = Mode::RollingBack;
        drop(mode);
        self.device.detach_aio();
        {
            let mut position = self.position.lock();
            position.phase = Phase::RollingBack;
            position.cursor = 0;
        }
        self.checkpoint().await
    }

    /// Copies destination-only chunks back, then hands the volume to the
    /// source.
    async fn rollback_phase(&self) -> Outcome {
        self.set_activity(Activity::RollingBack);
        let device = self.device.clone();
        self.sweep(ChunkState::Destination, |chunk| {
            let device = device.clone();
            async move {
                copy_chunk(&device, chunk, ChunkState::Destination, Operation::CopyBack).await
            }
        })
        .await?;
        let mut mode = self.device.pause_clients().await;
        let chunks = self.device.chunks().clone();
        while let Some(chunk) = chunks.next_in(ChunkState::Destination, 0) {
            copy_chunk(
                &self.device,
                chunk,
                ChunkState::Destination,
                Operation::CopyBack,
            )
            .await?;
        }
        // The copies back, and the states they leave, are durable before
        // the phase says the source holds the volume: a crash right after
        // the record must not resume with chunks still routed to the
        // destination while the source is the volume.
        self.checkpoint().await?;
        self.record_phase(Phase::RolledBack, Operation::Rollback)
            .await?;
        *mode = Mode::Source;
        drop(mode);
        self.position.lock().phase = Phase::RolledBack;
        self.checkpoint().await
    }

    /// A snapshot of where the migration stands.
    pub async fn progress(&self) -> Progress {
        let mode = self.device.shown_mode();
        let chunks = self.device.chunks();
        let position = self.position.lock().clone();
        let on_destination = chunks.len() - chunks.count(ChunkState::Source);
        let dirty = if position.pass > 0 {
            chunks.count(ChunkState::Source)
        } else {
            (0..position.cursor.min(chunks.len()))
                .filter(|&c| chunks.get(c) == ChunkState::Source)
                .count() as u64
        };
        let rate = self.meter.lock().rate();
        let remaining = chunks.count(ChunkState::Source) * chunks.chunk_size();
        let stats = self.device.stats();
        let mut activity = *self.activity.lock();
        if activity == Activity::Copying && self.controls.is_paused() {
            activity = Activity::Paused;
        }
        Progress {
            phase: position.phase,
            activity,
            strategy: self.meta.strategy,
            mode: mode.to_string(),
            pass: position.pass,
            volume_bytes: chunks.volume_size(),
            chunk_bytes: chunks.chunk_size(),
            chunks: chunks.len(),
            chunks_on_destination: on_destination,
            dirty_chunks: dirty,
            copied_bytes: position.copied_bytes,
            client_destination_bytes: stats.destination_bytes.load(Ordering::Relaxed),
            bytes_per_second: rate,
            eta_seconds: (rate > 0 && position.phase == Phase::Copying).then(|| remaining / rate),
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
            longest_pause_ms: self.longest_pause_us.load(Ordering::Relaxed) as f64 / 1e3,
            client_reads: stats.reads.load(Ordering::Relaxed),
            client_writes: stats.writes.load(Ordering::Relaxed),
            verified_chunks: self.verified_chunks.load(Ordering::Relaxed),
            mismatches: position.mismatches,
            error: self.error.lock().clone(),
        }
    }
}

/// Copies one chunk from `from` to both stores; the data bytes written.
async fn copy_chunk(
    device: &VirtualDevice,
    chunk: u64,
    from: ChunkState,
    operation: Operation,
) -> Outcome<u64> {
    let copied = device.copy_chunk(chunk, from, ChunkState::Both).await;
    let copied = copied.during_chunk(operation, device.chunks().bytes(chunk))?;
    Ok(copied.map_or(0, |c| c.data))
}

/// What a sweep over chunks in `state` does.
fn sweep_operation(state: ChunkState) -> Operation {
    match state {
        ChunkState::Source => Operation::Copy,
        ChunkState::Both => Operation::Verify,
        ChunkState::Destination => Operation::CopyBack,
    }
}

/// Resuming is only allowed with the same volume and strategy.
/// This machine's boot, if the kernel says.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned())
}

/// Whether the stores may have lost writes the other kept since the last
/// checkpoint: the machine went down (another boot, so the page cache was
/// lost), or a store is not a local file (a remote one can restart on its
/// own). A process that died on the same boot lost nothing its files got.
fn may_have_drifted(
    saved: &Position,
    boot: &Option<String>,
    source: &dyn BlockStore,
    destination: &dyn BlockStore,
) -> bool {
    let local = source.local_file().is_some() && destination.local_file().is_some();
    !local || boot.is_none() || saved.boot != *boot
}

/// Whether a write may have reached one store and not the other when the
/// process died: in mirroring mode a client write to a chunk both stores
/// hold goes to both at once, and a kill -9 between the two leaves them
/// apart (the write was never acknowledged, but reads must keep returning
/// what they returned).
fn may_be_split(saved: &Position) -> bool {
    saved.mode == Mode::Mirror
}

fn check_resume(saved: &Meta, wanted: &Meta, dir: &Path) -> Outcome<Meta> {
    let mismatch = |what: &str, saved: String, wanted: String| {
        let detail = format!(
            "it holds a migration with {what} {saved}, not {wanted}; \
             resume it with the same settings or use another --state-dir"
        );
        Err(MigrationError::new(ErrorKind::Refused, Operation::Resume)
            .on(dir.display().to_string())
            .with_detail(detail))
    };
    if saved.source != wanted.source || saved.destination != wanted.destination {
        let pair = |m: &Meta| format!("{} -> {}", m.source, m.destination);
        return mismatch("stores", pair(saved), pair(wanted));
    }
    if saved.volume_size != wanted.volume_size {
        let (a, b) = (
            saved.volume_size.to_string(),
            wanted.volume_size.to_string(),
        );
        return mismatch("volume size", a, b);
    }
    if saved.strategy != wanted.strategy {
        let (a, b) = (saved.strategy.to_string(), wanted.strategy.to_string());
        return mismatch("strategy", a, b);
    }
    Ok(saved.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmm_store::MemoryStore;

    /// The daemon drives a migration and reports on it from one task: a
    /// report that queued behind a switch holding clients would never let
    /// that task drive the switch again.
    #[tokio::test]
    async fn a_report_never_waits_for_clients_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = || Arc::new(MemoryStore::new(1 << 20)) as Arc<dyn BlockStore>;
        let names = ("source".to_owned(), "destination".to_owned());
        let config = MigrationConfig {
            chunk_size: 64 << 10,
            ..MigrationConfig::default()
        };
        let migration = Migration::open(store(), store(), names, dir.path(), config)
            .await
            .unwrap();
        let held = migration.device.pause_clients().await;
        let report = tokio::time::timeout(Duration::from_secs(2), migration.progress()).await;
        assert_eq!(
            report.expect("a report while clients are held").phase,
            Phase::Copying
        );
        drop(held);
    }
}
