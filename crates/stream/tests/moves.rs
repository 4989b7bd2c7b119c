//! Moves of a live stream from a plain tier to a zstd tier, through the
//! store's interface: a writer appends sequence-numbered records and
//! fsyncs while a reader follows the stream and the mover moves it; the
//! reader must see every record once and in order, `zstd -d` of the linked
//! file must equal what was written, and a store reopened at any point
//! (a stopped drain, a crash's state) goes on without losing an fsynced
//! byte.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use dmm_control::{Controls, Priority};
use dmm_stream::{Moved, Owner, Policy, Stream, StreamStore};

const OWNER: Owner = Owner {
    uid: 0,
    gid: 0,
    mode: 0o644,
};

fn orbit(dir: &Path) -> dmm_stream::orbit::Orbit {
    format!(
        "fast:{}/fast,dense:{}/dense:zstd",
        dir.display(),
        dir.display()
    )
    .parse()
    .unwrap()
}

/// Record `n`: its number and a line of text of a length that varies.
fn record(n: u64) -> Vec<u8> {
    let pad = "x".repeat((n * 7919 % 300) as usize);
    format!("{n:010} 2026-12-04T13:00:00Z app: event {n} {pad}\n").into_bytes()
}

/// Checks that `bytes` are records `first..` in order, none missing or
/// repeated; returns the next record's number and the bytes of a partial
/// record at the end.
fn check_records(bytes: &[u8], mut next: u64) -> (u64, usize) {
    let mut at = 0;
    while let Some(end) = bytes[at..].iter().position(|&b| b == b'\n') {
        let line = &bytes[at..at + end + 1];
        assert_eq!(line, record(next), "record {next} at byte {at}");
        next += 1;
        at += end + 1;
    }
    (next, bytes.len() - at)
}

/// Appends records until told to stop, syncing every `sync_every`;
/// returns how many were written and how many were synced.
fn write_records(stream: &Stream, stop: &AtomicBool, sync_every: u64, first: u64) -> (u64, u64) {
    let (mut n, mut synced) = (first, first);
    while !stop.load(Ordering::Relaxed) {
        stream.append(stream.len(), &record(n)).unwrap();
        n += 1;
        if n % sync_every == 0 {
            stream.sync().unwrap();
            synced = n;
        }
    }
    stream.sync().unwrap();
    (n, n.max(synced))
}

/// Follows the stream like `tail -F` until told to stop and the end is
/// reached; returns the records seen.
fn follow(stream: &Stream, stop: &AtomicBool) -> u64 {
    let (mut offset, mut next, mut partial) = (0u64, 0u64, Vec::new());
    loop {
        let done = stop.load(Ordering::Relaxed);
        let bytes = stream.read(offset, 1 << 16).unwrap();
        offset += bytes.len() as u64;
        partial.extend_from_slice(&bytes);
        let (seen, left) = check_records(&partial, next);
        next = seen;
        partial.drain(..partial.len() - left);
        if bytes.is_empty() {
            if done && offset == stream.len() {
                return next;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

fn controls(rate: Option<u64>) -> Controls {
    Controls::new(rate, 1, Priority::Normal)
}

#[test]
fn a_live_stream_moves_to_zstd_and_the_reader_sees_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap());
    let stream = store.create("app.log", OWNER).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stream, stop) = (stream.clone(), stop.clone());
        thread::spawn(move || write_records(&stream, &stop, 50, 0))
    };
    let reader = {
        let (stream, stop) = (stream.clone(), stop.clone());
        thread::spawn(move || follow(&stream, &stop))
    };
    thread::sleep(Duration::from_millis(300));
    let moved = store
        .move_stream(&stream, 1, &controls(Some(20 << 20)))
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (written, _) = writer.join().unwrap();
    assert_eq!(
        reader.join().unwrap(),
        written,
        "the reader saw every record"
    );
    let Moved::Linked(figures) = moved else {
        panic!("the move was not linked: {moved:?}")
    };
    let map = stream.map();
    assert_eq!(map.extents().len(), 1);
    assert_eq!(map.tail().tier, 1);
    assert!(figures.drained > 0 && figures.redirected > 0, "{figures:?}");
    store.seal().unwrap();
    let file = dir
        .path()
        .join(format!("dense/app.log.{}.zst", map.tail().file));
    let all: Vec<u8> = (0..written).flat_map(record).collect();
    let unpacked = dmm_testkit::run(
        dmm_testkit::tool("zstd")
            .args(["-d", "-c", "-q"])
            .arg(&file),
    )
    .stdout;
    assert!(
        unpacked == all,
        "zstd -d of {} equals what was written",
        file.display()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("fast")).unwrap().count(),
        0,
        "the source extent is released"
    );
    assert!(
        figures.drained + figures.redirected <= all.len() as u64,
        "each byte written once to the new tier: {figures:?} for {} bytes",
        all.len()
    );
}

