//! `dmm migrate` and `dmm verify` with real clients: fio (crc32c verify)
//! writing through the export during the whole migration for every
//! strategy, qemu-io and qemu-img checking the images, kill -9 at random
//! instants, and a destination that fails (nbdkit's error filter).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    DMM, FuaWriter, LoopMount, MIB, check_sent, image_with, run, scratch, stdout, terminate, tool,
    wait_with_timeout,
};

const SIZE: u64 = 48 * MIB;

/// The source layout: a pattern byte per MiB, every other MiB.
fn source_image(dir: &Path) -> PathBuf {
    let pieces: Vec<(u64, usize, u8)> = (0..SIZE / MIB)
        .filter(|m| m % 2 == 0)
        .map(|m| (m * MIB, MIB as usize, (m + 1) as u8))
        .collect();
    image_with(dir, "source.raw", SIZE, &pieces)
}

/// A running `dmm migrate --json`, its JSON events collected.
struct Migrate {
    child: Option<Child>,
    socket: PathBuf,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Migrate {
    fn start(source: &str, destination: &str, dir: &Path, extra: &[&str]) -> Migrate {
        let socket = dir.join("export.sock");
        let mut child = Command::new(DMM)
            .args(["migrate", source, destination, "--json", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dmm migrate");
        let events = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stdout.take().unwrap());
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(event);
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut errors = BufReader::new(child.stderr.take().unwrap());
        let text = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while errors.read_line(&mut line).unwrap_or(0) > 0 {
                text.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no export socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Migrate {
            child: Some(child),
            socket,
            events,
            stderr,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The last event named `name`, waiting for it.
    fn wait_for(&self, names: &[&str], limit: Duration) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let found = self
                .events
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|e| names.contains(&e["event"].as_str().unwrap_or("")))
                .cloned();
            if let Some(event) = found {
                return event;
            }
            assert!(
                started.elapsed() < limit,
                "no {names:?} event; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The state the migration started (or resumed) from.
    fn started(&self) -> serde_json::Value {
        self.wait_for(&["started"], Duration::from_secs(10))
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        terminate(&child);
        wait_with_timeout(&mut child, Duration::from_secs(30)).expect("dmm migrate stops")
    }

    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Its exit status if it exits by itself within `limit`.
    fn exits_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_with_timeout(self.child.as_mut().unwrap(), limit)
    }
}

impl Drop for Migrate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn fio(uri_or_file: &str, engine: &str, extra: &[&str]) -> String {
    let target = match engine {
        "nbd" => format!("--uri={uri_or_file}"),
        _ => format!("--filename={uri_or_file}"),
    };
    let engine = format!("--ioengine={engine}");
    let mut args = vec![
        "--name=migrate",
        &engine,
        &target,
        "--offset=8M",
        "--size=16M",
    ];
    args.extend(["--io_size=4M", "--randseed=99"]);
    args.extend(extra);
    common::fio(&args)
}

/// fio writes (and verifies) through the export for the whole migration;
/// afterwards fio verifies the destination file itself, and qemu-io checks
/// that everything fio did not touch still holds the source's data.
fn migrate_under_fio(strategy: &str) {
    let dir = scratch();
    let source = source_image(dir.path());
    let destination = image_with(dir.path(), "destination.raw", SIZE, &[]);
    let migrate = Migrate::start(
        source.to_str().unwrap(),
        destination.to_str().unwrap(),
        dir.path(),
        &["--strategy", strategy, "--rate", "12M", "--segsize", "256K"],
    );
    // Light enough for precopy to converge, busy enough to hit every path.
    fio(
        &migrate.uri(),
        "nbd",
        &["--iodepth=16", "--rate_iops=300", "--do_verify=1"],
    );
    let done = migrate.wait_for(&["committed", "failed"], Duration::from_secs(60));
    assert_eq!(done["event"], "committed", "{strategy}: {done}");
    assert_eq!(done["phase"], "committed");
    assert!(done["verified_chunks"].as_u64().unwrap() > 0);
    // The export now serves the destination: fio's data is still there.
    fio(&migrate.uri(), "nbd", &["--iodepth=16", "--verify_only"]);
    assert!(
        migrate.stop().success(),
        "{strategy}: SIGTERM ends dmm migrate with 0"
    );
    fio(destination.to_str().unwrap(), "psync", &["--verify_only"]);
    for mib in (0..SIZE / MIB).filter(|m| !(8..24).contains(m)) {
        let pattern = if mib % 2 == 0 { mib + 1 } else { 0 };
        let command = format!("read -P {pattern} {} 1M", mib * MIB);
        let output = stdout(
            tool("qemu-io")
                .args(["-r", "-f", "raw", "-c", &command])
                .arg(&destination),
        );
        assert!(
            !output.contains("verification failed"),
            "{strategy} at {mib} MiB: {output}"
        );
    }
}

#[test]
fn fio_through_a_precopy_migration() {
    migrate_under_fio("precopy");
}

#[test]
fn fio_through_a_mirror_migration() {
    migrate_under_fio("mirror");
}

#[test]
fn fio_through_an_aio_migration() {
    migrate_under_fio("aio");
}

#[test]
fn fio_through_an_slr_migration() {
    migrate_under_fio("slr");
}

#[test]
fn fio_through_an_lr_migration() {
    migrate_under_fio("lr");
}

#[test]
fn fio_through_a_redirect_migration() {
    migrate_under_fio("redirect");
}

#[test]
fn fio_through_an_auto_migration() {
    migrate_under_fio("auto");
}

#[test]
fn an_idle_migration_leaves_identical_sparse_images() {
    let dir = scratch();
    let source = source_image(dir.path());
    let destination = image_with(dir.path(), "destination.raw", SIZE + MIB, &[]);
    let output = Command::new(DMM)
        .args(["migrate", "--exit-when-done", "--json"])
        .arg(&source)
        .arg(&destination)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = String::from_utf8(output.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "committed");
    assert_eq!(
        last["copied_bytes"],
        SIZE / 2,
        "only allocated data is copied"
    );
    // Compare the volume (the destination may be larger).
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&destination));
    let map = stdout(
        tool("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&destination),
    );
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, SIZE / 2, "the destination stays sparse");
    // dmm verify agrees, and names the offset once they differ.
    run(Command::new(DMM)
        .arg("verify")
        .arg(&source)
        .arg(&destination));
    run(tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xee 5000000 1"])
        .arg(&destination));
    let differs = Command::new(DMM)
        .arg("verify")
        .arg(&source)
        .arg(&destination)
        .output()
        .unwrap();
    assert_eq!(differs.status.code(), Some(1));
    let message = String::from_utf8_lossy(&differs.stderr);
    assert!(message.contains("5000000"), "{message}");
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let dir = scratch();
    let source = source_image(dir.path());
    let small = image_with(dir.path(), "small.raw", MIB, &[]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![source.display().to_string(), small.display().to_string()],
            "less than the source",
        ),
        (
            vec![source.display().to_string(), source.display().to_string()],
            "same file",
        ),
        (
            vec![
                source.display().to_string(),
                dir.path().join("missing.raw").display().to_string(),
            ],
            "missing.raw",
        ),
        (
            vec![
                source.display().to_string(),
                small.display().to_string(),
                "--strategy".into(),
                "fast".into(),
            ],
            "precopy, mirror",
        ),
        (
            vec![
                source.display().to_string(),
                small.display().to_string(),
                "--segsize".into(),
                "12Q".into(),
            ],
            "not a size",
        ),
    ];
    for (args, expected) in cases {
        let output = Command::new(DMM)
            .arg("migrate")
            .args(&args)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--exit-when-done")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} must be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Kill -9 trials to run: `DMM_KILL_TRIALS` (`scripts/kill-soak` runs
/// 1,000), else 21 (three per strategy).
fn kill_trials() -> usize {
    std::env::var("DMM_KILL_TRIALS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(21)
}

#[test]
fn kill_9_at_random_instants_loses_no_acknowledged_write() {
    let strategies = ["lr", "redirect", "auto", "aio", "mirror", "slr", "precopy"];
    let mut seed = common::soak_seed(0x2545_f491_4f6c_dd1d);
    let (trials, mut checked) = (kill_trials(), 0);
    for trial in 0..trials {
        let strategy = strategies[trial % strategies.len()];
        let dir = scratch();
        let source = source_image(dir.path());
        let destination = image_with(dir.path(), "destination.raw", SIZE, &[]);
        let args = ["--strategy", strategy, "--rate", "10M", "--segsize", "256K"];
        let (src, dst) = (source.to_str().unwrap(), destination.to_str().unwrap());
        let migrate = Migrate::start(src, dst, dir.path(), &args);
        let writer = FuaWriter::start(migrate.uri(), 41);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Somewhere in the copy (about 2.5 s at this rate) or the switch,
        // once the writer is under way (a loaded machine is slow to start).
        let started = Instant::now();
        while writer.acked() == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "trial {trial}: the writer got nothing acknowledged; dmm said:\n{}",
                migrate.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200 + seed % 2800));
        migrate.kill();
        let sent = writer.finish();

        let resumed = Migrate::start(src, dst, dir.path(), &args);
        let done = resumed.wait_for(&["committed", "failed"], Duration::from_secs(60));
        assert_eq!(
            done["event"], "committed",
            "trial {trial} ({strategy}): {done}"
        );
        // Every acknowledged FUA write reads back, through the export...
        let what = format!("trial {trial} ({strategy}): an acknowledged write was lost");
        check_sent(&resumed.uri(), &sent, &what);
        assert!(resumed.stop().success());
        // ...and in the destination image itself.
        check_sent(destination.to_str().unwrap(), &sent, &what);
        checked += sent.acked.len();
    }
    eprintln!("volume kill -9: {trials} trials, {checked} acknowledged FUA writes checked, 0 lost");
}

#[test]
fn a_restarted_migration_resumes_from_its_saved_position() {
    let dir = scratch();
    let source = source_image(dir.path());
    let destination = image_with(dir.path(), "destination.raw", SIZE, &[]);
    let (src, dst) = (source.to_str().unwrap(), destination.to_str().unwrap());
    let args = ["--strategy", "lr", "--rate", "8M", "--segsize", "256K"];
    let migrate = Migrate::start(src, dst, dir.path(), &args);
    // Past a checkpoint that recorded some copying (every 2 s), before the
    // end, however slowly the machine runs.
    wait_for_a_new_checkpoint(&dir.path().join("state/migrations"));
    migrate.kill();
    let resumed = Migrate::start(src, dst, dir.path(), &args);
    let first = resumed.started();
    let copied = first["copied_bytes"].as_u64().unwrap();
    assert!(copied >= 2 * MIB, "resumed from zero: {first}");
    assert!(first["chunks_on_destination"].as_u64().unwrap() > 0);
    let done = resumed.wait_for(&["committed"], Duration::from_secs(60));
    let total = done["copied_bytes"].as_u64().unwrap();
    assert!(
        total < SIZE / 2 + 8 * MIB,
        "the restart copied everything again: {total}"
    );
    assert!(resumed.stop().success());
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&destination));
}

