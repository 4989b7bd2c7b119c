//! Power cuts during volume migrations.
//!
//! Every strategy runs with clients writing (with and without FUA),
//! zeroing, discarding and flushing through the virtual device, on stores
//! and state files that lose power (`CrashStore` and `CrashFiles` on one
//! `Power` rail). While it runs (copy, switchover, verification, rollback,
//! commit), power is cut again and again: each cut stops every device at
//! one instant and keeps what a power failure then would leave, the last
//! unsynced write sometimes torn. Every kept cut is then reopened:
//!
//! - the device keeps the crash contract: each byte reads as its last
//!   durable value (FUA or flushed) or as the value of a later write;
//! - the migration resumes from its durable state and finishes: verified
//!   (no chunk recorded as copied differs) and committed, or rolled back;
//!   the store that ends up holding the volume equals the model.
//!
//! `DMM_POWER_CUTS` sets how many cuts to check (2,000 by default, what
//! CI runs; `scripts/soak power` runs 100,000).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Expected, Load, Model, Rng, assert_store_matches, assert_store_survived};
use common::{fill_half, start_clients, stop_clients};
use dmm_store::{BlockStore, CrashStore, Cut, Power};
use dmm_volume::{
    Activity, CrashFiles, Migration, MigrationConfig, Phase, Priority, Strategy, Verify,
};
use parking_lot::Mutex;

const SIZE: u64 = 1 << 20;
const CHUNK: u64 = 16 << 10;
/// Cuts kept per stage of one run (a random sample of those taken).
const PER_STAGE: usize = 8;

/// Where in the migration a cut falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Copy,
    Switchover,
    Verify,
    Rollback,
    Commit,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Stage::Copy,
        Stage::Switchover,
        Stage::Verify,
        Stage::Rollback,
        Stage::Commit,
    ];
}

/// The cuts checked per strategy and stage, as a Markdown table (which
/// `scripts/soak power` copies into RELIABILITY.md).
fn markdown_table(counts: &BTreeMap<(String, Stage), u64>) -> String {
    let mut table =
        String::from("| strategy | copy | switchover | verify | rollback | commit | all |\n");
    table += "|---|--:|--:|--:|--:|--:|--:|\n";
    for strategy in Strategy::ALL.map(|s| s.to_string()) {
        let row: Vec<u64> = Stage::ALL
            .iter()
            .map(|&stage| counts.get(&(strategy.clone(), stage)).copied().unwrap_or(0))
            .collect();
        let cells: Vec<String> = row.iter().map(u64::to_string).collect();
        let all: u64 = row.iter().sum();
        table += &format!("| {strategy} | {} | {all} |\n", cells.join(" | "));
    }
    table
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Commit,
    /// A rollback requested this long after the start.
    Rollback(Duration),
}

/// What a power cut left.
struct Survivors {
    stage: Stage,
    source: CrashStore,
    destination: CrashStore,
    files: CrashFiles,
    model: Expected,
}

fn config(strategy: Strategy) -> MigrationConfig {
    MigrationConfig {
        strategy,
        chunk_size: CHUNK,
        rate: Some(12 << 20),
        in_flight: 4,
        priority: Priority::Normal,
        verify: Verify::Full,
        checkpoint_every: Duration::from_millis(5),
        max_passes: 12,
    }
}

fn names() -> (String, String) {
    ("crash:source".to_owned(), "crash:destination".to_owned())
}

async fn open(
    source: Arc<CrashStore>,
    destination: Arc<CrashStore>,
    files: Arc<CrashFiles>,
    strategy: Strategy,
) -> Arc<Migration> {
    let migration = Migration::open_on(source, destination, names(), files, config(strategy))
        .await
        .expect("open the migration");
    Arc::new(migration)
}

