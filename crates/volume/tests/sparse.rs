//! A sparse volume costs what its data costs: the holes of the source are
//! neither copied nor read when the copy is verified, counted at the
//! stores, and the destination ends up equal and as sparse.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dmm_store::{
    BlockStore, Bytes, Capabilities, Extent, FileStore, OpenOptions, Result, ZeroMode,
};
use dmm_volume::{Migration, MigrationConfig, Phase, Strategy, Verify};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// A thin-provisioned disk: 64 GiB with two 4 MiB extents of data.
const SIZE: u64 = 64 * GIB;
const EXTENTS: [u64; 2] = [3 * GIB + 512 * 1024, 50 * GIB];
const EXTENT: u64 = 4 * MIB;

/// A store that counts the bytes read from it and written to it.
struct Counting {
    inner: Arc<dyn BlockStore>,
    read: AtomicU64,
    written: AtomicU64,
}

impl Counting {
    fn new(inner: Arc<dyn BlockStore>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl BlockStore for Counting {
    fn target(&self) -> &str {
        self.inner.target()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read.fetch_add(len as u64, Ordering::Relaxed);
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.inner.discard(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.written.fetch_add(len, Ordering::Relaxed);
        self.inner.write_zeroes(offset, len, mode, fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

fn file(dir: &std::path::Path, name: &str) -> Arc<FileStore> {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    Arc::new(FileStore::open(&path, OpenOptions::default()).unwrap())
}

fn allocated(store: &FileStore) -> u64 {
    std::fs::metadata(store.target()).map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_are_neither_copied_nor_read_in_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (source_file, destination_file) = (
        file(dir.path(), "source.img"),
        file(dir.path(), "destination.img"),
    );
    for (n, &offset) in EXTENTS.iter().enumerate() {
        let data: Vec<u8> = (0..EXTENT)
            .map(|i| (i as u8) ^ (n as u8 * 37) | 1)
            .collect();
        source_file
            .write(offset, Bytes::from(data), false)
            .await
            .unwrap();
    }
    let source = Counting::new(source_file.clone());
    let destination = Counting::new(destination_file.clone());
    let config = MigrationConfig {
        strategy: Strategy::Auto,
        chunk_size: MIB,
        verify: Verify::Full,
        ..MigrationConfig::default()
    };
    let names = ("source.img".to_owned(), "destination.img".to_owned());
    let started = Instant::now();
    let migration = Migration::open(
        source.clone(),
        destination.clone(),
        names,
        &dir.path().join("state"),
        config,
    )
    .await
    .unwrap();
    let phase = tokio::time::timeout(Duration::from_secs(120), migration.run())
        .await
        .expect("a sparse volume migrates quickly")
        .unwrap();
    assert_eq!(phase, Phase::Verified);
    let took = started.elapsed();
    let progress = migration.progress().await;
    let data = EXTENTS.len() as u64 * EXTENT;
    // Every chunk that holds data is read once to copy it and once to
    // verify it (an extent may touch a chunk more); holes never.
    let slack = 2 * EXTENTS.len() as u64 * MIB;
    assert!(
        source.read() <= 2 * (data + slack),
        "source read {} bytes",
        source.read()
    );
    assert!(
        destination.read() <= data + slack,
        "destination read {} bytes",
        destination.read()
    );
    assert!(
        destination.written() <= data + slack,
        "destination written {} bytes",
        destination.written()
    );
    assert_eq!(
        progress.verified_chunks,
        SIZE / MIB,
        "every chunk counts as verified"
    );
    assert!(progress.mismatches.is_empty());
    // The destination holds the data, and only the data.
    for &offset in &EXTENTS {
        let want = source_file.read(offset, EXTENT as usize).await.unwrap();
        let got = destination_file
            .read(offset, EXTENT as usize)
            .await
            .unwrap();
        assert!(want == got, "the extent at {offset} arrived");
    }
    assert!(
        allocated(&destination_file) <= data + slack,
        "the destination stays sparse"
    );
    eprintln!("64 GiB, 8 MiB of data: migrated and verified in {took:?}");
}