/// Waits until the checkpoint of the one migration under `migrations`
/// has been replaced once after it first appeared.
fn wait_for_a_new_checkpoint(migrations: &Path) {
    let started = Instant::now();
    let modified = || -> Option<std::time::SystemTime> {
        let dir = std::fs::read_dir(migrations).ok()?.next()?.ok()?.path();
        std::fs::metadata(dir.join("checkpoint"))
            .ok()?
            .modified()
            .ok()
    };
    let mut first = None;
    loop {
        match (first, modified()) {
            (None, Some(at)) => first = Some(at),
            (Some(before), Some(at)) if at != before => return,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no new checkpoint in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An nbdkit memory export whose writes start failing with `errno` once
/// the trigger file exists.
fn failing_destination(dir: &Path, errno: &str) -> (Child, PathBuf, PathBuf) {
    let socket = dir.join("nbdkit.sock");
    let trigger = dir.join("fail-now");
    let child = tool("nbdkit")
        .args(["-f", "-U"])
        .arg(&socket)
        .args(["--filter=error", "memory", &SIZE.to_string()])
        .arg(format!("error-pwrite={errno}"))
        .arg(format!("error-zero={errno}"))
        .arg("error-pwrite-rate=100%")
        .arg("error-zero-rate=100%")
        .arg(format!("error-pwrite-file={}", trigger.display()))
        .arg(format!("error-zero-file={}", trigger.display()))
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, socket, trigger)
}

fn destination_fails_mid_copy(errno: &str, strategy: &str, expected: &str) {
    let dir = scratch();
    let source = source_image(dir.path());
    let (mut kit, socket, trigger) = failing_destination(dir.path(), errno);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let migrate = Migrate::start(
        source.to_str().unwrap(),
        &uri,
        dir.path(),
        &["--strategy", strategy, "--rate", "8M", "--segsize", "256K"],
    );
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&trigger, b"").unwrap();
    let failed = migrate.wait_for(&["failed"], Duration::from_secs(30));
    let error = failed["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(error.contains(expected), "{strategy}: {failed}");
    // The source is complete for this strategy: clients keep working.
    let output = stdout(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 3M 64k",
        "-c",
        "read -P 0x5a 3M 64k",
        "-c",
        "read -P 1 0 1M",
        &migrate.uri(),
    ]));
    assert!(!output.contains("failed"), "{output}");
    let status = migrate.stop();
    assert!(!status.success(), "a failed migration exits non-zero");
    let _ = kit.kill();
    let _ = kit.wait();
    // The write went to the source.
    let output = stdout(
        tool("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0x5a 3M 64k"])
            .arg(&source),
    );
    assert!(!output.contains("verification failed"), "{output}");
}

