//! Tree migrations through the daemon and the CLI, end to end: create with
//! `-p kind=tree`, work through the FUSE access point while it runs, kill -9
//! the daemon, check the access point comes back with every change, commit,
//! and let rsync and cmp judge the target. Also: the bad-input table for
//! trees, and a source file the daemon cannot read.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Daemon, NOBODY, build_source, create_tree, dirs, is_mountpoint, p, pattern, rsync_differences,
    tool,
};

#[test]
fn a_tree_migration_is_used_survives_kill_9_of_the_daemon_and_commits() {
    let d = dirs();
    build_source(&d.source);
    let daemon = Daemon::start(&d.state, &[]);
    // Slow enough that the daemon dies in the middle.
    let migid = create_tree(&daemon, &d, &["rate=4M", "maxdfproc=2"]);
    assert!(is_mountpoint(&d.access), "the access point is mounted");

    // Work through the access point while the migration runs.
    let big = fs::read(d.access.join("keep/big2")).unwrap();
    assert!(big == pattern(6 << 20, 2), "a large file reads back whole");
    fs::rename(d.access.join("moved"), d.access.join("renamed")).unwrap();
    fs::remove_dir_all(d.access.join("gone")).unwrap();
    let mut new = fs::File::create(d.access.join("renamed/new-file")).unwrap();
    new.write_all(&pattern(200_000, 7)).unwrap();
    new.sync_all().unwrap();
    drop(new);
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(d.access.join("keep/d2/f3"))
        .unwrap();
    log.write_all(b"appended line\n").unwrap();
    log.sync_all().unwrap();
    drop(log);
    let stat = daemon.ok(&["stat", &migid]);
    assert!(stat.contains("files") && stat.contains("running"), "{stat}");
    let before = daemon.json(&["stat", &migid]);
    assert_eq!(before["progress"]["kind"], "tree", "{before}");
    assert!(
        !before["progress"]["complete"].as_bool().unwrap(),
        "the migration finished too soon for this test: {before}"
    );

    daemon.kill();
    // The dead daemon leaves a broken mount behind; the new one clears it
    // and mounts again.
    let daemon = Daemon::start(&d.state, &[]);
    let started = Instant::now();
    while !is_mountpoint(&d.access) || fs::read_dir(&d.access).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            panic!("no remount: {}", daemon.ok(&["log", &migid]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.access.join("renamed/d1/f4").exists(), "rename kept");
    assert!(!d.access.join("moved").exists(), "old name resurrected");
    assert!(
        !d.access.join("gone").exists(),
        "deleted subtree resurrected"
    );
    assert_eq!(
        fs::read(d.access.join("renamed/new-file")).unwrap(),
        pattern(200_000, 7)
    );
    daemon.ok(&["set", &migid, "-p", "rate=0"]);
    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(120));
    let log = daemon.ok(&["log", &migid]);
    assert!(log.contains("daemon restart"), "{log}");
    daemon.ok(&["commit", &migid]);
    assert!(
        !is_mountpoint(&d.access),
        "commit unmounts the access point"
    );
    assert!(daemon.stop().success());

    // The target is a plain tree: untouched parts equal the source...
    let differences = rsync_differences(&d.source.join("keep/d0"), &d.target.join("keep/d0"));
    assert!(differences.is_empty(), "{differences}");
    for i in 0..3 {
        let name = format!("keep/big{i}");
        let status = tool("cmp")
            .arg(d.source.join(&name))
            .arg(d.target.join(&name))
            .status()
            .unwrap();
        assert!(status.success(), "{name} differs");
    }
    // ...and the client's changes are there, nothing deleted came back.
    assert!(!d.target.join("gone").exists());
    assert!(!d.target.join("moved").exists());
    assert_eq!(fs::read_dir(d.target.join("renamed")).unwrap().count(), 5);
    assert_eq!(
        fs::read(d.target.join("renamed/new-file")).unwrap(),
        pattern(200_000, 7)
    );
    let appended = fs::read(d.target.join("keep/d2/f3")).unwrap();
    assert!(appended.ends_with(b"appended line\n"));
    let hard = fs::metadata(d.target.join("keep/d1/hard")).unwrap();
    let first = fs::metadata(d.target.join("keep/d0/f0")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(hard.ino(), first.ino(), "one inode stays one inode");
    assert_eq!(
        fs::read_link(d.target.join("keep/soft")).unwrap(),
        PathBuf::from("d0/f1")
    );
}

#[test]
fn a_migration_without_client_changes_leaves_nothing_for_rsync() {
    let d = dirs();
    build_source(&d.source);
    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &[]);
    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(120));
    let stat = daemon.json(&["stat", &migid]);
    assert!(
        stat["progress"]["verified_files"].as_u64().unwrap() > 300,
        "{stat}"
    );
    daemon.ok(&["commit", &migid]);
    assert!(daemon.stop().success());
    let differences = rsync_differences(&d.source, &d.target);
    assert!(differences.is_empty(), "{differences}");
}

