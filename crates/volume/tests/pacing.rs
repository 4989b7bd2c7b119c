//! The copier yields to busy clients, and still finishes under a client
//! load that never stops.
//!
//! The destination makes every chunk-sized write (a copy) take a few
//! milliseconds without using the CPU, and counts how many run at once, so
//! the copier's pace shows in the migration's time whatever the machine.
//! Clients read in a loop through the virtual device, each read taking a
//! millisecond in the store: a read is in flight nearly all the time, so
//! the clients stay busy even when the machine stalls a thread for a while.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dmm_store::{BlockStore, Bytes, Capabilities, Extent, MemoryStore, Result, ZeroMode};
use dmm_volume::{Migration, MigrationConfig, Phase, Priority, Strategy, Verify};
use tokio::sync::watch;

const CHUNK: u64 = 64 << 10;
const CHUNKS: u64 = 32;
/// What one copy costs the destination.
const COPY: Duration = Duration::from_millis(2);
/// What one client read (smaller than a chunk) costs either store.
const CLIENT_READ: Duration = Duration::from_millis(1);

/// A memory store whose chunk-sized writes take [`COPY`] and whose smaller
/// reads take [`CLIENT_READ`], counting the most writes that were ever in
/// progress at once.
struct SlowCopies {
    store: MemoryStore,
    writing: AtomicUsize,
    most: AtomicUsize,
}

impl SlowCopies {
    fn new() -> SlowCopies {
        SlowCopies {
            store: MemoryStore::new(CHUNK * CHUNKS),
            writing: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl BlockStore for SlowCopies {
    fn target(&self) -> &str {
        "memory:slow-copies"
    }

    fn size(&self) -> u64 {
        self.store.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if (len as u64) < CHUNK {
            tokio::time::sleep(CLIENT_READ).await;
        }
        self.store.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if data.len() as u64 >= CHUNK {
            let now = self.writing.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(COPY).await;
            self.writing.fetch_sub(1, Ordering::SeqCst);
        }
        self.store.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.store.flush().await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.store.discard(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.store.write_zeroes(offset, len, mode, fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.store.extents(offset, len).await
    }
}

/// How a run went.
struct Run {
    took: Duration,
    /// Most copies in progress at once.
    most_at_once: usize,
    client_reads: u64,
}

/// Migrates a source full of data to a [`SlowCopies`] destination at
/// `priority`, with `clients` readers looping on the device meanwhile.
async fn migrate(priority: Priority, clients: usize, verify: Verify) -> Run {
    let source = Arc::new(SlowCopies::new());
    let data: Vec<u8> = (0..CHUNK * CHUNKS).map(|i| (i % 251) as u8 | 1).collect();
    source.write(0, Bytes::from(data), false).await.unwrap();
    let destination = Arc::new(SlowCopies::new());
    let state = tempfile::tempdir().unwrap();
    let config = MigrationConfig {
        strategy: Strategy::Mirror,
        chunk_size: CHUNK,
        in_flight: 8,
        priority,
        verify,
        ..MigrationConfig::default()
    };
    let names = ("memory:source".to_owned(), "memory:slow".to_owned());
    let migration = Migration::open(source, destination.clone(), names, state.path(), config)
        .await
        .expect("open migration");
    let (stop, stopped) = watch::channel(false);
    let all_reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..clients)
        .map(|id| {
            let (device, reads) = (migration.device(), all_reads.clone());
            tokio::spawn(read_until(device, id as u64, reads, stopped.clone()))
        })
        .collect();
    // The copier's first look at busy clients sees them busy.
    while clients > 0 && all_reads.load(Ordering::Relaxed) < clients as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), migration.run())
        .await
        .expect("the migration finishes");
    let took = started.elapsed();
    assert_eq!(outcome.expect("migration"), Phase::Verified);
    stop.send_replace(true);
    let mut client_reads = 0;
    for reader in readers {
        client_reads += reader.await.unwrap();
    }
    Run {
        took,
        most_at_once: destination.most.load(Ordering::SeqCst),
        client_reads,
    }
}

/// A client reading 4 KiB blocks one after another until `stop`, counting
/// them in `reads` as well; returns how many it read.
async fn read_until(
    device: Arc<dmm_volume::VirtualDevice>,
    id: u64,
    all_reads: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut reads = 0;
    while !*stop.borrow_and_update() {
        let offset = (id * 7 + reads * 13) % (CHUNK * CHUNKS / 4096) * 4096;
        device.read(offset, 4096).await.expect("read");
        reads += 1;
        all_reads.fetch_add(1, Ordering::Relaxed);
    }
    reads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_clients_slow_the_copier_down_and_quiet_ones_do_not() {
    let quiet = migrate(Priority::Normal, 0, Verify::None).await;
    let busy = migrate(Priority::Normal, 2, Verify::None).await;
    let unyielding = migrate(Priority::High, 2, Verify::None).await;
    assert!(busy.client_reads > 100, "the clients kept busy");
    // Busy clients: one copy at a time, then three times its length of
    // waiting: at least 4 × COPY per chunk.
    assert_eq!(busy.most_at_once, 1, "one copy at a time for busy clients");
    assert!(
        busy.took >= COPY * 4 * CHUNKS as u32 * 9 / 10,
        "paced copy took {:?}",
        busy.took
    );
    assert!(quiet.most_at_once > 1, "quiet clients: copies in parallel");
    assert!(unyielding.most_at_once > 1, "high priority does not yield");
    for (what, run) in [("quiet clients", &quiet), ("high priority", &unyielding)] {
        assert!(
            run.took * 3 < busy.took,
            "{what}: {:?}, paced: {:?}",
            run.took,
            busy.took
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_priority_copier_still_finishes_under_a_load_that_never_stops() {
    let run = migrate(Priority::Low, 2, Verify::Full).await;
    // Copying 1/20 of the time: about 20 × COPY per chunk, and verified.
    assert!(
        run.took >= COPY * 20 * CHUNKS as u32 * 8 / 10,
        "low priority under load took only {:?}",
        run.took
    );
    assert!(run.took < Duration::from_secs(20), "took {:?}", run.took);
    assert_eq!(run.most_at_once, 1);
}