#[test]
fn destination_enospc_stops_the_migration_and_clients_keep_the_source() {
    destination_fails_mid_copy("ENOSPC", "mirror", "no space");
}

#[test]
fn destination_eio_stops_the_migration_and_clients_keep_the_source() {
    destination_fails_mid_copy("EIO", "precopy", "i/o error");
}

#[test]
fn a_source_read_error_names_the_offset() {
    let dir = scratch();
    let source_image = source_image(dir.path());
    let socket = dir.path().join("source.sock");
    let trigger = dir.path().join("fail-now");
    let mut kit = tool("nbdkit")
        .args(["-f", "-U"])
        .arg(&socket)
        .args(["--filter=error", "file"])
        .arg(&source_image)
        .args(["error-pread=EIO", "error-pread-rate=100%"])
        .arg(format!("error-pread-file={}", trigger.display()))
        .spawn()
        .unwrap();
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let destination = image_with(dir.path(), "destination.raw", SIZE, &[]);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let migrate = Migrate::start(
        &uri,
        destination.to_str().unwrap(),
        dir.path(),
        &["--strategy", "lr", "--rate", "8M", "--segsize", "256K"],
    );
    std::thread::sleep(Duration::from_millis(400));
    std::fs::write(&trigger, b"").unwrap();
    let failed = migrate.wait_for(&["failed"], Duration::from_secs(30));
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("read") && error.contains("offset"),
        "{failed}"
    );
    // Reads of uncopied data now fail: an error, never wrong data.
    let read = tool("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 47 46M 64k",
            &migrate.uri(),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&read.stdout) + String::from_utf8_lossy(&read.stderr);
    assert!(!said.contains("verification failed"), "{said}");
    drop(migrate);
    let _ = kit.kill();
    let _ = kit.wait();
}

