//! Kill -9 of the daemon at random instants, trial after trial, with
//! clients that record what was acknowledged to them:
//!
//! - daemon trials: two volume migrations (strategies picked at random) and
//!   a tree migration at once, a FUA writer on one volume's NBD export and
//!   a client working in the tree's access point;
//! - tree trials: one tree migration and the client in its access point
//!   (new files written and fsynced, files overwritten and appended to,
//!   files deleted, a directory renamed).
//!
//! The daemon is killed at a random instant, started again, the migrations
//! finish and are committed. Then every acknowledged write must be in the
//! targets (qemu-io for volumes, the files for trees), nothing deleted may
//! come back, and what no client touched equals the source (qemu-img
//! compare, rsync, cmp). `DMM_DAEMON_KILL_TRIALS` and `DMM_TREE_KILL_TRIALS`
//! set the counts: 2 of each in CI, 200 of each in `scripts/kill-soak`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    Daemon, Dirs, MIB, Sent, build_source, check_sent, create_tree, create_volume, dirs,
    fua_writer, path, pattern, rsync_differences, run, soak_seed, tool,
};

const STRATEGIES: [&str; 7] = ["lr", "redirect", "auto", "aio", "mirror", "slr", "precopy"];

fn trials(variable: &str) -> u64 {
    std::env::var(variable)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2)
}

/// xorshift64: the trials' random instants and choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What the tree client was told, per path under the tree: the bytes a file
/// holds (`None`: it was deleted); the directories it renamed; the change
/// it was waiting for when the daemon died (which may or may not be there).
#[derive(Default)]
struct TreeAcks {
    files: BTreeMap<PathBuf, Option<Vec<u8>>>,
    renamed: Vec<(PathBuf, PathBuf)>,
    in_flight: Option<PathBuf>,
}

