//! The supervisor against the lifecycle table, in process: real volume
//! engines on small image files, no daemon process, no FUSE mount.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmm_catalog::{Catalog, Kind, Leads, MigrationId, Recovery, State, Verb};
use dmm_nbd::ExportTable;

use super::Supervisor;
use crate::error::ErrorKind;
use crate::layout::Layout;

const SIZE: usize = 4 << 20;

/// A state directory with its catalog, and a pair of images per
/// migration.
struct Bench {
    dir: tempfile::TempDir,
    layout: Layout,
    catalog: Arc<Catalog>,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("state"));
        std::fs::create_dir_all(layout.root()).unwrap();
        let catalog = Arc::new(Catalog::open(&layout.catalog()).unwrap());
        Bench {
            dir,
            layout,
            catalog,
        }
    }

    /// A new supervisor over the same catalog, as after a restart.
    fn supervisor(&self) -> Arc<Supervisor> {
        Supervisor::new(
            self.catalog.clone(),
            &self.layout,
            Arc::new(ExportTable::new()),
            Arc::new(crate::peers::Peers::default()),
            None,
        )
    }

    /// A volume migration's properties over two fresh images.
    fn volume(&self, name: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let source = self.dir.path().join(format!("{name}.src"));
        let target = self.dir.path().join(format!("{name}.dst"));
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, data).unwrap();
        std::fs::write(&target, vec![0u8; SIZE]).unwrap();
        let mut properties = BTreeMap::from([
            ("source".to_owned(), text(&source)),
            ("target".to_owned(), text(&target)),
            ("export".to_owned(), name.to_owned()),
        ]);
        for (name, value) in extra {
            properties.insert((*name).to_owned(), (*value).to_owned());
        }
        properties
    }

    /// A migration recorded directly in `state`, as if it had got there.
    fn recorded(&self, name: &str, state: State) -> MigrationId {
        let properties = self.volume(name, &[("rate", "1M")]);
        self.catalog
            .create(Kind::Volume, state, &properties)
            .unwrap()
            .id
    }

    fn state(&self, id: MigrationId) -> State {
        self.catalog.get(id).unwrap().state
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// Waits until the catalog shows `state` (the engine's task mirrors it).
async fn wait_for(bench: &Bench, id: MigrationId, state: State) {
    let start = Instant::now();
    while bench.state(id) != state {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "migration {id} is {} after 30 s, not {state}",
            bench.state(id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_in_every_state_follows_the_lifecycle_table() {
    let bench = Bench::new();
    let supervisor = bench.supervisor();
    for (n, state) in State::ALL.into_iter().enumerate() {
        for (m, verb) in dmm_catalog::Verb::ALL.into_iter().enumerate() {
            if verb == Verb::Set {
                continue;
            }
            let id = bench.recorded(&format!("m{n}-{m}"), state);
            let rule = verb.rule();
            let outcome = supervisor.apply(id, verb).await;
            let record = bench.catalog.get(id);
            if !rule.valid.contains(&state) {
                let err = outcome.expect_err("refused");
                assert_eq!(err.kind, ErrorKind::Conflict, "{verb} in {state}: {err}");
                assert!(err.to_string().contains("is valid when"), "{err}");
                let record = record.unwrap();
                assert_eq!((record.state, record.pending), (state, None), "{verb}");
                continue;
            }
            match (outcome, rule.leads) {
                (Ok(_), Leads::Gone) => assert!(record.is_err(), "{verb} in {state}"),
                (Ok(_), Leads::To(_) | Leads::Admitted) => {
                    // No maxrunning is set: every start is admitted.
                    let to = match rule.leads {
                        Leads::To(to) => to,
                        _ => State::Running,
                    };
                    let record = record.unwrap();
                    assert!(record.pending.is_none());
                    assert!(
                        record.state == to || record.state == State::Failed,
                        "{verb} in {state} led to {}",
                        record.state
                    );
                }
                (Ok(_), Leads::Stays) => assert_eq!(record.unwrap().state, state),
                // The act itself may fail (no engine to pause, nothing to
                // commit yet): never because of the state, and never with
                // the transition left open.
                (Err(err), _) => {
                    assert!(!err.to_string().contains("is valid when"), "{err}");
                    assert!(record.unwrap().pending.is_none(), "{verb} in {state}");
                }
            }
        }
    }
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_runs_to_switched_over_and_commits() {
    let bench = Bench::new();
    let supervisor = bench.supervisor();
    let properties = bench.volume("whole", &[]);
    let record = supervisor.create(properties, false).await.unwrap();
    wait_for(&bench, record.id, State::SwitchedOver).await;
    let committed = supervisor.apply(record.id, Verb::Commit).await.unwrap();
    assert_eq!(committed.state, State::Committed);
    // The history keeps what the closed engine reported.
    let summary = bench.catalog.get(record.id).unwrap().summary.unwrap();
    assert_eq!(summary.bytes, SIZE as u64);
    let verification = summary.verification.unwrap();
    assert!(
        verification.ends_with("chunks verified, all equal"),
        "{verification}"
    );
    assert!(summary.started_at <= summary.ended_at && summary.ended_at.is_some());
    let source = std::fs::read(&record.properties["source"]).unwrap();
    let target = std::fs::read(&record.properties["target"]).unwrap();
    assert!(source == target, "the target holds the volume");
    supervisor.shutdown().await;
}

/// Every verb that records an intent, killed right after it: a restarted
/// supervisor finishes it as the table says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_half_done_transition_is_finished_on_restart() {
    let bench = Bench::new();
    for (n, verb) in Verb::ALL.into_iter().enumerate() {
        let rule = verb.rule();
        let to = match rule.leads {
            Leads::To(state) => state,
            Leads::Admitted => State::Running,
            Leads::Gone => State::Stopped,
            Leads::Stays => continue,
        };
        let from = *rule
            .valid
            .iter()
            .find(|&&s| s == State::Stopped)
            .unwrap_or(&rule.valid[0]);
        let id = bench.recorded(&format!("r{n}"), from);
        let state_dir = bench.layout.engine_state(Kind::Volume, id);
        std::fs::create_dir_all(&state_dir).unwrap();
        bench.catalog.begin(id, verb, to).unwrap();
        let supervisor = bench.supervisor();
        supervisor.recover().await;
        assert!(bench.catalog.pending().unwrap().is_empty(), "{verb}");
        let record = bench.catalog.get(id);
        match (rule.leads, rule.recovery) {
            (Leads::Gone, _) => {
                assert!(record.is_err(), "{verb}: deleted");
                assert!(!state_dir.exists(), "{verb}: its state removed");
            }
            (Leads::To(State::Committed), _) => {
                // Nothing was copied: the commit cannot be redone, and the
                // migration is back where it was, with the reason.
                let record = record.unwrap();
                assert_eq!(record.state, from, "{verb}");
                assert!(record.error.unwrap().contains("cannot commit"), "{verb}");
            }
            // A redone rollback runs at once; with nothing to copy back it
            // may already have ended.
            (Leads::To(_), Recovery::Redo) if verb == Verb::Rollback => {
                let state = record.unwrap().state;
                assert!(
                    matches!(state, State::Running | State::RolledBack),
                    "{state}"
                );
            }
            (Leads::To(_) | Leads::Admitted, Recovery::Record | Recovery::Redo) => {
                assert_eq!(record.unwrap().state, to, "{verb}");
            }
            (Leads::Stays, _) => unreachable!(),
        }
        if verb == (Verb::Halt { remove: true }) {
            assert!(
                !state_dir.exists(),
                "halt --remove finished removing the state"
            );
        }
        if verb == (Verb::Halt { remove: false }) {
            assert!(state_dir.exists(), "halt --keep keeps the state");
        }
        supervisor.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_after_its_intent_is_redone_on_restart() {
    let bench = Bench::new();
    let supervisor = bench.supervisor();
    let record = supervisor
        .create(bench.volume("commit", &[]), false)
        .await
        .unwrap();
    wait_for(&bench, record.id, State::SwitchedOver).await;
    supervisor.shutdown().await;
    drop(supervisor);
    bench
        .catalog
        .begin(record.id, Verb::Commit, State::Committed)
        .unwrap();
    bench.supervisor().recover().await;
    assert_eq!(bench.state(record.id), State::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_migration_comes_back_paused() {
    let bench = Bench::new();
    let supervisor = bench.supervisor();
    let properties = bench.volume("paused", &[("rate", "256K")]);
    let record = supervisor.create(properties, false).await.unwrap();
    supervisor.apply(record.id, Verb::Pause).await.unwrap();
    supervisor.shutdown().await;
    let restarted = bench.supervisor();
    restarted.recover().await;
    assert_eq!(bench.state(record.id), State::Paused);
    let engine = restarted.engine(record.id).expect("reopened");
    assert!(engine.controls().is_paused());
    let resumed = restarted.apply(record.id, Verb::Resume).await.unwrap();
    assert_eq!(resumed.state, State::Running);
    restarted.shutdown().await;
}

/// Waits until the queue is `expected`.
async fn wait_for_queue(supervisor: &Supervisor, expected: &[MigrationId]) {
    let start = Instant::now();
    while supervisor.queue().unwrap() != expected {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the queue is {:?} after 30 s, not {expected:?}",
            supervisor.queue().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_beyond_maxrunning_wait_and_start_in_the_order_set() {
    let bench = Bench::new();
    let supervisor = bench.supervisor();
    let stop = tokio_util::sync::CancellationToken::new();
    let queue = tokio::spawn(supervisor.clone().run_queue(stop.clone()));
    let limit = BTreeMap::from([("maxrunning".to_owned(), "1".to_owned())]);
    supervisor.configure(&limit).unwrap();
    let mut ids = Vec::new();
    for name in ["q1", "q2", "q3"] {
        let properties = bench.volume(name, &[("rate", "256K")]);
        ids.push(supervisor.create(properties, false).await.unwrap().id);
    }
    let [first, second, third] = ids[..] else {
        unreachable!()
    };
    assert_eq!(bench.state(first), State::Running);
    assert_eq!(bench.state(second), State::Queued);
    assert_eq!(supervisor.queue().unwrap(), [second, third]);
    assert!(
        supervisor.engine(second).is_err(),
        "a queued migration is closed"
    );
    supervisor.move_in_queue(third, 1).unwrap();
    // A pause keeps the slot.
    supervisor.apply(first, Verb::Pause).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(supervisor.queue().unwrap(), [third, second]);
    // A stop frees it: the head of the queue starts.
    supervisor.apply(first, Verb::Stop).await.unwrap();
    wait_for_queue(&supervisor, &[second]).await;
    assert_eq!(bench.state(third), State::Running);
    // Restarted: the limit, the queue and its order are where they were.
    stop.cancel();
    queue.await.unwrap();
    supervisor.shutdown().await;
    let restarted = bench.supervisor();
    restarted.recover().await;
    assert_eq!(restarted.settings().unwrap()["maxrunning"].value, "1");
    assert_eq!(restarted.queue().unwrap(), [second]);
    assert_eq!(bench.state(second), State::Queued);
    assert!(restarted.engine(second).is_err());
    // Stopped while queued, it leaves the queue; a higher limit starts
    // the others at once.
    restarted.apply(first, Verb::Start).await.unwrap();
    assert_eq!(restarted.queue().unwrap(), [second, first]);
    restarted.apply(second, Verb::Stop).await.unwrap();
    assert_eq!(restarted.queue().unwrap(), [first]);
    let stop = tokio_util::sync::CancellationToken::new();
    let queue = tokio::spawn(restarted.clone().run_queue(stop.clone()));
    let unlimited = BTreeMap::from([("maxrunning".to_owned(), "unlimited".to_owned())]);
    restarted.configure(&unlimited).unwrap();
    wait_for_queue(&restarted, &[]).await;
    assert_ne!(bench.state(first), State::Queued);
    stop.cancel();
    queue.await.unwrap();
    restarted.shutdown().await;
}

#[test]
fn a_logfile_is_a_regular_file_never_reached_through_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vm1.log");
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    super::append_line(1, &path(&log), "one\n");
    super::append_line(1, &path(&log), "two\n");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "one\ntwo\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "created owner-only");
    // A link put where the log goes is not followed.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    super::append_line(1, &path(&link), "line\n");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    // Nor is a FIFO written (or waited on).
    let fifo = dir.path().join("fifo.log");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let started = Instant::now();
    super::append_line(1, &path(&fifo), "line\n");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Nor a second name of a file (a hard link to it)...
    let hard = dir.path().join("hard.log");
    std::fs::hard_link(&victim, &hard).unwrap();
    super::append_line(1, &path(&hard), "line\n");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    // ...nor a file another user (nobody) owns, and could read.
    let theirs = dir.path().join("theirs.log");
    std::fs::write(&theirs, "").unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
    super::append_line(1, &path(&theirs), "line\n");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "");
    // A relative path is refused when set.
    let err = crate::properties::check("logfile", "logs/vm1.log").unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
}