#[test]
fn lr_with_a_failing_destination_returns_errors_never_wrong_data() {
    let dir = scratch();
    let source = source_image(dir.path());
    let (mut kit, socket, trigger) = failing_destination(dir.path(), "EIO");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let migrate = Migrate::start(
        source.to_str().unwrap(),
        &uri,
        dir.path(),
        &["--strategy", "lr", "--rate", "8M", "--segsize", "256K"],
    );
    std::thread::sleep(Duration::from_millis(700));
    std::fs::write(&trigger, b"").unwrap();
    let failed = migrate.wait_for(&["failed"], Duration::from_secs(30));
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("I/O error"),
        "{failed}"
    );
    // The first MiB was copied: it lives on the destination now. Writing it
    // fails (the destination refuses); reading it still returns its data.
    let write = tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 64k", &migrate.uri()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&write.stdout) + String::from_utf8_lossy(&write.stderr);
    assert!(said.contains("error") || !write.status.success(), "{said}");
    let read =
        stdout(tool("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 1 0 1M", &migrate.uri()]));
    assert!(!read.contains("verification failed"), "{read}");
    // Uncopied chunks still live on the source, writable.
    let tail = stdout(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x44 46M 64k",
        "-c",
        "read -P 0x44 46M 64k",
        &migrate.uri(),
    ]));
    assert!(!tail.contains("failed"), "{tail}");
    drop(migrate);
    let _ = kit.kill();
    let _ = kit.wait();
}