/// Runs the migration to its end: verified then committed, or rolled back.
async fn drive(migration: Arc<Migration>, ending: Ending, committing: Arc<AtomicBool>) -> Phase {
    let run = tokio::spawn({
        let migration = migration.clone();
        async move { migration.run().await }
    });
    if let Ending::Rollback(after) = ending {
        tokio::time::sleep(after).await;
        migration.request_rollback().expect("request a rollback");
    }
    let mut phase = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ends")
        .unwrap()
        .expect("run");
    if phase == Phase::Verified && matches!(ending, Ending::Rollback(_)) {
        // The copy won the race with the request: roll back from there.
        phase = migration.run().await.expect("rollback");
    }
    if phase == Phase::Verified {
        committing.store(true, Ordering::Release);
        migration.commit().await.expect("commit");
        phase = Phase::Committed;
    }
    phase
}

/// The stage a cut falls in.
fn stage(migration: &Migration, committing: bool) -> Stage {
    match migration.phase() {
        _ if committing => Stage::Commit,
        Phase::Copying if migration.activity() == Activity::Switching => Stage::Switchover,
        Phase::Copying => Stage::Copy,
        Phase::SwitchedOver => Stage::Verify,
        Phase::Verified | Phase::Committed => Stage::Commit,
        Phase::RollingBack | Phase::RolledBack => Stage::Rollback,
    }
}

/// A uniform sample of at most `PER_STAGE` items per stage.
#[derive(Default)]
struct Sample {
    seen: BTreeMap<Stage, u64>,
    kept: BTreeMap<Stage, Vec<Survivors>>,
}

impl Sample {
    /// Where to put the next cut of `stage`, if it is to be kept.
    fn slot(&mut self, stage: Stage, rng: &mut Rng) -> Option<usize> {
        let seen = self.seen.entry(stage).or_default();
        *seen += 1;
        let kept = self.kept.entry(stage).or_default().len();
        if kept < PER_STAGE {
            return Some(kept);
        }
        let pick = rng.below(*seen) as usize;
        (pick < PER_STAGE).then_some(pick)
    }

    fn keep(&mut self, slot: usize, survivors: Survivors) {
        let kept = self.kept.entry(survivors.stage).or_default();
        match slot < kept.len() {
            true => kept[slot] = survivors,
            false => kept.push(survivors),
        }
    }
}

/// One migration under load with power cut all through it; returns a
/// sample of what the cuts left.
async fn cut_through_a_run(strategy: Strategy, ending: Ending, seed: u64) -> Vec<Survivors> {
    let power = Power::new();
    let source = Arc::new(CrashStore::on_rail(SIZE, &power));
    let destination = Arc::new(CrashStore::on_rail(SIZE, &power));
    let files = Arc::new(CrashFiles::new(Path::new("/power-cut/state"), &power));
    let model: Model = fill_half(&*source, CHUNK).await;
    let migration = open(source.clone(), destination.clone(), files.clone(), strategy).await;
    let device: Arc<dyn BlockStore> = migration.device();
    let load = Load {
        writes_for: Duration::from_millis(150),
        think: Duration::from_micros(300),
    };
    let (stop, clients) = start_clients(device.clone(), &model, load);
    let committing = Arc::new(AtomicBool::new(false));
    // The switchover waits for the cutter, which then cuts densely through
    // it (as through a commit and a rollback): they last little.
    migration.controls().hold_switchover();
    let mut switching = false;
    let driver = tokio::spawn(drive(migration.clone(), ending, committing.clone()));
    let mut rng = Rng(seed | 1);
    let mut sample = Sample::default();
    while !driver.is_finished() {
        if migration.activity() == Activity::WaitingForSwitchover {
            switching = true;
            migration.controls().allow_switchover();
        }
        let dense = {
            let blackout = power.cut();
            let stage = stage(&migration, committing.load(Ordering::Acquire));
            switching &= matches!(stage, Stage::Copy | Stage::Switchover);
            if let Some(slot) = sample.slot(stage, &mut rng) {
                let cut = match rng.below(2) {
                    0 => Cut::DurableOnly,
                    _ => Cut::TearLast { seed: rng.next() },
                };
                let after = Power::new();
                let survivors = Survivors {
                    stage,
                    source: source.survivor(&blackout, cut, &after),
                    destination: destination.survivor(&blackout, cut, &after),
                    files: files.survivor(&blackout, cut, &after),
                    model: model.lock().clone(),
                };
                sample.keep(slot, survivors);
            }
            switching || matches!(stage, Stage::Switchover | Stage::Rollback | Stage::Commit)
        };
        match dense {
            true => tokio::task::yield_now().await,
            false => tokio::time::sleep(Duration::from_micros(rng.below(400))).await,
        }
    }
    let ended = driver.await.unwrap();
    stop_clients(stop, clients).await;
    let holder: &dyn BlockStore = match ended {
        Phase::RolledBack => &*source,
        _ => &*destination,
    };
    assert_store_matches(holder, &model, &format!("{strategy}: after the run")).await;
    sample.kept.into_values().flatten().collect()
}