#[test]
fn bad_tree_requests_are_refused_with_the_reason() {
    let d = dirs();
    build_source(&d.source);
    let daemon = Daemon::start(&d.state, &[]);
    let refused = |args: &[String], expected: &str| {
        let mut all = vec!["create".to_owned()];
        for a in args {
            all.push("-p".into());
            all.push(a.clone());
        }
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let output = daemon.cli(&all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must be refused");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    let base = |source: &Path, target: &Path, access: &Path| {
        vec![
            "kind=tree".to_owned(),
            format!("source={}", p(source)),
            format!("target={}", p(target)),
            format!("access={}", p(access)),
        ]
    };
    let missing = d.source.join("no-such-dir");
    refused(&base(&missing, &d.target, &d.access), "no-such-dir");
    let mut no_access = base(&d.source, &d.target, &d.access);
    no_access.pop();
    refused(&no_access, "missing property access");
    let mut with_strategy = base(&d.source, &d.target, &d.access);
    with_strategy.push("strategy=lr".into());
    refused(&with_strategy, "applies to volume migrations only");
    fs::write(d.target.join("already-here"), b"x").unwrap();
    refused(&base(&d.source, &d.target, &d.access), "not empty");
    fs::remove_file(d.target.join("already-here")).unwrap();
    fs::write(d.access.join("in-the-way"), b"x").unwrap();
    refused(&base(&d.source, &d.target, &d.access), "not empty");
    fs::remove_file(d.access.join("in-the-way")).unwrap();
    // Nothing was recorded by the refusals; a good request still works.
    let list = daemon.json(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    let migid = create_tree(&daemon, &d, &[]);
    // A second migration onto the same access point is refused.
    let other = d.state.parent().unwrap().join("other");
    fs::create_dir(&other).unwrap();
    refused(&base(&d.source, &other, &d.access), "access");
    let refused_rollback = daemon.cli(&["rollback", &migid]);
    assert!(!refused_rollback.status.success());
    let stderr = String::from_utf8_lossy(&refused_rollback.stderr);
    assert!(stderr.contains("does not roll back"), "{stderr}");
    assert!(daemon.stop().success());
}

#[test]
fn an_unreadable_source_file_is_reported_and_the_rest_migrates() {
    let d = dirs();
    build_source(&d.source);
    let secret = d.source.join("keep/d3/secret");
    fs::write(&secret, b"not for you").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    // A daemon without the capabilities that let root read anything.
    let daemon = Daemon::start_with(&d.state, &[], |command| {
        let mut wrapped = tool("setpriv");
        wrapped
            .args(["--bounding-set", "-dac_override,-dac_read_search"])
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    });
    let migid = create_tree(&daemon, &d, &[]);
    let started = Instant::now();
    let stat = loop {
        let stat = daemon.ok(&["stat", &migid]);
        if stat.contains("secret") {
            break stat;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the unreadable file is never reported: {stat}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(stat.contains("ermission denied"), "{stat}");
    // The daemon writes it to the migration's log as it notices it.
    let started = Instant::now();
    while !daemon.ok(&["log", &migid]).contains("secret") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not in the log"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything else arrives; the migration is not complete, so commit is
    // refused with the reason.
    let started = Instant::now();
    loop {
        let json = daemon.json(&["stat", &migid]);
        let progress = &json["progress"];
        if progress["files_done"].as_u64().unwrap() + 1 == progress["files_total"].as_u64().unwrap()
            && progress["dirs_done"] == progress["dirs_total"]
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{json}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let commit = daemon.cli(&["commit", &migid]);
    assert!(!commit.status.success());
    assert!(daemon.stop().success());
    let differences = rsync_differences(&d.source.join("keep/d0"), &d.target.join("keep/d0"));
    assert!(differences.is_empty(), "{differences}");
}

/// A client walks more files than the daemon may hold open: the access
/// point cannot keep a descriptor for every inode the kernel remembers,
/// and must still find each one again, across renames and unlinks.
#[test]
fn a_client_walks_more_files_than_the_daemon_may_open() {
    const DIRS: usize = 30;
    const FILES: usize = 100;
    let d = dirs();
    for dir in 0..DIRS {
        let path = d.source.join(format!("d{dir:02}"));
        fs::create_dir(&path).unwrap();
        for file in 0..FILES {
            fs::write(
                path.join(format!("f{file}")),
                pattern(300 + file, dir as u8),
            )
            .unwrap();
        }
    }
    // 512 descriptors, and no capability to raise the limit.
    let daemon = Daemon::start_with(&d.state, &[], |command| {
        let mut wrapped = tool("prlimit");
        wrapped
            .arg("--nofile=512:512")
            .arg("setpriv")
            .args(["--bounding-set", "-sys_resource"])
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    });
    let migid = create_tree(&daemon, &d, &["rate=2M"]);

    // rsync reads every file through the access point while it migrates.
    let copy = d.state.with_file_name("copy");
    let status = tool("rsync")
        .arg("-a")
        .arg(format!("{}/", p(&d.access)))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success(), "rsync through the access point");
    let differences = rsync_differences(&d.source, &copy);
    assert!(differences.is_empty(), "{differences}");

    // Inodes the kernel still remembers, reached again after a rename of
    // their directory and while unlinked but open.
    let kept_open = fs::File::open(d.access.join("d07/f3")).unwrap();
    fs::rename(d.access.join("d07"), d.access.join("renamed")).unwrap();
    for file in 0..FILES {
        let data = fs::read(d.access.join(format!("renamed/f{file}"))).unwrap();
        assert!(data == pattern(300 + file, 7), "renamed/f{file}");
    }
    fs::remove_file(d.access.join("renamed/f3")).unwrap();
    assert_eq!(kept_open.metadata().unwrap().len(), 303);
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &kept_open, &mut data).unwrap();
    assert!(data == pattern(303, 7), "an unlinked open file reads back");
    drop(kept_open);

    daemon.ok(&["set", "-p", "rate=0", &migid]);
    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(120));
    daemon.ok(&["commit", &migid]);
    assert!(daemon.stop().success());
    // The client's changes, made to the source too; the times of the two
    // directories they touched differ, so rsync leaves directory times out.
    fs::rename(d.source.join("d07"), d.source.join("renamed")).unwrap();
    fs::remove_file(d.source.join("renamed/f3")).unwrap();
    let output = tool("rsync")
        .args(["-aHAXn", "--checksum", "-i", "--delete", "--omit-dir-times"])
        .arg(format!("{}/", p(&d.source)))
        .arg(format!("{}/", p(&d.target)))
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "");
}

/// SIGTERM while clients keep the access point busy: one holds a file open,
/// one reads files not migrated yet, one lists a directory being populated
/// on demand. `dmm stat` answers meanwhile, the daemon stops within
/// seconds, the clients get an error rather than hang, and a restarted
/// daemon carries on to a complete, correct migration.
#[test]
fn sigterm_stops_the_daemon_within_seconds_while_clients_use_the_access_point() {
    const ENTRIES: usize = 20_000;
    let d = dirs();
    build_source(&d.source);
    let huge = d.source.join("huge");
    fs::create_dir(&huge).unwrap();
    for i in 0..ENTRIES {
        fs::write(huge.join(format!("entry-{i:05}")), i.to_string()).unwrap();
    }
    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &["rate=1M"]);
    daemon.ok(&["pause", &migid]);

    let held = fs::File::open(d.access.join("keep/d0/f0")).unwrap();
    let reader_access = d.access.clone();
    let reader = std::thread::spawn(move || {
        // Reads until the access point goes away under it.
        for round in 0.. {
            let name = format!("keep/big{}", round % 3);
            if fs::read(reader_access.join(name)).is_err() {
                return round;
            }
        }
        unreachable!()
    });
    let mut lister = tool("ls")
        .arg("-f")
        .arg(d.access.join("huge"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let asked = Instant::now();
        let stat = daemon.ok(&["stat", &migid]);
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "dmm stat took {took:?}: {stat}"
        );
    }
    let population_in_flight = lister.try_wait().unwrap().is_none();

    let stopping = Instant::now();
    let status = daemon.stop_within(Duration::from_secs(15));
    let took = stopping.elapsed();
    let status = status.unwrap_or_else(|| panic!("no exit {took:?} after SIGTERM"));
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(12),
        "the daemon took {took:?} to stop"
    );
    assert!(!is_mountpoint(&d.access), "the access point is detached");
    let listed = common::wait_with_timeout(&mut lister, Duration::from_secs(5));
    assert!(listed.is_some(), "ls still hangs after the daemon stopped");
    let rounds = reader.join().unwrap();
    let mut buf = [0u8; 16];
    let read = std::os::unix::fs::FileExt::read_at(&held, &mut buf, 0);
    assert!(read.is_err(), "an open file fails once the daemon is gone");
    drop(held);

    let daemon = Daemon::start(&d.state, &[]);
    daemon.ok(&["resume", &migid]);
    daemon.ok(&["set", &migid, "-p", "rate=0"]);
    let started = Instant::now();
    while fs::read_dir(d.access.join("huge")).map_or(0, Iterator::count) != ENTRIES {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the huge directory is not back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(300));
    daemon.ok(&["commit", &migid]);
    assert!(daemon.stop().success());
    let differences = rsync_differences(&d.source, &d.target);
    assert!(differences.is_empty(), "{differences}");
    eprintln!(
        "stopped in {took:?}; population in flight at SIGTERM: {population_in_flight}; \
         the reader read {rounds} large files"
    );
}

