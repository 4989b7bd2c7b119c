//! Stream stores through the daemon and the CLI, end to end: create with
//! `-p kind=stream`, append through the access point while streams move
//! from a plain tier to a zstd tier (`tail -F` following), commit and read
//! the dense files back with `zstd -d`; and kill -9 of the daemon at random
//! instants of the moves, after which every fsynced record must be there,
//! once, in order, and the moves must go on.

mod common;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, is_mountpoint, p, soak_seed};
use dmm_testkit::{record, records};

struct Store {
    dir: tempfile::TempDir,
    access: PathBuf,
}

impl Store {
    fn new() -> Store {
        let dir = common::scratch();
        let access = dir.path().join("access");
        std::fs::create_dir(&access).unwrap();
        Store { dir, access }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `dmm create` of the store with `extra` properties; its migid.
    fn create(&self, daemon: &Daemon, extra: &[&str]) -> String {
        let root = self.dir.path();
        let orbit = format!("orbit=fast:{0}/fast,dense:{0}/dense:zstd", p(root));
        let access = format!("access={}", p(&self.access));
        let mut args = vec!["create", "-p", "kind=stream", "-p", &orbit, "-p", &access];
        for e in extra {
            args.extend(["-p", e]);
        }
        let out = daemon.ok(&args);
        out.split_whitespace().last().unwrap().to_owned()
    }

    /// The files of stream `name` on tier `tier`.
    fn files(&self, tier: &str, name: &str) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path().join(tier))
            .map(|dir| {
                dir.map(|e| e.unwrap().path())
                    .filter(|f| {
                        f.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with(&format!("{name}."))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Checks that `bytes` are records 0.. in order, each once, maybe followed
/// by the start of the next (bytes appended but not fsynced may be cut
/// anywhere); returns how many whole records there are.
fn whole_records(bytes: &[u8], what: &str) -> u64 {
    let text = String::from_utf8_lossy(bytes);
    let mut n = 0;
    let mut rest = &text[..];
    loop {
        let expected = record(n);
        if rest.starts_with(&expected) {
            rest = &rest[expected.len()..];
            n += 1;
        } else {
            assert!(
                expected.starts_with(rest),
                "{what}: after {n} records, {:?} is not record {n}",
                &rest[..rest.len().min(80)]
            );
            return n;
        }
    }
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_live_stream_moves_to_the_dense_tier_while_tail_follows_and_commits() {
    let store = Store::new();
    let daemon = Daemon::start(&store.state(), &[]);
    let id = store.create(&daemon, &["above=64K", "rate=4M"]);
    wait_until(
        Duration::from_secs(15),
        "the access point is mounted",
        || is_mountpoint(&store.access),
    );
    let file = store.access.join("app.log");
    let seen = store.dir.path().join("seen");
    let mut tail = dmm_testkit::tail_follow(&file, &seen);
    let count = 8000;
    let writer = dmm_testkit::records_writer(&file, count).status().unwrap();
    assert!(writer.success());
    let expected = records(count);
    daemon.wait_state(&id, &["switched-over"], Duration::from_secs(60));
    wait_until(
        Duration::from_secs(30),
        "tail -F follows to the end",
        || std::fs::metadata(&seen).unwrap().len() >= expected.len() as u64,
    );
    thread::sleep(Duration::from_millis(300));
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(
        std::fs::read_to_string(&seen).unwrap() == expected,
        "tail -F saw every record once and in order"
    );
    let stat = daemon.ok(&["stat", &id]);
    assert!(stat.contains("1 moves linked"), "{stat}");
    assert!(
        stat.contains("app.log: ") && stat.contains(" on dense"),
        "{stat}"
    );
    daemon.ok(&["commit", &id]);
    daemon.wait_state(&id, &["committed"], Duration::from_secs(30));
    assert!(
        !is_mountpoint(&store.access),
        "commit unmounts the access point"
    );
    let dense = store.files("dense", "app.log");
    assert_eq!(dense.len(), 1, "{dense:?}");
    let unpacked = common::tool("zstd")
        .args(["-d", "-c", "-q"])
        .arg(&dense[0])
        .output()
        .unwrap();
    assert!(
        unpacked.stdout == expected.as_bytes(),
        "zstd -d of the committed dense file"
    );
    assert!(
        store.files("fast", "app.log").is_empty(),
        "the source extent is released"
    );
    daemon.stop();
}

/// Appends records to `path` with an fsync after each until a write or a
/// sync fails (the daemon was killed); `acked` counts the fsynced ones.
fn fsyncing_writer(path: PathBuf, acked: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Ok(mut file) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&path)
        else {
            return;
        };
        for n in 0.. {
            if file.write_all(record(n).as_bytes()).is_err() || file.sync_data().is_err() {
                return;
            }
            acked.store(n + 1, Ordering::SeqCst);
        }
    })
}

/// kill -9 of the daemon at a random instant while a writer appends with
/// fsync and streams move (slowly, so that kills land in every phase);
/// after each restart every stream holds every fsynced record of its
/// writer, once and in order, and at the end every move is linked.
#[test]
fn kill_9_at_random_phases_loses_no_fsynced_append() {
    let store = Store::new();
    let mut seed = soak_seed(0x5eed_0016);
    let mut random = |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let mut daemon = Daemon::start(&store.state(), &[]);
    let id = store.create(&daemon, &["above=16K"]);
    // CI runs 8; `scripts/soak streams` many more.
    let rounds: u64 = std::env::var("DMM_STREAM_KILL_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8);
    let mut fsynced = Vec::new();
    let mut phases = std::collections::BTreeMap::<&str, u64>::new();
    for round in 0..rounds {
        wait_until(
            Duration::from_secs(30),
            "the access point is mounted",
            || is_mountpoint(&store.access),
        );
        check_streams(&store.access, &fsynced);
        // Slow drains for kills in the middle of one, fast ones for kills
        // around the link.
        let rate = ["rate=64K", "rate=256K", "rate=4M"][random(3) as usize];
        daemon.ok(&["set", "-p", rate, &id]);
        let name = format!("s{round}.log");
        let acked = Arc::new(AtomicU64::new(0));
        let writer = fsyncing_writer(store.access.join(&name), acked.clone());
        thread::sleep(Duration::from_millis(300 + random(2500)));
        let stat = daemon.ok(&["stat", &id]);
        let line = stat
            .lines()
            .find(|l| l.contains(&name))
            .unwrap_or("")
            .trim()
            .to_owned();
        daemon.kill();
        writer.join().unwrap();
        let acked = acked.load(Ordering::SeqCst);
        eprintln!("round {round}: killed at {line:?} with {acked} records fsynced");
        *phases.entry(phase_of(&line)).or_default() += 1;
        fsynced.push((name, acked));
        daemon = Daemon::start(&store.state(), &[]);
    }
    wait_until(
        Duration::from_secs(30),
        "the access point is mounted",
        || is_mountpoint(&store.access),
    );
    check_streams(&store.access, &fsynced);
    daemon.wait_state(&id, &["switched-over"], Duration::from_secs(120));
    let stat = daemon.ok(&["stat", &id]);
    assert!(!stat.contains("moving to"), "{stat}");
    check_streams(&store.access, &fsynced);
    daemon.ok(&["commit", &id]);
    daemon.wait_state(&id, &["committed"], Duration::from_secs(30));
    for (name, acked) in &fsynced {
        let dense = store.files("dense", name);
        assert_eq!(dense.len(), 1, "{name}: {dense:?}");
        let unpacked = common::tool("zstd")
            .args(["-d", "-c", "-q"])
            .arg(&dense[0])
            .output()
            .unwrap();
        assert!(whole_records(&unpacked.stdout, name) >= *acked);
    }
    daemon.stop();
    let records: u64 = fsynced.iter().map(|(_, acked)| acked).sum();
    let phases: Vec<String> = phases.iter().map(|(p, n)| format!("{n} {p}")).collect();
    println!(
        "stream kill -9: {rounds} kills, {records} fsynced records, 0 lost, 0 repeated; killed: {}",
        phases.join(", ")
    );
}

/// The phase of a stream's move a `dmm stat` line shows.
fn phase_of(line: &str) -> &'static str {
    for phase in ["prepared", "switched", "drained"] {
        if line.ends_with(&format!(": {phase}")) {
            return phase;
        }
    }
    match line.contains(" on dense ") {
        true => "linked",
        false => "before its move",
    }
}

/// Every stream read through the access point holds at least the records
/// its writer saw fsynced, in order, none twice.
fn check_streams(access: &Path, fsynced: &[(String, u64)]) {
    for (name, acked) in fsynced {
        let bytes = std::fs::read(access.join(name)).unwrap();
        let whole = whole_records(&bytes, name);
        assert!(
            whole >= *acked,
            "{name}: {whole} records, {acked} were fsynced"
        );
    }
}
