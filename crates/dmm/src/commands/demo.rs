//! `dmm demo`: a live migration on embedded defaults, nothing to install.
//!
//! Makes a sample image (half of it data) and an empty destination in a
//! temporary directory, exports the volume over NBD on a Unix socket, and
//! migrates it while a built-in NBD client keeps writing and reading
//! through the export and checking every read against what it wrote. Then
//! it verifies, commits, checks the destination image itself, and prints a
//! report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dmm_nbd::{Export, ExportTable, NbdStore, Server, ServerConfig};
use dmm_store::{BlockStore, Bytes, FileStore, OpenOptions};
use dmm_volume::{Migration, MigrationConfig, Phase, Strategy};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::commands::migrate::allocated_bytes;
use crate::report;
use dmm_control::human;
use dmm_control::parse_size;

/// Run a live migration of a sample volume and print a report.
#[derive(Args)]
pub struct DemoArgs {
    /// Strategy to demonstrate.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<Strategy>())]
    strategy: Strategy,

    /// Size of the sample volume.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    size: u64,

    /// Copy bandwidth limit, so that the client has time to work during the
    /// migration.
    #[arg(long, value_name = "BYTES_PER_S", default_value = "96M", value_parser = parse_size)]
    rate: u64,

    /// Keep the images in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

const BLOCK: u64 = 4096;

/// A deterministic generator, so that runs are repeatable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// What the client wrote: one byte value per 4 KiB block (0 = never).
type Model = Arc<Mutex<Vec<u8>>>;

fn block_data(value: u8) -> Bytes {
    Bytes::from(vec![value; BLOCK as usize])
}

/// Makes the sample source (every other MiB filled) and the empty
/// destination.
fn make_images(dir: &std::path::Path, size: u64) -> Result<(PathBuf, PathBuf, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let source = dir.join("source.raw");
    let destination = dir.join("destination.raw");
    let file = std::fs::File::create(&source)?;
    file.set_len(size)?;
    let mut model = vec![0u8; (size / BLOCK) as usize];
    for mib in (0..size >> 20).step_by(2) {
        let value = (mib % 250 + 1) as u8;
        file.write_all_at(&vec![value; 1 << 20], mib << 20)?;
        let first = (mib << 20) / BLOCK;
        model[first as usize..(first + 256) as usize].fill(value);
    }
    std::fs::File::create(&destination)?.set_len(size)?;
    Ok((source, destination, model))
}

/// Writes and reads random blocks through NBD until told to stop; returns
/// (writes, reads, longest request).
async fn client(
    store: Arc<NbdStore>,
    model: Model,
    mut stop: watch::Receiver<bool>,
) -> Result<(u64, u64, Duration)> {
    let blocks = store.size() / BLOCK;
    let mut rng = Lcg(0xde70);
    let (mut writes, mut reads, mut longest) = (0, 0, Duration::ZERO);
    while !*stop.borrow_and_update() {
        let block = rng.next() % blocks;
        let started = Instant::now();
        if rng.next().is_multiple_of(3) {
            let value = (rng.next() % 250 + 1) as u8;
            store.write(block * BLOCK, block_data(value), false).await?;
            model.lock()[block as usize] = value;
            writes += 1;
        } else {
            let data = store.read(block * BLOCK, BLOCK as usize).await?;
            let expected = model.lock()[block as usize];
            if data.iter().any(|&b| b != expected) {
                bail!("read of block {block} returned wrong data during the migration");
            }
            reads += 1;
        }
        longest = longest.max(started.elapsed());
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok((writes, reads, longest))
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = args
        .keep
        .clone()
        .unwrap_or_else(|| temporary.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let size = args.size.max(16 << 20) & !((1 << 20) - 1);
    let (source_path, destination_path, model) = make_images(&dir, size)?;
    println!(
        "dmm demo: migrating a {} volume ({} of data) from {} to {}",
        human(size),
        human(size / 2),
        source_path.display(),
        destination_path.display()
    );
    let source: Arc<dyn BlockStore> =
        Arc::new(FileStore::open(&source_path, OpenOptions::default())?);
    let destination: Arc<dyn BlockStore> =
        Arc::new(FileStore::open(&destination_path, OpenOptions::default())?);
    let allocated = allocated_bytes(&*source).await?;
    let config = MigrationConfig {
        strategy: args.strategy,
        rate: Some(args.rate),
        checkpoint_every: Duration::from_secs(3600),
        ..MigrationConfig::default()
    };
    let names = (
        source_path.display().to_string(),
        destination_path.display().to_string(),
    );
    let migration =
        Arc::new(Migration::open(source, destination, names, &dir.join("state"), config).await?);

    let exports = Arc::new(ExportTable::new());
    exports.insert(Export::new("demo", migration.device()))?;
    let server = Arc::new(Server::new(exports, ServerConfig::default()));
    let socket = dir.join("nbd.sock");
    let listener = dmm_nbd::bind_unix(&socket)?;
    let accept = {
        let server = server.clone();
        tokio::spawn(async move { server.serve_unix(listener).await })
    };
    let uri = format!("nbd+unix:///demo?socket={}", socket.display());
    println!("dmm demo: the volume is exported as {uri}; a client writes and reads through it");

    let store = Arc::new(NbdStore::connect_uri(&uri).await?);
    let model = Arc::new(Mutex::new(model));
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(client(store.clone(), model.clone(), stopped));
    let reporter = report::spawn(migration.clone(), report::Style::pick(false));
    let outcome = migration.run().await;
    reporter.stop().await;
    let outcome = match outcome? {
        Phase::Verified => migration.commit().await.map(|()| Phase::Committed)?,
        other => other,
    };
    // The client keeps working across the commit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send_replace(true);
    let (writes, reads, longest) = worker.await??;
    store.flush().await?;
    drop(store);
    server.shutdown().await;
    accept.await?;
    let progress = migration.progress().await;
    drop(migration);

    let image = FileStore::open(&destination_path, OpenOptions { read_only: true })?;
    let model = model.lock().clone();
    check_image(&image, &model).await?;
    println!(
        "dmm demo: {outcome:?}\n{}",
        report::summary(&progress, allocated)
    );
    println!(
        "  demo client:   {writes} writes and {reads} reads through NBD, every read correct; \
         slowest request {:.1} ms\n  destination:   {} checked block by block against everything the client wrote",
        longest.as_secs_f64() * 1e3,
        destination_path.display()
    );
    Ok(())
}

/// The destination image holds exactly what the client model says.
async fn check_image(image: &dyn BlockStore, model: &[u8]) -> Result<()> {
    let step = 4 << 20;
    for offset in (0..image.size()).step_by(step) {
        let data = image
            .read(offset, step.min((image.size() - offset) as usize))
            .await?;
        for (i, block) in data.chunks(BLOCK as usize).enumerate() {
            let index = (offset / BLOCK) as usize + i;
            if block.iter().any(|&b| b != model[index]) {
                bail!(
                    "the destination image differs at offset {}",
                    index as u64 * BLOCK
                );
            }
        }
    }
    Ok(())
}
