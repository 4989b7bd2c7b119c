//! Tree migrations through a real FUSE access point, checked with rsync
//! and plain file system calls.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Setup, pattern, rsync_differences, wait_complete, within, write};
use dmm_control::{Controls, Priority};
use dmm_tree::{Collision, TreeMigration};

/// A tree with every kind of object the migration must carry over.
fn rich_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    write(&root.join("a/small"), b"hello");
    write(&root.join("a/b/medium"), &pattern(3 << 20, 1));
    let mut sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.seek(SeekFrom::Start(8 << 20)).unwrap();
    sparse.write_all(&pattern(4096, 2)).unwrap();
    sparse.set_len(16 << 20).unwrap();
    write(&root.join("empty"), b"");
    fs::hard_link(root.join("a/small"), root.join("a/b/c/small-link")).unwrap();
    std::os::unix::fs::symlink("../small", root.join("a/b/rel-link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    rustix::fs::setxattr(
        root.join("a/small"),
        "user.origin",
        b"old-server",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::set_permissions(root.join("a/b/medium"), fs::Permissions::from_mode(0o4750)).unwrap();
    std::os::unix::fs::lchown(root.join("a/b/medium"), Some(1234), Some(5678)).unwrap();
    Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06.123456789"])
        .arg(root.join("a/small"))
        .status()
        .unwrap();
}

#[test]
fn a_tree_migrates_with_everything_rsync_checks() {
    let setup = Setup::new(rich_tree);
    let migration = setup.start(false);
    wait_complete(&migration);
    let (checked, mismatches) = migration.verify();
    assert!(mismatches.is_empty(), "{mismatches:?}");
    assert!(checked >= 4, "{checked}");
    migration.commit().unwrap();
    assert_eq!(
        rsync_differences(&setup.config.source, &setup.config.target),
        ""
    );
    let target = &setup.config.target;
    assert_eq!(
        fs::metadata(target.join("a/small")).unwrap().ino(),
        fs::metadata(target.join("a/b/c/small-link")).unwrap().ino()
    );
    assert!(
        fs::metadata(target.join("sparse")).unwrap().blocks() < 64,
        "holes stay holes"
    );
}

#[test]
fn a_read_fetches_only_the_segments_it_needs() {
    let setup = Setup::new(|root| write(&root.join("big"), &pattern(64 << 20, 3)));
    let migration = setup.start(true);
    let mut file = fs::File::open(setup.access("big")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact(&mut head).unwrap();
    assert_eq!(head, pattern(64 << 20, 3)[..4096]);
    let done = migration.progress().counts.bytes_done;
    assert!(done <= 2 << 20, "fetched {done} bytes for a 4 KiB read");
    drop(file);
    migration.controls().resume();
    wait_complete(&migration);
    migration.commit().unwrap();
    assert_eq!(
        fs::read(setup.config.target.join("big")).unwrap(),
        pattern(64 << 20, 3)
    );
}

#[test]
fn client_changes_during_the_migration_are_kept_and_nothing_comes_back() {
    let setup = Setup::new(|root| {
        fs::create_dir_all(root.join("docs/old")).unwrap();
        write(&root.join("docs/old/report"), &pattern(2 << 20, 4));
        write(&root.join("docs/delete-me"), b"gone");
        write(&root.join("log"), &pattern(3 << 20, 5));
        fs::create_dir(root.join("trash")).unwrap();
        write(&root.join("trash/x"), b"x");
    });
    let migration = setup.start(true);
    fs::rename(setup.access("docs/old"), setup.access("docs/new")).unwrap();
    fs::remove_file(setup.access("docs/delete-me")).unwrap();
    fs::remove_dir_all(setup.access("trash")).unwrap();
    let mut log = fs::OpenOptions::new()
        .write(true)
        .open(setup.access("log"))
        .unwrap();
    log.seek(SeekFrom::Start(1 << 20)).unwrap();
    log.write_all(b"client was here").unwrap();
    drop(log);
    let mut appended = fs::OpenOptions::new()
        .append(true)
        .open(setup.access("log"))
        .unwrap();
    appended.write_all(b"tail").unwrap();
    drop(appended);
    fs::create_dir(setup.access("fresh")).unwrap();
    write(&setup.access("fresh/file"), b"new");
    fs::rename(
        setup.access("docs/new/report"),
        setup.access("fresh/report"),
    )
    .unwrap();
    migration.controls().resume();
    wait_complete(&migration);
    let (_, mismatches) = migration.verify();
    assert!(mismatches.is_empty(), "{mismatches:?}");
    migration.commit().unwrap();

    let target = &setup.config.target;
    assert!(!target.join("docs/delete-me").exists());
    assert!(!target.join("trash").exists());
    assert!(!target.join("docs/old").exists());
    assert!(target.join("docs/new").is_dir());
    assert_eq!(
        fs::read(target.join("fresh/report")).unwrap(),
        pattern(2 << 20, 4)
    );
    assert_eq!(fs::read(target.join("fresh/file")).unwrap(), b"new");
    let mut expected = pattern(3 << 20, 5);
    expected[1 << 20..(1 << 20) + 15].copy_from_slice(b"client was here");
    expected.extend_from_slice(b"tail");
    assert_eq!(fs::read(target.join("log")).unwrap(), expected);
}

#[test]
fn a_migration_resumes_from_its_journal() {
    let setup = Setup::new(|root| {
        for i in 0..20 {
            fs::create_dir_all(root.join(format!("d{i}"))).unwrap();
            write(&root.join(format!("d{i}/f")), &pattern(1 << 20, i as u8));
        }
    });
    let migration = setup.start(true);
    assert_eq!(fs::read(setup.access("d3/f")).unwrap(), pattern(1 << 20, 3));
    fs::remove_dir_all(setup.access("d4")).unwrap();
    migration.stop().unwrap();
    let migration = TreeMigration::start(
        &setup.config,
        Arc::new(Controls::new(None, 1, Priority::Normal)),
    )
    .unwrap();
    wait_complete(&migration);
    migration.commit().unwrap();
    assert!(
        !setup.config.target.join("d4").exists(),
        "a deleted directory stays deleted"
    );
    assert_eq!(
        fs::read(setup.config.target.join("d19/f")).unwrap(),
        pattern(1 << 20, 19)
    );
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let setup = Setup::new(|root| write(&root.join("f"), b"x"));
    let mut config = setup.config.clone();
    write(&config.target.join("already-here"), b"y");
    let err = dmm_tree::check(&config, true).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    config.collision = Collision::Overwrite;
    dmm_tree::check(&config, true).unwrap();
    config.source = config.source.join("missing");
    let err = dmm_tree::check(&config, true).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    let mut config = setup.config.clone();
    fs::remove_file(config.target.join("already-here")).unwrap();
    write(&config.access.join("busy"), b"z");
    let err = dmm_tree::check(&config, true).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    config.access = config.target.clone();
    config.target = config.source.join("inside");
    fs::create_dir(&config.target).unwrap();
    let err = dmm_tree::check(&config, true).unwrap_err().to_string();
    assert!(err.contains("overlap"), "{err}");
}

#[test]
fn a_vanished_source_file_is_listed_and_does_not_stop_the_rest() {
    let setup = Setup::new(|root| {
        write(&root.join("keeps"), &pattern(1 << 20, 6));
        write(&root.join("vanishes"), &pattern(1 << 20, 7));
    });
    let migration = setup.start(true);
    // Populates the root, so both files have placeholders.
    assert_eq!(fs::read_dir(setup.access("")).unwrap().count(), 2);
    fs::remove_file(setup.config.source.join("vanishes")).unwrap();
    migration.controls().resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    let progress = loop {
        let progress = migration.progress();
        if progress.counts.files_done == 1 && !progress.errors.is_empty() {
            break progress;
        }
        assert!(Instant::now() < deadline, "{progress:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        progress.errors[0].path.ends_with("vanishes"),
        "{progress:?}"
    );
    assert!(
        progress.errors[0].message.contains("No such file"),
        "{progress:?}"
    );
    assert!(!migration.is_complete());
    let err = fs::read(setup.access("vanishes")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(2), "{err}");
    // The admin's way out: the file is gone at the source, so remove it.
    fs::remove_file(setup.access("vanishes")).unwrap();
    wait_complete(&migration);
    migration.commit().unwrap();
    assert_eq!(
        fs::read(setup.config.target.join("keeps")).unwrap(),
        pattern(1 << 20, 6)
    );
}

#[test]
fn tar_extracts_and_reads_through_the_access_point_during_the_migration() {
    let setup = Setup::new(|root| {
        for d in 0..10 {
            fs::create_dir_all(root.join(format!("old/d{d}"))).unwrap();
            for f in 0..20 {
                let data = pattern(1000 + 997 * f, (d * 20 + f) as u8);
                write(&root.join(format!("old/d{d}/f{f}")), &data);
            }
        }
    });
    let archive = setup.config.journal.with_file_name("new.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&setup.config.source)
        .arg("old")
        .status()
        .unwrap();
    assert!(status.success());
    let migration = setup.start(true);
    fs::create_dir(setup.access("new")).unwrap();
    // Reads every pending file of `old` while writing a copy under `new`.
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(setup.access("new"))
        .status()
        .unwrap();
    assert!(status.success());
    let reader = Command::new("tar")
        .arg("-cf")
        .arg(setup.config.journal.with_file_name("read.tar"))
        .arg("-C")
        .arg(setup.access(""))
        .arg("old")
        .status()
        .unwrap();
    assert!(reader.success());
    migration.controls().resume();
    wait_complete(&migration);
    migration.commit().unwrap();
    let target = &setup.config.target;
    let diff = Command::new("diff")
        .arg("-r")
        .arg(target.join("old"))
        .arg(target.join("new/old"))
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert_eq!(
        rsync_differences(&setup.config.source.join("old"), &target.join("old")),
        ""
    );
}

#[test]
fn concurrent_readers_of_large_files_see_the_source_bytes_while_it_migrates() {
    let setup = Setup::new(|root| {
        for i in 0..3u8 {
            write(&root.join(format!("large{i}")), &pattern(24 << 20, i));
        }
    });
    let mut config = setup.config.clone();
    config.rate = Some(8 << 20);
    dmm_tree::check(&config, true).unwrap();
    let controls = Arc::new(Controls::new(config.rate, 1, Priority::Normal));
    let migration = TreeMigration::start(&config, controls).unwrap();
    // Six readers, two per file, in different orders and block sizes, while
    // the background workers copy the same files at a limited rate.
    let readers: Vec<_> = (0..6u8)
        .map(|r| {
            let path = setup.access(&format!("large{}", r % 3));
            std::thread::spawn(move || {
                let expected = pattern(24 << 20, r % 3);
                let mut file = fs::File::open(&path).unwrap();
                let block = 4096 << (r % 4);
                let blocks = expected.len() / block;
                let mut buf = vec![0u8; block];
                for k in 0..blocks {
                    // Backwards for half the readers: segments out of order.
                    let index = if r % 2 == 0 { k } else { blocks - 1 - k };
                    let at = index * block;
                    file.seek(SeekFrom::Start(at as u64)).unwrap();
                    file.read_exact(&mut buf).unwrap();
                    assert!(buf == expected[at..at + block], "{path:?} differs at {at}");
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().unwrap();
    }
    wait_complete(&migration);
    migration.commit().unwrap();
    assert_eq!(rsync_differences(&config.source, &config.target), "");
}

/// Names of one inode spread over directories that two workers populate at
/// once, and several names of one inode in a single directory.
fn linked_tree(root: &Path) {
    for dir in 0..24 {
        let dir_path = root.join(format!("d{dir:02}"));
        fs::create_dir(&dir_path).unwrap();
        for file in 0..8 {
            let a = dir_path.join(format!("a{file}"));
            if dir == 0 {
                write(&a, &pattern(5000, file as u8));
            } else {
                fs::hard_link(root.join(format!("d00/a{file}")), &a).unwrap();
            }
            fs::hard_link(&a, dir_path.join(format!("b{file}"))).unwrap();
        }
    }
}

#[test]
fn every_name_of_a_hard_linked_file_stays_one_inode() {
    let setup = Setup::new(linked_tree);
    let migration = setup.start(false);
    wait_complete(&migration);
    migration.commit().unwrap();
    assert_eq!(
        rsync_differences(&setup.config.source, &setup.config.target),
        ""
    );
    for file in 0..8 {
        let first = setup.config.target.join(format!("d00/a{file}"));
        assert_eq!(fs::metadata(first).unwrap().nlink(), 24 * 2, "a{file}");
    }
}

#[test]
fn truncating_migrated_and_pending_files_returns_at_once_and_keeps_the_right_bytes() {
    let setup = Setup::new(|root| {
        write(&root.join("small"), b"hello\n");
        write(&root.join("echoed"), b"old content\n");
        write(&root.join("big"), &pattern(64 << 20, 8));
        write(&root.join("cut"), &pattern(8 << 20, 9));
        write(&root.join("opened"), &pattern(3 << 20, 10));
    });
    let migration = setup.start(true);
    let limit = Duration::from_secs(10);
    // Fetched on demand, so complete on the target: the case that hung.
    assert_eq!(fs::read(setup.access("small")).unwrap(), b"hello\n");
    let small = setup.access("small");
    within(limit, "truncate of a migrated file", move || {
        fs::OpenOptions::new()
            .write(true)
            .open(small)
            .unwrap()
            .set_len(0)
            .unwrap()
    });
    assert_eq!(fs::read(setup.access("echoed")).unwrap(), b"old content\n");
    let echoed = setup.access("echoed");
    within(limit, "O_TRUNC open of a migrated file", move || {
        fs::write(echoed, b"new\n").unwrap()
    });
    // Pending: cut in the middle of a segment, and O_TRUNC.
    let cut = setup.access("cut");
    within(limit, "truncate of a pending file", move || {
        fs::OpenOptions::new()
            .write(true)
            .open(cut)
            .unwrap()
            .set_len(1_500_000)
            .unwrap()
    });
    let opened = setup.access("opened");
    within(limit, "O_TRUNC open of a pending file", move || {
        fs::write(opened, b"replaced").unwrap()
    });
    migration.controls().resume();
    wait_complete(&migration);
    let progress = migration.progress();
    assert_eq!(
        progress.counts.bytes_done, progress.counts.bytes_total,
        "{progress:?}"
    );
    migration.commit().unwrap();
    let target = &setup.config.target;
    assert_eq!(fs::read(target.join("small")).unwrap(), b"");
    assert_eq!(fs::read(target.join("echoed")).unwrap(), b"new\n");
    assert_eq!(
        fs::read(target.join("cut")).unwrap(),
        pattern(8 << 20, 9)[..1_500_000]
    );
    assert_eq!(fs::read(target.join("opened")).unwrap(), b"replaced");
    assert_eq!(fs::read(target.join("big")).unwrap(), pattern(64 << 20, 8));
}

/// Runs `script` with `sh` as user and group 65534 (nobody), in `dir`.
fn as_nobody(dir: &Path, script: &str) {
    common::run(&mut dmm_testkit::as_nobody(dir, script));
}

#[test]
fn new_objects_get_the_owner_mode_and_acls_the_target_file_system_gives() {
    let setup = Setup::new(|root| write(&root.join("f"), b"x"));
    let scratch = setup.config.source.parent().unwrap();
    for dir in [scratch, &setup.config.target] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let _migration = setup.start(true);
    let access = &setup.config.access;
    // A set-group-ID directory of group 1 that everyone may write to.
    let shared = setup.access("shared");
    fs::create_dir(&shared).unwrap();
    std::os::unix::fs::chown(&shared, None, Some(1)).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o2777)).unwrap();
    as_nobody(&shared, "umask 027 && mkdir d && echo data > f");
    let mode_owner = |path: &Path| {
        let meta = fs::symlink_metadata(path).unwrap();
        (meta.mode() & 0o7777, meta.uid(), meta.gid())
    };
    assert_eq!(mode_owner(&shared.join("d")), (0o2750, 65534, 1));
    assert_eq!(mode_owner(&shared.join("f")), (0o640, 65534, 1));
    // A default ACL replaces the umask, an ACL entry grants access: as in
    // the same directory made on the target's file system directly.
    let plain = scratch.join("plain-acl");
    for dir in [setup.access("acl"), plain.clone()] {
        fs::create_dir(&dir).unwrap();
        common::run(
            common::tool("setfacl")
                .args(["-m", "u:nobody:rwx", "-d", "-m", "u:nobody:rw"])
                .arg(&dir),
        );
        as_nobody(&dir, "umask 077 && echo data > granted");
    }
    let granted = setup.access("acl/granted");
    assert_eq!(mode_owner(&granted), mode_owner(&plain.join("granted")));
    assert_eq!(
        mode_owner(&granted).0,
        0o664,
        "the default ACL, not the umask"
    );
    let acls = |path: &Path| {
        let listed = common::run(common::tool("getfacl").arg("-cp").arg(path));
        String::from_utf8_lossy(&listed.stdout).into_owned()
    };
    assert_eq!(acls(&granted), acls(&plain.join("granted")));
    assert!(acls(&granted).contains("user:nobody:rw-"));
    // Set-user-ID kept at creation; cleared by a write from another user.
    let suid = access.join("suid");
    let file = rustix::fs::open(
        &suid,
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o4777),
    )
    .unwrap();
    drop(file);
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4777)).unwrap();
    assert_eq!(mode_owner(&suid).0, 0o4777);
    as_nobody(access, "echo more >> suid");
    assert_eq!(mode_owner(&suid).0, 0o777);
    for name in ["shared/d", "shared/f", "acl/granted", "suid"] {
        let (through, below) = (setup.access(name), setup.config.target.join(name));
        assert_eq!(mode_owner(&through), mode_owner(&below), "{name}");
    }
}

/// Reads the whole file at `path` through a new open.
fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

/// Opens `path` for reading once the kernel passes it through. The kernel
/// releases a closed file asynchronously: until dmm hears of the release,
/// a new open is served the way the released one was.
fn open_passed_through(migration: &TreeMigration, path: &Path) -> fs::File {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = migration.progress().passthrough_opens;
        let file = fs::File::open(path).unwrap();
        if migration.progress().passthrough_opens > before {
            return file;
        }
        assert!(
            Instant::now() < deadline,
            "a read-only open of a complete file is passed through (root, Linux 6.9 or later)"
        );
        drop(file);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_passed_through_file_reads_its_latest_data_after_writes_through_the_access_point() {
    use std::os::unix::fs::FileExt;
    let setup = Setup::new(|root| write(&root.join("file"), &pattern(1 << 20, 11)));
    let migration = setup.start(false);
    wait_complete(&migration);
    let path = setup.access("file");
    let mut expected = pattern(1 << 20, 11);

    // Served through dmm (a write open of a tracked file): fills the FUSE
    // page cache with the migrated bytes.
    let served = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut cached = vec![0; expected.len()];
    served.read_exact_at(&mut cached, 0).unwrap();
    assert_eq!(cached, expected);
    drop(served);
    assert_eq!(migration.progress().passthrough_opens, 0);

    // A complete file opened for reading is passed through; a writer
    // opened meanwhile must be too, and the reader sees its write.
    let reader = open_passed_through(&migration, &path);
    let passed = migration.progress().passthrough_opens;
    let writer = fs::OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_all_at(&pattern(8192, 12), 4096).unwrap();
    expected[4096..4096 + 8192].copy_from_slice(&pattern(8192, 12));
    let mut seen = vec![0; 8192];
    reader.read_exact_at(&mut seen, 4096).unwrap();
    assert_eq!(seen, pattern(8192, 12));
    assert_eq!(read_all(&path), expected);
    assert_eq!(migration.progress().passthrough_opens, passed + 2);
    drop((reader, writer));
    // The write passed through marked the file changed: verification
    // leaves it to the client instead of calling it a mismatch.
    let (_, mismatches) = migration.verify();
    assert!(mismatches.is_empty(), "{mismatches:?}");

    // Served again after writes passed through: not the stale page cache.
    let served = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    served.read_exact_at(&mut cached, 0).unwrap();
    assert!(
        cached == expected,
        "stale bytes served after a passthrough write"
    );
    served.write_all_at(b"served write", 100).unwrap();
    expected[100..112].copy_from_slice(b"served write");
    drop(served);
    // And passed through again: the write served through dmm is there.
    let mut again = Vec::new();
    open_passed_through(&migration, &path)
        .read_to_end(&mut again)
        .unwrap();
    assert!(again == expected, "a write served through dmm is missing");
    migration.commit().unwrap();
    assert_eq!(read_all(&setup.config.target.join("file")), expected);
}

#[test]
fn a_full_journal_blocks_the_migration_and_loses_no_change() {
    let setup = Setup::new(|root| {
        for i in 0..40u8 {
            write(&root.join(format!("f{i:02}")), &pattern(512 << 10, i));
        }
    });
    let state = setup.config.journal.parent().unwrap().to_owned();
    let image = state.with_extension("img");
    let small = dmm_testkit::LoopMount::new(&image, &state, 16);
    // About 5 s of copying.
    let migration = setup.start_with(Controls::new(Some(4 << 20), 1, Priority::Normal));
    let overwrite = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(setup.access(name))?;
        file.write_all(data)
    };
    // A file changed through the access point (its mark journaled).
    overwrite("f03", &pattern(512 << 10, 0x5a)).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let filler = small.fill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let blocked = loop {
        if let Some(blocked) = migration.blocked() {
            break blocked;
        }
        assert!(Instant::now() < deadline, "{:?}", migration.progress());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(blocked.errno, ENOSPC, "{blocked}");
    assert!(
        blocked
            .to_string()
            .contains(setup.config.journal.to_str().unwrap()),
        "{blocked}"
    );
    // Clients: reads see the source, writes into a file already changed
    // work; a change that must be journaled before it is made (a new name,
    // the first change of a file still being copied) gets ENOSPC if the
    // journal has no room left for it, as from a full file system. Nothing
    // hangs, and every change that succeeded is kept.
    assert_eq!(
        fs::read(setup.access("f30")).unwrap(),
        pattern(512 << 10, 30)
    );
    let mine = pattern(512 << 10, 0xa5);
    overwrite("f03", &mine).unwrap();
    let mut changed = vec!["f03"];
    match overwrite("f04", &mine) {
        Ok(()) => changed.push("f04"),
        Err(err) => assert_eq!(err.raw_os_error(), Some(ENOSPC)),
    }
    let created = match fs::write(setup.access("new"), b"x") {
        Ok(()) => true,
        Err(err) => {
            assert_eq!(err.raw_os_error(), Some(ENOSPC));
            false
        }
    };

    fs::remove_file(filler).unwrap();
    migration.retry_now();
    wait_complete(&migration);
    migration.stop().unwrap();
    // Reopened from the journal: what was done while it was full (copies,
    // client changes) was recorded once it had room again.
    let paused = Controls::new(None, 1, Priority::Normal);
    paused.pause();
    let migration = TreeMigration::start(&setup.config, Arc::new(paused)).unwrap();
    // Paused: only what the journal holds can make it complete.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !migration.is_complete() {
        assert!(
            Instant::now() < deadline,
            "what was recorded while the journal was full is lost: {:?}",
            migration.progress()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    migration.controls().resume();
    migration.commit().unwrap();
    assert_eq!(setup.config.target.join("new").exists(), created);
    if created {
        assert_eq!(fs::read(setup.config.target.join("new")).unwrap(), b"x");
    }
    for name in &changed {
        assert_eq!(fs::read(setup.config.target.join(name)).unwrap(), mine);
    }
    // Everything else is the source's, times included.
    let differences = rsync_differences(&setup.config.source, &setup.config.target);
    let unexpected: Vec<&str> = differences
        .lines()
        .filter(|line| {
            let name = line.rsplit(' ').next().unwrap_or_default();
            name != "./" && name != "new" && !changed.contains(&name)
        })
        .collect();
    assert!(unexpected.is_empty(), "{differences}");
}

/// No space left on device.
const ENOSPC: i32 = 28;
