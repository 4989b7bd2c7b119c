//! Other people's test suites judge the access point, each inside the access
//! point of a migration that is still copying:
//!
//! - pjdfstest (POSIX semantics: modes, owners, permissions, times, every
//!   namespace call, as root and as the unprivileged users it switches to)
//!   may fail nothing that it does not also fail on a plain directory of the
//!   target's file system;
//! - fsx (random reads, writes, truncates, hole punches, allocations,
//!   copies, mapped I/O, each checked against its model) runs clean on a
//!   new file, on source files not migrated yet and on source files the
//!   workers are copying at that moment, with and without mapped I/O, and
//!   as an unprivileged user;
//! - fio with `O_DIRECT` writes and verifies new, pending and copying files.
//!
//! After each, the migration completes and is committed, and what the
//! clients left is what the target holds: the workers overwrote nothing.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Setup, pattern, run, tool, wait_complete, write};
use dmm_control::{Controls, Priority};
use dmm_tree::TreeMigration;

/// The unprivileged user fsx runs as (pjdfstest switches users itself).
const NOBODY: u32 = 65534;

/// Operations per fsx run.
const FSX_OPS: &str = "20000";

/// Source files that are still large when the test starts with them.
const LARGE: usize = 48 << 20;

/// Opens the scratch directory to everyone: pjdfstest and fsx run parts of
/// their work as unprivileged users, who must reach the access point.
fn open_to_everyone(setup: &Setup) {
    let root = setup.config.source.parent().unwrap();
    for dir in [root, &setup.config.target, &setup.config.access] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Waits until the workers have copied some bytes (so that the files they
/// work on are being copied), and checks they are not done.
fn wait_copying(migration: &TreeMigration) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = migration.progress().counts;
        if counts.bytes_done > 2 << 20 {
            assert!(counts.bytes_done < counts.bytes_total, "{counts:?}");
            return;
        }
        assert!(Instant::now() < deadline, "{counts:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Lets the migration run at full speed to the end, verifies and commits.
fn finish(migration: &TreeMigration) {
    migration.controls().set_rate(None);
    migration.controls().resume();
    wait_complete(migration);
    let counts = migration.progress().counts;
    assert_eq!(counts.bytes_done, counts.bytes_total, "{counts:?}");
    let (_, mismatches) = migration.verify();
    assert!(mismatches.is_empty(), "{mismatches:?}");
    migration.commit().unwrap();
}

/// pjdfstest's verdict per test: (failed, skipped) test names.
fn pjdfstest(config: &Path, dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let output = tool("pjdfstest")
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("Summary:"),
        "pjdfstest did not finish: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut failed = BTreeSet::new();
    let mut skipped = BTreeSet::new();
    for line in stdout
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [name, "FAILED"] => failed.insert(name.to_string()),
            [name, "skipped"] => skipped.insert(name.to_string()),
            _ => false,
        };
    }
    (failed, skipped)
}

fn pjdfstest_config(path: &Path) {
    // Two unprivileged users every Debian system has; a naptime above the
    // file systems' timestamp granularity.
    let config = r#"
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.02
allow_remount = false

[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
"#;
    fs::write(path, config).unwrap();
}

#[test]
fn pjdfstest_fails_nothing_the_target_file_system_passes() {
    let setup = Setup::new(|root| {
        for i in 0..3u8 {
            write(&root.join(format!("large{i}")), &pattern(LARGE, i));
        }
    });
    open_to_everyone(&setup);
    let scratch = setup.config.source.parent().unwrap();
    let config = scratch.join("pjdfstest.toml");
    pjdfstest_config(&config);
    let plain = scratch.join("plain");
    fs::create_dir(&plain).unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o755)).unwrap();
    let (plain_failed, plain_skipped) = pjdfstest(&config, &plain);

    let migration = setup.start_with(Controls::new(Some(2 << 20), 1, Priority::Normal));
    wait_copying(&migration);
    let inside = setup.access("pjdfstest");
    fs::create_dir(&inside).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o755)).unwrap();
    let (failed, skipped) = pjdfstest(&config, &inside);
    let counts = migration.progress().counts;
    assert!(
        counts.bytes_done < counts.bytes_total,
        "still copying: {counts:?}"
    );

    let new_failures: Vec<_> = failed.difference(&plain_failed).collect();
    assert!(
        new_failures.is_empty(),
        "pjdfstest fails in the access point only: {new_failures:?}"
    );
    // glibc answers pathconf(_PC_LINK_MAX) from a table of file system
    // types, where FUSE has no entry, so this one test cannot run there.
    let new_skips: Vec<_> = skipped
        .difference(&plain_skipped)
        .filter(|name| *name != "link::link_count_max")
        .collect();
    assert!(
        new_skips.is_empty(),
        "skipped in the access point only: {new_skips:?}"
    );
    fs::remove_dir_all(&inside).unwrap();
    finish(&migration);
    for i in 0..3u8 {
        let target = setup.config.target.join(format!("large{i}"));
        assert!(fs::read(target).unwrap() == pattern(LARGE, i), "large{i}");
    }
}