/// A tree migration throttled to 256 KiB/s answers stop, halt and
/// delete -f within 2 s while its workers are waiting for bandwidth.
#[test]
fn tree_verbs_answer_within_2s_whatever_the_rate_limit() {
    let d = dirs();
    build_source(&d.source);
    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &["rate=256K"]);
    let limit = Duration::from_secs(2);
    for verb in ["stop", "halt", "delete"] {
        std::thread::sleep(Duration::from_millis(1500));
        let args: Vec<&str> = match verb {
            "stop" => vec!["stop", &migid],
            "halt" => vec!["halt", "--keep", &migid],
            _ => vec!["delete", "-f", &migid],
        };
        let asked = Instant::now();
        daemon.ok(&args);
        let took = asked.elapsed();
        assert!(took < limit, "{args:?} took {took:?}");
        assert!(
            !is_mountpoint(&d.access),
            "{verb} unmounts the access point"
        );
        if verb != "delete" {
            daemon.ok(&["start", &migid]);
        }
    }
    assert!(daemon.stop().success());
}

/// The same small tree of owners and modes under `root`: files of root
/// (private, public, readable by nobody's group), a directory nobody owns,
/// a root directory, a private directory and a sticky one.
fn permissions_tree(root: &Path) {
    use std::os::unix::fs::{PermissionsExt, chown};
    let mode = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    for dir in ["mine", "roots", "private", "sticky"] {
        fs::create_dir(root.join(dir)).unwrap();
    }
    for (file, text, bits) in [
        ("secret", "secret\n", 0o600),
        ("public", "hello\n", 0o644),
        ("group", "group\n", 0o640),
        ("mine/own", "own\n", 0o600),
        ("sticky/roots", "root's\n", 0o666),
        ("private/inside", "inside\n", 0o644),
    ] {
        fs::write(root.join(file), text).unwrap();
        mode(&root.join(file), bits);
    }
    chown(root.join("group"), None, Some(NOBODY)).unwrap();
    chown(root.join("mine"), Some(NOBODY), Some(NOBODY)).unwrap();
    chown(root.join("mine/own"), Some(NOBODY), Some(NOBODY)).unwrap();
    mode(&root.join("private"), 0o700);
    mode(&root.join("sticky"), 0o1777);
    mode(root, 0o755);
}