/// Works in the access point until `stop` or the first error (the daemon
/// died); records every change acknowledged.
fn tree_client(access: PathBuf, seed: u64, stop: Arc<Mutex<bool>>, acks: Arc<Mutex<TreeAcks>>) {
    let mut rng = Rng(seed | 1);
    let mut step = 0u32;
    while !*stop.lock().unwrap() {
        step += 1;
        let (relative, outcome) = match rng.below(5) {
            0 => {
                let relative = PathBuf::from(format!("keep/new-{step}"));
                let bytes = pattern(1 + rng.below(200_000) as usize, step as u8);
                (
                    relative.clone(),
                    write_synced(&access.join(&relative), &bytes, false).map(|()| Some(bytes)),
                )
            }
            1 => {
                let relative =
                    PathBuf::from(format!("keep/d{}/f{}", 1 + rng.below(3), rng.below(25)));
                let bytes = pattern(1 + rng.below(50_000) as usize, step as u8);
                (
                    relative.clone(),
                    write_synced(&access.join(&relative), &bytes, false).map(|()| Some(bytes)),
                )
            }
            2 => {
                let known: Vec<(PathBuf, Vec<u8>)> = acks
                    .lock()
                    .unwrap()
                    .files
                    .iter()
                    .filter_map(|(p, b)| b.clone().map(|b| (p.clone(), b)))
                    .collect();
                let Some((relative, mut bytes)) =
                    known.get(rng.below(known.len() as u64) as usize).cloned()
                else {
                    continue;
                };
                let tail = format!("appended {step}\n").into_bytes();
                bytes.extend_from_slice(&tail);
                (
                    relative.clone(),
                    write_synced(&access.join(&relative), &tail, true).map(|()| Some(bytes)),
                )
            }
            3 => {
                let relative = PathBuf::from(format!("gone/d{}/f{}", rng.below(4), rng.below(25)));
                if acks.lock().unwrap().files.get(&relative) == Some(&None) {
                    continue;
                }
                (
                    relative.clone(),
                    fs::remove_file(access.join(&relative)).map(|()| None),
                )
            }
            _ => {
                let from = PathBuf::from(format!("moved/d{}", rng.below(4)));
                let to = PathBuf::from(format!("renamed-{step}"));
                let done = acks.lock().unwrap().renamed.iter().any(|(f, _)| *f == from);
                if done {
                    continue;
                }
                acks.lock().unwrap().in_flight = Some(from.clone());
                if fs::rename(access.join(&from), access.join(&to)).is_err() {
                    return;
                }
                let mut acks = acks.lock().unwrap();
                acks.in_flight = None;
                acks.renamed.push((from, to));
                continue;
            }
        };
        let mut acks = acks.lock().unwrap();
        match outcome {
            Ok(value) => {
                acks.files.insert(relative, value);
            }
            Err(_) => {
                acks.in_flight = Some(relative);
                return;
            }
        }
        drop(acks);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `bytes` (appends them with `append`) and fsyncs.
fn write_synced(file: &Path, bytes: &[u8], append: bool) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true);
    match append {
        true => options.append(true),
        false => options.truncate(true),
    };
    let mut file = options.open(file)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Checks a committed tree target against what the client was told, and
/// what it never touched against the source.
fn check_tree(d: &Dirs, acks: &TreeAcks, what: &str) -> usize {
    let mut checked = 0;
    for (relative, expected) in &acks.files {
        if acks.in_flight.as_ref() == Some(relative) {
            continue;
        }
        let got = fs::read(d.target.join(relative)).ok();
        assert!(
            got == *expected,
            "{what}: {} holds {} bytes, expected {:?}",
            relative.display(),
            got.as_ref().map_or(0, Vec::len),
            expected.as_ref().map(Vec::len)
        );
        checked += 1;
    }
    for (from, to) in &acks.renamed {
        assert!(
            !d.target.join(from).exists(),
            "{what}: {} came back",
            from.display()
        );
        let f0 = fs::read(d.target.join(to).join("f0")).unwrap_or_default();
        assert_eq!(
            f0,
            fs::read(d.source.join(from).join("f0")).unwrap(),
            "{what}: {}/f0",
            to.display()
        );
        checked += 1;
    }
    let differences = rsync_differences(&d.source.join("keep/d0"), &d.target.join("keep/d0"));
    assert!(
        differences.is_empty(),
        "{what}: untouched files differ:\n{differences}"
    );
    for i in 0..3 {
        let name = format!("keep/big{i}");
        let same = tool("cmp")
            .arg(d.source.join(&name))
            .arg(d.target.join(&name))
            .status()
            .unwrap();
        assert!(same.success(), "{what}: {name} differs");
    }
    checked
}

/// A client thread and what it records.
struct Client<T> {
    stop: Arc<Mutex<bool>>,
    acks: Arc<Mutex<T>>,
    thread: JoinHandle<()>,
}

impl<T: Default + Send + 'static> Client<T> {
    fn start(work: impl FnOnce(Arc<Mutex<bool>>, Arc<Mutex<T>>) + Send + 'static) -> Client<T> {
        let (stop, acks) = (
            Arc::new(Mutex::new(false)),
            Arc::new(Mutex::new(T::default())),
        );
        let thread = std::thread::spawn({
            let (stop, acks) = (stop.clone(), acks.clone());
            move || work(stop, acks)
        });
        Client { stop, acks, thread }
    }

    fn stop(self) -> T {
        *self.stop.lock().unwrap() = true;
        self.thread.join().expect("client thread");
        std::mem::take(&mut *self.acks.lock().unwrap())
    }
}