/// fsx's settings: every operation it has, mapped I/O or not.
fn fsx_config(path: &Path, mapped: bool) {
    let map = if mapped { 10 } else { 0 };
    let config = format!(
        "[weights]\n\
         close_open = 1\nread = 10\nwrite = 10\nmapread = {map}\nmapwrite = {map}\n\
         invalidate = {}\ntruncate = 3\nfsync = 1\nfdatasync = 1\nposix_fallocate = 2\n\
         punch_hole = 2\nsendfile = 1\nposix_fadvise = 1\ncopy_file_range = 3\n",
        u8::from(mapped)
    );
    fs::write(path, config).unwrap();
}

/// One fsx run on `file`, as `user` (root if `None`).
fn fsx(config: &Path, artifacts: &Path, file: &Path, seed: u32, user: Option<u32>) -> Command {
    let mut command = match user {
        Some(uid) => {
            let mut setpriv = tool("setpriv");
            setpriv
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(tool("fsx").get_program());
            setpriv
        }
        None => tool("fsx"),
    };
    command
        .arg("-f")
        .arg(config)
        .args(["-N", FSX_OPS, "-S", &seed.to_string()])
        .arg("-P")
        .arg(artifacts)
        .arg(file);
    command
}

#[test]
fn fsx_runs_clean_on_new_pending_and_copying_files() {
    let names = [
        "copying-mapped",
        "copying-plain",
        "pending-mapped",
        "pending-plain",
    ];
    let setup = Setup::new(|root| {
        for (i, name) in names.iter().enumerate() {
            write(&root.join(name), &pattern(LARGE, i as u8));
        }
        write(&root.join("untouched"), &pattern(LARGE / 4, 9));
    });
    open_to_everyone(&setup);
    let scratch = setup.config.source.parent().unwrap();
    let artifacts = scratch.join("fsx");
    fs::create_dir(&artifacts).unwrap();
    rustix::fs::chown(&artifacts, Some(rustix::fs::Uid::from_raw(NOBODY)), None).unwrap();
    let (mapped, plain) = (scratch.join("mapped.toml"), scratch.join("plain.toml"));
    fsx_config(&mapped, true);
    fsx_config(&plain, false);

    // Two workers copy the two `copying-*` files (names in order) at a
    // limited rate; the `pending-*` files wait their turn.
    let controls = Controls::new(Some(4 << 20), 1, Priority::Normal);
    let migration = setup.start_with(controls);
    wait_copying(&migration);
    let unprivileged = setup.access("nobody");
    fs::create_dir(&unprivileged).unwrap();
    rustix::fs::chown(&unprivileged, Some(rustix::fs::Uid::from_raw(NOBODY)), None).unwrap();
    let mut runs: Vec<(PathBuf, Command)> = Vec::new();
    for (seed, name) in names.iter().enumerate() {
        let config = if name.ends_with("mapped") {
            &mapped
        } else {
            &plain
        };
        let file = setup.access(name);
        runs.push((
            file.clone(),
            fsx(config, &artifacts, &file, seed as u32, None),
        ));
    }
    for (seed, (config, name)) in [(&mapped, "new-mapped"), (&plain, "new-plain")]
        .into_iter()
        .enumerate()
    {
        let file = setup.access(name);
        runs.push((
            file.clone(),
            fsx(config, &artifacts, &file, 10 + seed as u32, None),
        ));
    }
    let file = unprivileged.join("mine");
    runs.push((
        file.clone(),
        fsx(&mapped, &artifacts, &file, 20, Some(NOBODY)),
    ));
    // All at once: the access point serves them side by side.
    let children: Vec<_> = runs
        .into_iter()
        .map(|(file, mut command)| {
            let child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (file, child)
        })
        .collect();
    let mut left = Vec::new();
    for (file, child) in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "fsx on {} failed:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        left.push((file.clone(), fs::read(&file).unwrap()));
    }
    finish(&migration);
    for (file, content) in left {
        let relative = file.strip_prefix(&setup.config.access).unwrap();
        let target = fs::read(setup.config.target.join(relative)).unwrap();
        assert!(
            target == content,
            "{} changed after fsx",
            relative.display()
        );
    }
    let untouched = fs::read(setup.config.target.join("untouched")).unwrap();
    assert!(untouched == pattern(LARGE / 4, 9));
}

