//! The behaviour every [`BlockStore`] backend must show, as one test suite.
//!
//! A backend's tests call [`conformance_suite!`](crate::conformance_suite)
//! with a factory that builds a store of a given size; the macro expands to
//! one `#[tokio::test]` per case so that a failure names the case. The same
//! cases run against memory, files, and NBD clients talking to dmm, qemu-nbd
//! and nbdkit, so "works like a disk" means the same thing for all of them.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::{BlockStore, ErrorKind, ExtentKind, ZeroMode};

/// What the suite asks a factory for.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    pub size: u64,
    pub read_only: bool,
}

/// A store under test, and whatever must live as long as it (a temporary
/// directory, a server process).
pub struct Subject {
    pub store: Arc<dyn BlockStore>,
    pub guard: Box<dyn Any + Send>,
}

impl Subject {
    pub fn new(store: Arc<dyn BlockStore>, guard: impl Any + Send) -> Subject {
        Subject {
            store,
            guard: Box::new(guard),
        }
    }
}

const SIZE: u64 = 8 << 20;

async fn make<F, Fut>(factory: F, read_only: bool) -> Subject
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    factory(Fixture {
        size: SIZE,
        read_only,
    })
    .await
}

/// A deterministic byte pattern that differs per offset and seed.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(2654435761) >> 7;
            (x as u8) ^ seed.wrapping_mul(31) ^ 0x5a
        })
        .collect()
}

async fn write(store: &dyn BlockStore, offset: u64, data: &[u8]) {
    store
        .write(offset, Bytes::copy_from_slice(data), false)
        .await
        .unwrap_or_else(|e| panic!("write at {offset}: {e:?}"));
}

async fn read(store: &dyn BlockStore, offset: u64, len: usize) -> Vec<u8> {
    store
        .read(offset, len)
        .await
        .unwrap_or_else(|e| panic!("read at {offset}: {e:?}"))
}

fn assert_zero(data: &[u8], what: &str) {
    if let Some(at) = data.iter().position(|&b| b != 0) {
        panic!("{what}: byte {at} is {:#x}, expected zero", data[at]);
    }
}

pub async fn reports_size<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    assert_eq!(subject.store.size(), SIZE);
    assert!(!subject.store.capabilities().read_only);
    assert!(!subject.store.target().is_empty());
}

pub async fn fresh_store_reads_zero<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    assert_zero(&read(store, 0, 65536).await, "start");
    assert_zero(&read(store, SIZE - 4096, 4096).await, "end");
}

pub async fn write_then_read_back<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    // Aligned, unaligned, crossing page boundaries, and the last byte.
    let cases: &[(u64, usize)] = &[
        (0, 4096),
        (8192, 65536),
        (1_000_001, 12_345),
        (204_799, 2),
        (3 << 20, (2 << 20) + 123),
        (SIZE - 1, 1),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        write(store, offset, &pattern(i as u8, offset, len)).await;
    }
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let got = read(store, offset, len).await;
        assert!(
            got == pattern(i as u8, offset, len),
            "data at {offset}+{len} differs"
        );
    }
}

pub async fn overlapping_writes_keep_the_latest<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    write(store, 10_000, &[1u8; 20_000]).await;
    write(store, 15_000, &[2u8; 1_000]).await;
    let got = read(store, 10_000, 20_000).await;
    assert!(got[..5_000].iter().all(|&b| b == 1));
    assert!(got[5_000..6_000].iter().all(|&b| b == 2));
    assert!(got[6_000..].iter().all(|&b| b == 1));
}

pub async fn zero_length_requests_succeed<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    assert!(read(store, 4096, 0).await.is_empty());
    write(store, 4096, &[]).await;
}

pub async fn out_of_range_is_refused<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    let kind = |r: crate::Result<()>| r.expect_err("out of range must fail").kind();
    let past = SIZE - 100;
    assert_eq!(
        store.read(past, 200).await.expect_err("read").kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        store
            .read(u64::MAX - 10, 100)
            .await
            .expect_err("read")
            .kind(),
        ErrorKind::OutOfRange
    );
    let data = Bytes::from(vec![7u8; 200]);
    assert_eq!(
        kind(store.write(past, data, false).await),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        kind(store.discard(past, 200, false).await),
        ErrorKind::OutOfRange
    );
    let zero = ZeroMode::default();
    assert_eq!(
        kind(store.write_zeroes(past, 200, zero, false).await),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        store.extents(SIZE, 1).await.expect_err("extents").kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(kind(store.cache(past, 200).await), ErrorKind::OutOfRange);
    // Nothing was written by the refused requests.
    assert_zero(&read(store, past, 100).await, "tail after refused write");
}

pub async fn fua_write_and_flush_succeed<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    let data = pattern(9, 65536, 8192);
    store
        .write(65536, Bytes::from(data.clone()), true)
        .await
        .expect("fua write");
    store.flush().await.expect("flush");
    assert_eq!(read(store, 65536, 8192).await, data);
}

pub async fn write_zeroes_reads_zero<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    let base = 1u64 << 20;
    let len = 1usize << 20;
    for (i, may_punch) in [true, false].into_iter().enumerate() {
        let offset = base + (i as u64) * (2 << 20);
        write(store, offset, &pattern(3, offset, len)).await;
        let mode = ZeroMode {
            may_punch,
            fast_only: false,
        };
        // Unaligned inner range: the edges must keep their data.
        store
            .write_zeroes(offset + 1000, 500_000, mode, false)
            .await
            .expect("write zeroes");
        let got = read(store, offset, len).await;
        assert_eq!(got[..1000], pattern(3, offset, 1000)[..], "head kept");
        assert_zero(&got[1000..501_000], "zeroed range");
        let tail = offset + 501_000;
        assert_eq!(
            got[501_000..],
            pattern(3, tail, len - 501_000)[..],
            "tail kept"
        );
    }
}

