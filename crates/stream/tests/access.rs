//! The access point with real clients, across a move from a plain tier to
//! a zstd tier: fio appending with an fsync after every write (and
//! verifying what it wrote), a shell writer of sequence-numbered records
//! followed by `tail -F`, and `zstd -d` of the linked dense file.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dmm_control::{Controls, Priority};
use dmm_stream::{Moved, StreamStore};
use dmm_tree::{AccessPoint, AccessUsers};

struct Mounted {
    store: Arc<StreamStore>,
    mount: PathBuf,
    _access: AccessPoint,
    dir: tempfile::TempDir,
}

fn mounted() -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let orbit = format!("fast:{0}/fast,dense:{0}/dense:zstd", dir.path().display())
        .parse()
        .unwrap();
    let store = Arc::new(StreamStore::open(orbit, &dir.path().join("streams.db")).unwrap());
    let mount = dir.path().join("access");
    std::fs::create_dir(&mount).unwrap();
    let access = dmm_stream::mount(store.clone(), &mount, AccessUsers::Owner).unwrap();
    Mounted {
        store,
        mount,
        _access: access,
        dir,
    }
}

/// Waits (bounded) until the stream `name` holds `bytes`.
fn wait_for(store: &StreamStore, name: &str, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.get(name).is_none_or(|s| s.len() < bytes) {
        assert!(
            Instant::now() < deadline,
            "{name} never reached {bytes} bytes"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Moves `name` to the dense tier, at `rate` bytes per second.
fn move_to_dense(store: &StreamStore, name: &str, rate: u64) {
    let stream = store.get(name).unwrap();
    let controls = Controls::new(Some(rate), 1, Priority::Normal);
    let moved = store.move_stream(&stream, 1, &controls).unwrap();
    assert!(matches!(moved, Moved::Linked(_)), "{moved:?}");
    assert_eq!(stream.map().tail().tier, 1);
}

fn wait_child(mut child: Child, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            let out = String::from_utf8_lossy(&output.stdout).into_owned();
            let err = String::from_utf8_lossy(&output.stderr);
            assert!(status.success(), "{what} failed: {status}\n{out}\n{err}");
            return out;
        }
        assert!(Instant::now() < deadline, "{what} hangs");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fio_appends_with_fsync_across_a_move_and_verifies_every_block() {
    let m = mounted();
    let file = m.mount.join("fio.log");
    let lat = m.dir.path().join("lat");
    let fio = dmm_testkit::tool("fio")
        .args([
            "--name=append",
            "--rw=write",
            "--bs=4k",
            "--size=24m",
            "--file_append=1",
            "--fsync=1",
            "--ioengine=psync",
            "--verify=crc32c",
            "--do_verify=1",
            "--log_avg_msec=0",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--write_lat_log={}", lat.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&m.store, "fio.log", 4 << 20);
    move_to_dense(&m.store, "fio.log", 64 << 20);
    let out = wait_child(fio, "fio");
    assert!(out.contains("err= 0"), "{out}");
    let stream = m.store.get("fio.log").unwrap();
    assert_eq!(stream.len(), 24 << 20, "every block appended once");
    let logged = std::fs::read_to_string(m.dir.path().join("lat_lat.1.log")).unwrap();
    // time, latency, direction (1: write), size, offset
    let appends = logged
        .lines()
        .filter(|line| line.split(", ").nth(2) == Some("1"))
        .count();
    assert_eq!(appends, 6144, "a latency per append");
}

#[test]
fn tail_follows_every_record_once_and_in_order_across_a_move() {
    let m = mounted();
    let file = m.mount.join("app.log");
    let seen = m.dir.path().join("seen");
    let tail = dmm_testkit::tail_follow(&file, &seen);
    let records = 6000;
    let writer = dmm_testkit::records_writer(&file, records)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let expected = dmm_testkit::records(records);
    wait_for(&m.store, "app.log", expected.len() as u64 / 3);
    move_to_dense(&m.store, "app.log", 1 << 20);
    wait_child(writer, "the writer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&seen).unwrap().len() < expected.len() as u64 {
        assert!(Instant::now() < deadline, "tail -F stopped following");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    stop(tail);
    let followed = std::fs::read_to_string(&seen).unwrap();
    assert!(
        followed == expected,
        "tail -F saw every record once, in order"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), expected);
    m.store.seal().unwrap();
    let dense = dense_file(m.dir.path(), "app.log");
    let unpacked = dmm_testkit::run(
        dmm_testkit::tool("zstd")
            .args(["-d", "-c", "-q"])
            .arg(&dense),
    )
    .stdout;
    assert!(unpacked == expected.as_bytes(), "zstd -d of the dense file");
}

#[test]
fn writes_off_the_end_and_truncation_are_refused() {
    let m = mounted();
    let file = m.mount.join("a.log");
    std::fs::write(&file, b"hello\n").unwrap();
    let opened = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let err = std::os::unix::fs::FileExt::write_at(&opened, b"x", 2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert_eq!(
        opened.set_len(3).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    let err = std::fs::write(&file, b"again").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "O_TRUNC of a stream");
    let listed: Vec<_> = std::fs::read_dir(&m.mount)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed, ["a.log"]);
    std::fs::remove_file(&file).unwrap();
    assert!(m.store.get("a.log").is_none());
}

fn stop(child: Child) {
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
}

/// The one file of stream `name` on the dense tier.
fn dense_file(dir: &Path, name: &str) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("dense"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(name))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}