/// Runs `script` in `dir` as nobody: whether it succeeded, its output,
/// and the error it met.
fn nobody_runs(dir: &Path, script: &str) -> (bool, String, &'static str) {
    let output = dmm_testkit::as_nobody(dir, script).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = match () {
        _ if stderr.contains("Permission denied") => "EACCES",
        _ if stderr.contains("Operation not permitted") => "EPERM",
        _ if stderr.is_empty() => "",
        _ => "other",
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), stdout, error)
}

#[test]
fn an_unprivileged_user_gets_exactly_what_the_file_system_under_it_grants() {
    use std::os::unix::fs::PermissionsExt;
    let d = dirs();
    // Every directory on the way is open to others: only the modes of the
    // tree itself decide.
    let scratch = d.source.parent().unwrap();
    for dir in [scratch, &d.source, &d.target, &d.access] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let reference = scratch.join("reference");
    fs::create_dir(&reference).unwrap();
    permissions_tree(&d.source);
    permissions_tree(&reference);
    // Big enough, and slow enough, to be still migrating throughout.
    fs::write(d.source.join("big"), pattern(8 << 20, 1)).unwrap();
    fs::write(reference.join("big"), pattern(8 << 20, 1)).unwrap();
    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &["rate=256K", "access-users=all"]);
    let cases = [
        ("read a private file of root", "cat secret"),
        ("read a public file", "cat public"),
        ("read through the group", "cat group"),
        ("append to root's public file", "echo x >> public"),
        ("create in root's directory", "touch roots/new"),
        ("list a private directory", "ls private"),
        ("read inside a private directory", "cat private/inside"),
        ("read its own private file", "cat mine/own"),
        (
            "create in its own directory",
            "echo new > mine/new && cat mine/new",
        ),
        (
            "make a directory in its own",
            "mkdir mine/sub && ls -d mine/sub",
        ),
        (
            "rename in its own directory",
            "mv mine/new mine/renamed && ls mine",
        ),
        (
            "chmod its own file",
            "chmod 0640 mine/own && stat -c %a mine/own",
        ),
        ("chmod root's file", "chmod 0666 public"),
        ("chown its file to root", "chown 0 mine/own"),
        (
            "own what it creates",
            "touch mine/made && stat -c %u:%g mine/made",
        ),
        (
            "delete root's file in a sticky directory",
            "rm -f sticky/roots",
        ),
        (
            "create in a sticky directory",
            "echo s > sticky/its && cat sticky/its",
        ),
        ("delete a file of root's directory", "rm -f public"),
        ("hard-link root's private file", "ln secret mine/link"),
        ("truncate root's file", "truncate -s 0 group"),
    ];
    let mut refused = 0;
    for (what, script) in cases {
        let through_dmm = nobody_runs(&d.access, script);
        let on_disk = nobody_runs(&reference, script);
        assert_eq!(
            through_dmm, on_disk,
            "{what} ({script}): access point vs the file system"
        );
        refused += usize::from(!on_disk.0);
    }
    // The cases mean something: the file system grants some, refuses others.
    let most = cases.len() - 5;
    assert!(
        (5..most).contains(&refused),
        "{refused} of {} refused",
        cases.len()
    );
    let stat = daemon.json(&["stat", &migid]);
    assert!(
        !stat["progress"]["complete"].as_bool().unwrap(),
        "the migration finished too soon for this test: {stat}"
    );
}