/// Waits until the restarted daemon serves the access point again.
fn wait_for_remount(d: &Dirs, daemon: &Daemon, migid: &str) {
    let started = Instant::now();
    while !common::is_mountpoint(&d.access) || fs::read_dir(&d.access).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no remount: {}",
            daemon.ok(&["log", migid])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lets a migration finish and commits it.
fn finish(daemon: &Daemon, migid: &str) {
    daemon.ok(&["set", migid, "-p", "rate=0"]);
    // A precopy can give up while the writer runs (it does not converge
    // under writes that never stop, by design, sooner on a loaded
    // machine); the writer has stopped: started again, as an admin would.
    if daemon.state_of(migid) == "failed" {
        let log = daemon.ok(&["log", migid]);
        assert!(log.contains("does not converge"), "{migid} failed: {log}");
        daemon.ok(&["start", migid]);
    }
    daemon.wait_state(migid, &["switched-over"], Duration::from_secs(120));
    daemon.ok(&["commit", migid]);
}

#[test]
fn tree_trials_kill_9_at_random_instants_lose_nothing() {
    let trials = trials("DMM_TREE_KILL_TRIALS");
    let mut rng = Rng(soak_seed(0x7ee5_0a11_d00d_f00d));
    let mut checked = 0;
    for trial in 0..trials {
        let what = format!("tree trial {trial}");
        let d = dirs();
        build_source(&d.source);
        let daemon = Daemon::start(&d.state, &[]);
        let migid = create_tree(&daemon, &d, &["rate=4M", "maxdfproc=2"]);
        let seed = rng.below(u64::MAX);
        let access = d.access.clone();
        let client = Client::start(move |stop, acks| tree_client(access, seed, stop, acks));
        std::thread::sleep(Duration::from_millis(300 + rng.below(3000)));
        daemon.kill();
        let acks: TreeAcks = client.stop();
        let daemon = Daemon::start(&d.state, &[]);
        wait_for_remount(&d, &daemon, &migid);
        finish(&daemon, &migid);
        assert!(daemon.stop().success(), "{what}: the daemon stops");
        checked += check_tree(&d, &acks, &what);
    }
    eprintln!("tree kill -9: {trials} trials, {checked} acknowledged changes checked, 0 lost");
}

#[test]
fn daemon_trials_kill_9_at_random_instants_lose_nothing() {
    let trials = trials("DMM_DAEMON_KILL_TRIALS");
    let mut rng = Rng(soak_seed(0xdae0_0b1e_55ed_0001));
    let (mut writes, mut changes) = (0, 0);
    for trial in 0..trials {
        let d = dirs();
        build_source(&d.source);
        let daemon = Daemon::start(&d.state, &[]);
        let strategies = [0, 1].map(|_| STRATEGIES[rng.below(7) as usize]);
        let what = format!(
            "daemon trial {trial} ({} and {})",
            strategies[0], strategies[1]
        );
        let volumes: Vec<(String, PathBuf, PathBuf)> = strategies
            .iter()
            .enumerate()
            .map(|(i, strategy)| {
                let strategy = format!("strategy={strategy}");
                let properties = [strategy.as_str(), "rate=8M", "segsize=256K"];
                create_volume(
                    &daemon,
                    d.source.parent().unwrap(),
                    &i.to_string(),
                    (16 * MIB, i as u8 * 40),
                    &properties,
                )
            })
            .collect();
        let tree = create_tree(&daemon, &d, &["rate=4M", "maxdfproc=2"]);
        let uri = daemon.export_uri(&volumes[0].0);
        let writer = Client::start(move |stop, sent| fua_writer(uri, 16, stop, sent));
        let (seed, access) = (rng.below(u64::MAX), d.access.clone());
        let client = Client::start(move |stop, acks| tree_client(access, seed, stop, acks));
        std::thread::sleep(Duration::from_millis(300 + rng.below(3000)));
        daemon.kill();
        let sent: Sent = writer.stop();
        let acks: TreeAcks = client.stop();
        let daemon = Daemon::start(&d.state, &[]);
        wait_for_remount(&d, &daemon, &tree);
        for migid in volumes.iter().map(|v| v.0.as_str()).chain([tree.as_str()]) {
            finish(&daemon, migid);
        }
        assert!(daemon.stop().success(), "{what}: the daemon stops");
        check_sent(
            path(&volumes[0].2),
            &sent,
            &format!("{what}: an acknowledged write was lost"),
        );
        run(tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&volumes[1].1)
            .arg(&volumes[1].2));
        writes += sent.acked.len();
        changes += check_tree(&d, &acks, &what);
    }
    eprintln!(
        "daemon kill -9: {trials} trials, {writes} acknowledged FUA writes and {changes} tree changes checked, 0 lost"
    );
}