/// fio with `O_DIRECT`: aligned random writes, each block verified by its
/// checksum when read back, on `file`'s first `size` bytes.
fn fio_direct(file: &Path, size: usize) -> Command {
    let mut fio = tool("fio");
    fio.arg("--name=direct")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .args([
            "--direct=1",
            "--ioengine=psync",
            "--rw=randwrite",
            "--bs=4k",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ]);
    fio
}

#[test]
fn o_direct_writes_and_reads_are_right_on_new_pending_and_copying_files() {
    const WRITTEN: usize = 8 << 20;
    let setup = Setup::new(|root| {
        write(&root.join("copying"), &pattern(LARGE, 1));
        write(&root.join("pending"), &pattern(LARGE, 2));
        write(&root.join("read-direct"), &pattern(LARGE / 2, 3));
    });
    let migration = setup.start_with(Controls::new(Some(4 << 20), 1, Priority::Normal));
    wait_copying(&migration);
    let files = ["copying", "pending", "new"].map(|name| setup.access(name));
    let fios: Vec<_> = files
        .iter()
        .map(|file| {
            fio_direct(file, WRITTEN)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for fio in fios {
        let output = fio.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    // A pending file read with O_DIRECT, in blocks that span segments.
    let read = run(tool("dd")
        .arg(format!("if={}", setup.access("read-direct").display()))
        .args(["iflag=direct", "bs=768k", "status=none"]));
    assert!(
        read.stdout == pattern(LARGE / 2, 3),
        "O_DIRECT read of a pending file"
    );
    let written: Vec<Vec<u8>> = files
        .iter()
        .map(|file| fs::read(file).unwrap()[..WRITTEN].to_vec())
        .collect();
    finish(&migration);
    for ((name, seed), head) in [("copying", 1), ("pending", 2)].into_iter().zip(&written) {
        let target = fs::read(setup.config.target.join(name)).unwrap();
        assert!(target[..WRITTEN] == head[..], "{name}: fio's blocks");
        assert!(
            target[WRITTEN..] == pattern(LARGE, seed)[WRITTEN..],
            "{name}: the source's bytes past fio's"
        );
    }
    let new = fs::read(setup.config.target.join("new")).unwrap();
    assert!(new == written[2], "new: fio's blocks");
}