/// Reopens what a cut left: checks the crash contract, then resumes the
/// migration to its end and checks the volume.
async fn resume(survivors: Survivors, strategy: Strategy, what: String) {
    let source = Arc::new(survivors.source);
    let destination = Arc::new(survivors.destination);
    let files = Arc::new(survivors.files);
    let migration = open(source.clone(), destination.clone(), files, strategy).await;
    let model: Model = Arc::new(Mutex::new(survivors.model));
    let device = migration.device();
    let got = device.read(0, SIZE as usize).await.unwrap();
    let violation = model.lock().first_violation(&got);
    if let Some(at) = violation {
        let source_byte = source.read(at as u64, 1).await.unwrap()[0];
        let destination_byte = destination.read(at as u64, 1).await.unwrap()[0];
        panic!(
            "{what}: the device, reopened in {:?}: {}; the source holds {source_byte:#x}, \
             the destination {destination_byte:#x}",
            migration.phase(),
            model.lock().explain(at, got[at]),
        );
    }
    assert_store_survived(&*device, &model, &format!("{what}: the device")).await;
    let phase = tokio::time::timeout(Duration::from_secs(60), migration.run())
        .await
        .unwrap_or_else(|_| panic!("{what}: the resumed run ends"))
        .unwrap_or_else(|err| panic!("{what}: the resumed run: {}", err.report()));
    let holder: &dyn BlockStore = match phase {
        Phase::RolledBack => &*source,
        _ => {
            migration
                .commit()
                .await
                .unwrap_or_else(|err| panic!("{what}: commit: {err}"));
            &*destination
        }
    };
    assert_store_matches(&*device, &model, &format!("{what}: the device at the end")).await;
    assert_store_matches(holder, &model, &format!("{what}: the store at the end")).await;
}

fn cuts_wanted() -> u64 {
    std::env::var("DMM_POWER_CUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_during_every_strategy_lose_no_durable_write() {
    let wanted = cuts_wanted();
    let mut counts: BTreeMap<(String, Stage), u64> = BTreeMap::new();
    let mut checked = 0u64;
    let mut rng = Rng(0x5eed_c075);
    'runs: for round in 0u64.. {
        for strategy in Strategy::ALL {
            for ending in [
                Ending::Commit,
                Ending::Rollback(Duration::from_millis(rng.below(120))),
            ] {
                let sample = cut_through_a_run(strategy, ending, rng.next()).await;
                let mut checks = Vec::new();
                for (index, survivors) in sample.into_iter().enumerate() {
                    *counts
                        .entry((strategy.to_string(), survivors.stage))
                        .or_default() += 1;
                    let what = format!(
                        "{strategy}, {ending:?}, round {round}, cut {index} in {:?}",
                        survivors.stage
                    );
                    checks.push(tokio::spawn(resume(survivors, strategy, what)));
                }
                for check in checks {
                    check.await.expect("a resumed migration failed its checks");
                    checked += 1;
                }
                if checked >= wanted {
                    break 'runs;
                }
            }
        }
    }
    let table = markdown_table(&counts);
    eprintln!("{checked} power cuts checked, 0 lost:\n\n{table}");
    for stage in Stage::ALL {
        let cuts: u64 = counts
            .iter()
            .filter(|((_, s), _)| *s == stage)
            .map(|(_, n)| n)
            .sum();
        assert!(cuts > 0, "no cut fell in {stage:?}:\n{table}");
    }
}
