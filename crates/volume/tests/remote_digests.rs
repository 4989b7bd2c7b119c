//! Verification of a destination held elsewhere: the node holding it
//! hashes its chunks and only the digests come back ([`RemoteDigests`]).
//! The digests are asked for many chunks per call, and a digest that
//! differs is found, at its chunk's offset, as a mismatch.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use common::*;
use dmm_store::MemoryStore;
use dmm_volume::{DIGESTS_PER_CALL, ErrorKind, RemoteDigests, Strategy, digest};

/// Hashes a store as the node holding it would; counts its calls; lies
/// about one offset when told to.
struct Holder {
    store: Arc<MemoryStore>,
    calls: AtomicU64,
    ranges: AtomicU64,
    lie_at: Option<u64>,
}

#[async_trait]
impl RemoteDigests for Holder {
    async fn digests(&self, ranges: Vec<(u64, u64)>) -> dmm_store::Result<Vec<blake3::Hash>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.ranges
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        let mut digests = Vec::new();
        for (offset, len) in ranges {
            digests.push(match self.lie_at == Some(offset) {
                true => blake3::hash(b"not this chunk"),
                false => digest(&*self.store, offset, len).await?,
            });
        }
        Ok(digests)
    }
}

async fn verify_remotely(
    lie_at: Option<u64>,
) -> (Arc<Holder>, Result<(), dmm_volume::MigrationError>) {
    let (source, destination, _model) = stores().await;
    let state = tempfile::tempdir().unwrap();
    let config = dmm_volume::MigrationConfig {
        rate: None,
        ..config(Strategy::Mirror)
    };
    let migration = open(&source, &destination, state.path(), config).await;
    let holder = Arc::new(Holder {
        store: destination.clone(),
        calls: AtomicU64::new(0),
        ranges: AtomicU64::new(0),
        lie_at,
    });
    migration.hash_destination_with(holder.clone());
    let outcome = migration.run().await.map(drop);
    (holder, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_digests_come_back_many_chunks_per_call() {
    let (holder, outcome) = verify_remotely(None).await;
    outcome.expect("verified");
    let chunks = SIZE / CHUNK;
    let (calls, ranges) = (
        holder.calls.load(Ordering::Relaxed),
        holder.ranges.load(Ordering::Relaxed),
    );
    // Chunks of zeroes on both sides are verified from the allocation
    // maps alone; every other chunk is hashed remotely exactly once.
    assert!(
        ranges > 0 && ranges <= chunks,
        "{ranges} ranges for {chunks} chunks"
    );
    assert!(
        calls <= ranges.div_ceil(DIGESTS_PER_CALL as u64) + 2,
        "{calls} calls for {ranges} ranges"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_the_holder_hashes_differently_is_a_mismatch() {
    // The source's data chunks alternate with holes: offset 0 holds data.
    let (_, outcome) = verify_remotely(Some(0)).await;
    let err = outcome.expect_err("a mismatch");
    assert_eq!(err.kind(), ErrorKind::Mismatch, "{}", err.report());
    assert!(err.report().contains("at offsets 0"), "{}", err.report());
}