/// By default the access point is the daemon's user's only: another user
/// gets EACCES even where the target's modes would let it in (FUSE without
/// `allow_other`); `access-users=all` opens it to every user.
#[test]
fn only_the_daemons_user_may_use_the_access_point_unless_configured() {
    use std::os::unix::fs::PermissionsExt;
    let d = dirs();
    let scratch = d.source.parent().unwrap();
    for dir in [scratch, &d.source, &d.target, &d.access] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(d.source.join("public"), b"for everyone\n").unwrap();
    fs::set_permissions(d.source.join("public"), fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = Daemon::start(&d.state, &[]);
    let migid = create_tree(&daemon, &d, &[]);
    let (ok, _, error) = nobody_runs(&d.access, "cat public");
    assert!(
        !ok && error == "EACCES",
        "another user, by default: {error}"
    );
    assert!(fs::read(d.access.join("public")).unwrap() == b"for everyone\n");
    daemon.ok(&["halt", "--keep", &migid]);
    daemon.ok(&["set", "-p", "access-users=all", &migid]);
    daemon.ok(&["start", &migid]);
    let started = std::time::Instant::now();
    while !is_mountpoint(&d.access) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not mounted again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let everyone = nobody_runs(&d.access, "cat public");
    assert_eq!(everyone, (true, "for everyone\n".into(), ""));
    assert!(daemon.stop().success());
}