#[test]
fn a_stopped_drain_goes_on_after_the_store_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<u8> = (0..40_000).flat_map(record).collect();
    {
        let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
        let stream = store.create("app.log", OWNER).unwrap();
        stream.append(0, &all[..all.len() / 2]).unwrap();
        stream.sync().unwrap();
        let slow = Arc::new(controls(Some(1 << 20)));
        let stopper = {
            let slow = slow.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(500));
                slow.request_stop();
            })
        };
        assert_eq!(
            store.move_stream(&stream, 1, &slow).unwrap(),
            Moved::Stopped
        );
        stopper.join().unwrap();
        stream.append(stream.len(), &all[all.len() / 2..]).unwrap();
        stream.sync().unwrap();
        // Dropped without sealing: what a crash leaves, minus the page
        // cache's loss.
    }
    let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
    let stream = store.get("app.log").unwrap();
    assert_eq!(stream.len(), all.len() as u64);
    assert_eq!(
        stream.map().moving().map(|m| m.phase.as_str()),
        Some("switched")
    );
    assert_eq!(stream.read(0, all.len()).unwrap(), all);
    let moved = store.move_stream(&stream, 1, &controls(None)).unwrap();
    assert!(matches!(moved, Moved::Linked(_)), "{moved:?}");
    assert_eq!(stream.read(0, all.len()).unwrap(), all);
    drop(store);
    let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
    let stream = store.get("app.log").unwrap();
    assert_eq!(stream.read(0, all.len() + 10).unwrap(), all);
    assert_eq!(stream.map().moving(), None);
}

#[test]
fn writes_off_the_end_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
    let stream = store.create("a", OWNER).unwrap();
    stream.append(0, b"hello").unwrap();
    let err = stream.append(2, b"x").unwrap_err();
    assert_eq!(err.errno(), libc_eperm());
    assert!(err.to_string().contains("append-only"), "{err}");
    for bad in ["", "..", "a/b"] {
        assert!(store.create(bad, OWNER).is_err(), "{bad:?}");
    }
    assert!(store.create("a", OWNER).is_err(), "a second a");
    let err = store.move_stream(&stream, 0, &controls(None)).unwrap_err();
    assert!(err.to_string().contains("denser tier"), "{err}");
}

fn libc_eperm() -> i32 {
    1
}

#[test]
fn a_stream_is_due_by_its_age_or_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
    let stream = store.create("a", OWNER).unwrap();
    stream.append(0, &[b'x'; 1000]).unwrap();
    let now = std::time::SystemTime::now();
    let idle = Policy {
        after: Some(Duration::from_secs(60)),
        above: None,
    };
    assert!(!idle.due(&stream, now), "appended just now");
    assert!(idle.due(&stream, now + Duration::from_secs(61)));
    let large = Policy {
        after: None,
        above: Some(999),
    };
    assert!(large.due(&stream, now));
    assert!(
        !Policy {
            above: Some(1000),
            ..large
        }
        .due(&stream, now)
    );
    assert!(Policy::default().due(&stream, now), "with neither, at once");
}

#[test]
fn a_stream_removed_as_its_move_begins_leaves_nothing_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
    let stream = store.create("gone.log", OWNER).unwrap();
    stream.append(0, b"bytes").unwrap();
    store.remove("gone.log").unwrap();
    let err = store.move_stream(&stream, 1, &controls(None)).unwrap_err();
    assert_eq!(err.kind(), dmm_stream::ErrorKind::NotFound, "{err}");
    drop(store);
    let store = StreamStore::open(orbit(dir.path()), &dir.path().join("j.db")).unwrap();
    assert!(store.list().is_empty());
    for tier in ["fast", "dense"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join(tier)).unwrap().collect();
        assert!(left.is_empty(), "{tier}: {left:?}");
    }
}