/// An interactive qemu-io: one client that stays connected until it quits.
struct Client {
    child: Child,
}

impl Client {
    fn connect(uri: &str) -> Client {
        let child = tool("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-io");
        Client { child }
    }

    fn send(&mut self, command: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    /// Quits (qemu-io reads its input to the end before it exits).
    fn quit(mut self) {
        self.send("quit");
        drop(self.child.stdin.take());
        assert!(
            wait_with_timeout(&mut self.child, Duration::from_secs(10)).is_some(),
            "qemu-io quits"
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--exit-when-done` with a client connected keeps serving it from the
/// destination until it disconnects; `=force` exits at once.
#[test]
fn exit_when_done_waits_for_the_last_client() {
    let dir = scratch();
    let source = source_image(dir.path());
    let destination = image_with(dir.path(), "destination.raw", SIZE, &[]);
    let (src, dst) = (source.to_str().unwrap(), destination.to_str().unwrap());
    let mut migrate = Migrate::start(src, dst, dir.path(), &["--exit-when-done", "--rate", "32M"]);
    let mut client = Client::connect(&migrate.uri());
    client.send("write -P 0x5a 1M 64k");
    migrate.wait_for(&["committed"], Duration::from_secs(60));
    let waiting = migrate.wait_for(&["waiting-for-clients"], Duration::from_secs(10));
    assert_eq!(waiting["clients"], 1);
    assert!(
        migrate.exits_within(Duration::from_secs(2)).is_none(),
        "dmm keeps serving the connected client"
    );
    // Still served: a write after the commit lands on the destination.
    client.send("write -P 0x6b 3M 64k");
    client.quit();
    let status = migrate
        .exits_within(Duration::from_secs(10))
        .expect("dmm exits once the last client is gone");
    assert!(status.success());
    migrate.wait_for(&["clients-gone"], Duration::from_secs(1));
    common::qemu_io_checks(
        dst,
        true,
        &["read -P 0x5a 1M 64k".into(), "read -P 0x6b 3M 64k".into()],
        "a client's write is missing from the destination",
    );

    // Once committed, a second run finds nothing to do; with =force it
    // exits although a client is connected.
    let mut migrate = Migrate::start(
        src,
        dst,
        &dir.path().join("again"),
        &["--exit-when-done=force"],
    );
    let client = Client::connect(&migrate.uri());
    let status = migrate
        .exits_within(Duration::from_secs(30))
        .expect("=force exits");
    assert!(status.success());
    drop(client);
}

/// The NBD destination is killed in the middle of the copy (losing what it
/// had not flushed) and started again 2 s later: the migration waits,
/// reconnects, sends the unflushed writes again, goes on and commits; every
/// FUA write a client had acknowledged reads back through the export and
/// from the destination image.
#[test]
fn an_nbd_destination_killed_and_restarted_loses_nothing_and_the_migration_goes_on() {
    for strategy in ["mirror", "lr"] {
        let dir = scratch();
        let source = source_image(dir.path());
        let image = image_with(dir.path(), "destination.raw", SIZE, &[]);
        let socket = dir.path().join("destination.sock");
        let mut server = dmm_testkit::caching_nbdkit(&socket, &image);
        let destination = format!("nbd+unix:///?socket={}", socket.display());
        let args = ["--strategy", strategy, "--rate", "16M", "--segsize", "256K"];
        let migrate = Migrate::start(source.to_str().unwrap(), &destination, dir.path(), &args);
        let writer = FuaWriter::start(migrate.uri(), 41);
        std::thread::sleep(Duration::from_millis(1500));
        server.kill().unwrap();
        server.wait().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let mut server = dmm_testkit::caching_nbdkit(&socket, &image);

        let done = migrate.wait_for(&["committed", "failed"], Duration::from_secs(90));
        assert_eq!(
            done["event"],
            "committed",
            "{strategy}: {done}\n{}",
            migrate.stderr.lock().unwrap()
        );
        let sent = writer.finish();
        assert!(
            sent.acked.len() > 100,
            "{strategy}: the client kept writing"
        );
        let what = format!("{strategy}: an acknowledged write was lost");
        check_sent(&migrate.uri(), &sent, &what);
        let stderr = migrate.stderr.lock().unwrap().clone();
        assert!(migrate.stop().success());
        assert!(stderr.contains("reconnected"), "{strategy}: {stderr}");
        terminate(&server);
        server.wait().unwrap();
        check_sent(image.to_str().unwrap(), &sent, &what);
    }
}

/// How the state directory fails.
#[derive(Clone, Copy, Debug)]
enum StateFault {
    /// Its file system fills up.
    Full,
    /// Its file system turns read-only (ext4 after an error).
    ReadOnly,
}

/// The state directory (a small ext4 on a loop device) fails in the middle
/// of the copy: the migration stops with an error naming it, the FUA
/// writer and qemu-io keep working through the export, and once the file
/// system is mended the same command resumes the migration to a commit
/// that kept every acknowledged write.
fn state_directory_fails_mid_copy(fault: StateFault, strategy: &str) {
    let what = format!("{fault:?}, {strategy}");
    let dir = scratch();
    let source = source_image(dir.path());
    let destination = image_with(dir.path(), "destination.raw", SIZE, &[]);
    let state = dir.path().join("state");
    let mount = LoopMount::new(&dir.path().join("state.img"), &state, 16);
    let (src, dst) = (source.to_str().unwrap(), destination.to_str().unwrap());
    let args = ["--strategy", strategy, "--rate", "8M", "--segsize", "256K"];
    let migrate = Migrate::start(src, dst, dir.path(), &args);
    let writer = FuaWriter::start(migrate.uri(), 41);
    std::thread::sleep(Duration::from_millis(1000));
    // ext4 turned read-only by an error fails the writes under way when it
    // happens with EIO (its journal aborts) and the later ones with EROFS.
    let (filler, causes): (_, &[&str]) = match fault {
        StateFault::Full => (Some(mount.fill()), &["No space left on device"]),
        StateFault::ReadOnly => {
            mount.trigger_error();
            (None, &["Read-only file system", "Input/output error"])
        }
    };
    let failed = migrate.wait_for(&["failed"], Duration::from_secs(30));
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(state.to_str().unwrap()) && causes.iter().any(|c| error.contains(c)),
        "{what}: {failed}"
    );
    // Clients keep working: the FUA writer goes on, qemu-io writes, reads
    // and flushes.
    let acked = writer.acked();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        writer.acked() > acked + 50,
        "{what}: the writer stalled after the failure\n{}",
        migrate.stderr.lock().unwrap()
    );
    let output = stdout(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 43M 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0x5a 43M 64k",
        "-c",
        "read -P 45 44M 1M",
        &migrate.uri(),
    ]));
    assert!(!output.contains("failed"), "{what}: {output}");
    let sent = writer.finish();
    assert!(
        !migrate.stop().success(),
        "{what}: a failed migration exits non-zero"
    );

    match filler {
        Some(filler) => std::fs::remove_file(filler).unwrap(),
        None => mount.repair(),
    }
    let resumed = Migrate::start(src, dst, dir.path(), &args);
    let done = resumed.wait_for(&["committed", "failed"], Duration::from_secs(60));
    assert_eq!(done["event"], "committed", "{what}: {done}");
    let lost = format!("{what}: an acknowledged write was lost");
    check_sent(&resumed.uri(), &sent, &lost);
    assert!(resumed.stop().success());
    check_sent(dst, &sent, &lost);
    let output = stdout(tool("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 43M 64k",
        "-c",
        "read -P 45 44M 1M",
        dst,
    ]));
    assert!(!output.contains("failed"), "{what}: {output}");
}

#[test]
fn a_full_state_directory_stops_the_migration_and_clients_keep_working() {
    state_directory_fails_mid_copy(StateFault::Full, "lr");
    state_directory_fails_mid_copy(StateFault::Full, "mirror");
}

#[test]
fn a_read_only_state_directory_stops_the_migration_and_clients_keep_working() {
    state_directory_fails_mid_copy(StateFault::ReadOnly, "redirect");
    state_directory_fails_mid_copy(StateFault::ReadOnly, "precopy");
}
