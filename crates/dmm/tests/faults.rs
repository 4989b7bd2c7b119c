//! The fault matrix: each test makes one thing go wrong under a running
//! migration (a target that fills up, a source changed behind dmm's back)
//! and checks that nothing is lost, clients get the system's error, and
//! the migration says what happened and can go on once it is mended.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

/// Waits until `migid` is in `wanted`, a failure allowed: returns the
/// state and the catalog's last message.
fn wait_for(daemon: &Daemon, migid: &str, wanted: &str, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        let stat = daemon.json(&["stat", migid]);
        if stat["state"] == wanted {
            return stat.to_string();
        }
        assert!(
            started.elapsed() < limit,
            "migration {migid} not {wanted} after {limit:?}: {stat}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the migration is ready to commit; the failure shows its
/// progress and the daemon's log.
fn wait_until_done(daemon: &Daemon, d: &Dirs, migid: &str) {
    let started = Instant::now();
    while daemon.state_of(migid) != "switched-over" {
        let log = fs::read_to_string(d.state.with_extension("log")).unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "migration {migid} not done: {}\n{log}",
            daemon.json(&["stat", migid])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A tree target that fills up: the migration fails naming the path and
/// the cause, its copy pauses, clients writing through the access point get
/// ENOSPC, what was copied stays; once space is freed `dmm start` finishes
/// the migration and the target equals the source.
#[test]
fn a_full_tree_target_fails_the_migration_until_space_is_freed() {
    let mut d = dirs();
    // In a directory of their own: the client's file below changes the
    // root's times.
    fs::create_dir(d.source.join("data")).unwrap();
    for i in 0..40u8 {
        let file = d.source.join(format!("data/f{i:02}"));
        fs::write(file, pattern(1 << 20, i)).unwrap();
    }
    // 96 MiB of which a 60 MiB ballast leaves too little for 40 MiB.
    let scratch = d.state.with_file_name("small");
    let _small = LoopMount::new(&scratch.with_extension("img"), &scratch, 96);
    let ballast = scratch.join("ballast");
    fs::write(&ballast, vec![0x5a; 60 << 20]).unwrap();
    let target = scratch.join("target");
    fs::create_dir(&target).unwrap();
    d.target = target;

    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &[]);
    let failed = wait_for(&daemon, &migid, "failed", Duration::from_secs(60));
    let target_path = p(&d.target);
    assert!(
        failed.contains("No space left on device") && failed.contains(&target_path),
        "the failure names the target path and the cause: {failed}"
    );

    // The access point still serves; a client's write gets ENOSPC.
    let written = fs::write(d.access.join("client-file"), vec![1u8; 48 << 20]);
    let err = written.expect_err("a 48 MiB write into a full file system");
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected: {err}");
    fs::remove_file(d.access.join("client-file")).unwrap();
    // The copy is paused: nothing more is written while the admin acts.
    let copied = || daemon.json(&["stat", &migid])["progress"]["bytes_written"].clone();
    let before = copied();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(copied(), before, "the copy of a failed migration is paused");

    fs::remove_file(&ballast).unwrap();
    daemon.ok(&["start", &migid]);
    wait_until_done(&daemon, &d, &migid);
    daemon.ok(&["commit", &migid]);
    let differences = rsync_differences(&d.source.join("data"), &d.target.join("data"));
    assert!(differences.is_empty(), "{differences}");
    assert!(daemon.stop().success());
}

/// Source files changed behind dmm's back while it migrates (rewritten in
/// place, grown, shrunk, before or after their copy): each is copied again,
/// so that the committed target equals the source as it ended, even with
/// verification off.
#[test]
fn source_files_changed_during_a_tree_migration_are_copied_again() {
    let d = dirs();
    for i in 0..24u8 {
        fs::write(d.source.join(format!("f{i:02}")), pattern(1 << 20, i)).unwrap();
    }
    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &["rate=4M", "verify=none"]);
    let started = Instant::now();
    while daemon.json(&["stat", &migid])["progress"]["files_done"].as_u64() < Some(4) {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Copied already (the first ones), and not yet (the last ones).
    for (name, seed, len) in [("f00", 100u8, 1 << 20), ("f23", 101, 1 << 20)] {
        fs::write(d.source.join(name), pattern(len, seed)).unwrap();
    }
    let grown = [pattern(1 << 20, 1), pattern(300_000, 102)].concat();
    fs::write(d.source.join("f01"), grown).unwrap();
    fs::write(d.source.join("f22"), pattern(5000, 103)).unwrap();
    // A hole where the copy had data: stale bytes must not survive.
    let sparse = fs::OpenOptions::new()
        .write(true)
        .open(d.source.join("f02"))
        .unwrap();
    sparse.set_len(0).unwrap();
    sparse.set_len(1 << 20).unwrap();
    drop(sparse);

    wait_until_done(&daemon, &d, &migid);
    daemon.ok(&["commit", &migid]);
    let differences = rsync_differences(&d.source, &d.target);
    assert!(differences.is_empty(), "{differences}");
    assert!(daemon.stop().success());
    let log = fs::read_to_string(d.state.with_extension("log")).unwrap();
    assert!(
        log.contains("changed in the source after dmm copied it"),
        "the daemon's log says what it copied again"
    );
}

/// A tree source that returns EIO in the middle of a file (a FUSE view of
/// a directory that fails reads past 3 MiB of one file): the file is
/// listed in error with its path and cause and retried, never copied as
/// zeros; a client reading it through the access point gets the bytes
/// before the fault and EIO past it; once the source heals, the retry
/// copies it and the committed target equals the source.
#[test]
fn a_tree_source_failing_mid_file_is_retried_and_never_copied_as_zeros() {
    let d = dirs();
    let real = d.state.with_file_name("real");
    fs::create_dir(&real).unwrap();
    for i in 0..8u8 {
        fs::write(real.join(format!("f{i}")), pattern(256 << 10, i)).unwrap();
    }
    let bad = pattern(4 << 20, 77);
    fs::write(real.join("bad"), &bad).unwrap();
    let source = dmm_testkit::FaultySource::mount(&real, &d.source);
    source.fail_reads("bad", 3 << 20);

    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &[]);
    let started = Instant::now();
    let listed = loop {
        let progress = daemon.json(&["stat", &migid])["progress"].clone();
        let errors = progress["errors"].as_array().cloned().unwrap_or_default();
        if let Some(error) = errors.iter().find(|e| e["path"] == "bad") {
            break error.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{progress}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        listed["message"]
            .as_str()
            .is_some_and(|m| m.contains("Input/output error") && m.contains("bad")),
        "the error names the file and the cause: {listed}"
    );

    // Through the access point: right bytes before the fault, EIO past it.
    let file = fs::File::open(d.access.join("bad")).unwrap();
    let mut head = vec![0; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0).unwrap();
    assert!(head == bad[..1 << 20], "the bytes before the fault");
    let mut tail = vec![0; 4096];
    let err = std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, 7 << 19)
        .expect_err("a read past the fault");
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected: {err}");
    drop(file);
    // Never complete while the source fails.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(daemon.state_of(&migid), "running");

    // Healed: a client reading the file gets it whole (it need not wait
    // for the retry's backoff, which may have grown to minutes).
    source.heal();
    assert!(
        fs::read(d.access.join("bad")).unwrap() == bad,
        "the healed file"
    );
    wait_until_done(&daemon, &d, &migid);
    daemon.ok(&["commit", &migid]);
    let differences = rsync_differences(&real, &d.target);
    assert!(differences.is_empty(), "{differences}");
    assert!(fs::read(d.target.join("bad")).unwrap() == bad);
    assert!(source.failed_reads() > 0);
    assert!(daemon.stop().success());
}