pub async fn fast_zero_is_fast_or_refused<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    write(store, 0, &[9u8; 65536]).await;
    let mode = ZeroMode {
        may_punch: true,
        fast_only: true,
    };
    match store.write_zeroes(0, 65536, mode, false).await {
        Ok(()) => assert_zero(&read(store, 0, 65536).await, "fast-zeroed range"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e:?}"),
    }
}

pub async fn discard_keeps_neighbours<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    let data = pattern(5, 0, 3 << 20);
    write(store, 0, &data).await;
    store
        .discard(1 << 20, 1 << 20, false)
        .await
        .expect("discard");
    assert_eq!(read(store, 0, 1 << 20).await, data[..1 << 20]);
    assert_eq!(read(store, 2 << 20, 1 << 20).await, data[2 << 20..]);
    // The discarded range is writable again.
    write(store, 1 << 20, &data[1 << 20..2 << 20]).await;
    assert_eq!(read(store, 0, 3 << 20).await, data);
}

pub async fn extents_describe_the_data<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    let written = (1u64 << 20, 1usize << 20);
    write(store, written.0, &pattern(1, written.0, written.1)).await;
    let mut offset = 0;
    while offset < SIZE {
        let extents = store.extents(offset, SIZE - offset).await.expect("extents");
        assert!(!extents.is_empty(), "no extent at {offset}");
        for extent in extents {
            assert_eq!(extent.offset, offset, "extents must be consecutive");
            assert!(extent.len > 0 && extent.end() <= SIZE, "{extent:?}");
            let overlaps_data =
                extent.offset < written.0 + written.1 as u64 && extent.end() > written.0;
            if overlaps_data {
                assert_eq!(extent.kind, ExtentKind::Data, "written range: {extent:?}");
            } else if extent.kind.reads_as_zero() {
                let len = extent.len.min(4 << 20) as usize;
                assert_zero(&read(store, extent.offset, len).await, "zero extent");
            }
            offset = extent.end();
        }
    }
}

/// A range asked for inside a larger extent gets extents within the range:
/// callers walk chunk by chunk and must not learn about the next chunk.
pub async fn extents_stay_inside_the_range<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = &*subject.store;
    write(store, 1 << 20, &pattern(2, 1 << 20, 1 << 20)).await;
    for (offset, len) in [
        (1 << 20, 4096),
        (1 << 20, 256 << 10),
        (0, 64 << 10),
        (3 << 20, 8192),
    ] {
        let extents = store.extents(offset, len).await.expect("extents");
        assert!(!extents.is_empty(), "no extent at {offset}");
        let end = extents.last().expect("one").end();
        assert!(
            extents[0].offset == offset && end <= offset + len,
            "extents of {offset}+{len} reach past it: {extents:?}"
        );
    }
}

pub async fn fresh_store_is_sparse<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let extents = subject.store.extents(0, SIZE).await.expect("extents");
    assert!(
        extents.iter().all(|e| e.kind.reads_as_zero()),
        "a never-written store should map as holes: {extents:?}"
    );
}

pub async fn read_only_refuses_changes<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, true).await;
    let store = &*subject.store;
    assert!(store.capabilities().read_only);
    let kind = |r: crate::Result<()>| r.expect_err("read-only must refuse").kind();
    let refused = [ErrorKind::ReadOnly, ErrorKind::PermissionDenied];
    let data = Bytes::from_static(&[1, 2, 3]);
    assert!(refused.contains(&kind(store.write(0, data, false).await)));
    assert!(refused.contains(&kind(store.discard(0, 4096, false).await)));
    let zero = ZeroMode::default();
    assert!(refused.contains(&kind(store.write_zeroes(0, 4096, zero, false).await)));
    assert_zero(&read(store, 0, 4096).await, "read-only store");
    store.flush().await.expect("flush of a read-only store");
}

pub async fn concurrent_writes_all_land<F, Fut>(factory: F)
where
    F: Fn(Fixture) -> Fut,
    Fut: Future<Output = Subject>,
{
    let subject = make(factory, false).await;
    let store = subject.store.clone();
    let chunk = 64 * 1024;
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let offset = i * chunk as u64;
                let data = Bytes::from(pattern(i as u8, offset, chunk));
                store.write(offset, data, false).await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("concurrent write");
    }
    for i in 0..64u64 {
        let offset = i * chunk as u64;
        assert!(
            read(&*store, offset, chunk).await == pattern(i as u8, offset, chunk),
            "chunk {i}"
        );
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each building its
/// store with `$factory` (an `async fn(Fixture) -> Subject`). With `sparse`,
/// also checks that a fresh store maps as holes (not true of block devices,
/// which report everything as data).
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path, sparse) => {
        $crate::conformance_suite!($factory);
        $crate::conformance_suite!(@cases $factory; fresh_store_is_sparse);
    };
    ($factory:path) => {
        $crate::conformance_suite!(@cases $factory;
            reports_size, fresh_store_reads_zero, write_then_read_back,
            overlapping_writes_keep_the_latest, zero_length_requests_succeed,
            out_of_range_is_refused, fua_write_and_flush_succeed,
            write_zeroes_reads_zero, fast_zero_is_fast_or_refused,
            discard_keeps_neighbours, extents_describe_the_data, extents_stay_inside_the_range,
            read_only_refuses_changes, concurrent_writes_all_land);
    };
    (@cases $factory:path; $($case:ident),*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case($factory).await;
            }
        )*
    };
}
