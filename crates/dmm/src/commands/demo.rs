//! `dmm demo`: the whole data path on embedded defaults, nothing to install.
//!
//! Makes a sample sparse image in a temporary directory, serves it over NBD
//! on a Unix socket, drives it with dmm's own NBD client (random writes,
//! read-back verification, flush, the allocation map) and prints a short
//! report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use dmm_nbd::{Export, ExportTable, NbdStore, Server, ServerConfig};
use dmm_store::{BlockStore, Bytes, FileStore, OpenOptions};
use futures::stream::{self, StreamExt, TryStreamExt};

/// Run a self-contained demonstration and print a report.
#[derive(Args)]
pub struct DemoArgs {
    /// Size of the sample image in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,

    /// Keep the sample image in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

/// Client requests in flight during the demo.
const QUEUE_DEPTH: usize = 32;

/// A small deterministic generator, so that runs are repeatable.
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

fn block(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8) ^ (i as u8).rotate_left(3))
        .collect()
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = args
        .keep
        .clone()
        .unwrap_or_else(|| temporary.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let size = args.size_mib << 20;
    let image = dir.join("demo.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("cannot create {}", image.display()))?;
    println!(
        "dmm demo: sample image {} ({} MiB, sparse)",
        image.display(),
        args.size_mib
    );

    let store: Arc<dyn BlockStore> = Arc::new(FileStore::open(&image, OpenOptions::default())?);
    let exports = Arc::new(ExportTable::new());
    exports.insert(Export::new("demo", store))?;
    let server = Arc::new(Server::new(exports, ServerConfig::default()));
    let socket = dir.join("nbd.sock");
    let listener = dmm_nbd::bind_unix(&socket)?;
    let serving = server.clone();
    let accept = tokio::spawn(async move { serving.serve_unix(listener).await });
    let uri = format!("nbd+unix:///demo?socket={}", socket.display());
    println!("dmm demo: serving it as {uri}");

    let client = Arc::new(NbdStore::connect_uri(&uri).await?);
    let report = exercise(client.clone(), size).await?;
    drop(client);
    server.shutdown().await;
    accept.await?;
    let _ = std::fs::remove_file(&socket);
    println!("{report}");
    Ok(())
}

async fn exercise(client: Arc<NbdStore>, size: u64) -> Result<String> {
    // One block of 4 to 64 KiB in every other 256 KiB slot, so that
    // concurrent writes never overlap.
    let mut rng = Lcg(0x5eed);
    const SLOT: u64 = 256 << 10;
    let blocks: Vec<(u64, usize)> = (0..size / SLOT)
        .filter(|slot| slot % 2 == 0)
        .map(|slot| {
            let len = 4096 << (rng.next() % 5);
            let shift = (rng.next() % ((SLOT - len as u64) / 4096)) * 4096;
            (slot * SLOT + shift, len)
        })
        .collect();
    let start = Instant::now();
    let writes = blocks.iter().enumerate().map(|(i, &(offset, len))| {
        let client = client.clone();
        async move {
            client
                .write(offset, Bytes::from(block(i as u64, len)), i % 16 == 0)
                .await
        }
    });
    stream::iter(writes)
        .buffer_unordered(QUEUE_DEPTH)
        .try_collect::<Vec<()>>()
        .await?;
    client.flush().await?;
    let wrote = start.elapsed();
    let written: u64 = blocks.iter().map(|&(_, len)| len as u64).sum();

    let mut expected = vec![0u8; size as usize];
    for (i, &(offset, len)) in blocks.iter().enumerate() {
        expected[offset as usize..offset as usize + len].copy_from_slice(&block(i as u64, len));
    }
    let start = Instant::now();
    let chunk = 4 << 20;
    for offset in (0..size).step_by(chunk) {
        let len = chunk.min((size - offset) as usize);
        let got = client.read(offset, len).await?;
        let want = &expected[offset as usize..offset as usize + len];
        if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
            anyhow::bail!("verification failed at offset {}", offset + at as u64);
        }
    }
    let read = start.elapsed();
    let extents = client.extents(0, size).await?;
    let data: u64 = extents
        .iter()
        .filter(|e| !e.kind.reads_as_zero())
        .map(|e| e.len)
        .sum();
    ensure!(
        data >= written.min(size) / 4,
        "allocation map reports too little data"
    );
    Ok(format!(
        "dmm demo report\n\
         \x20 writes:        {} requests, {:.1} MiB in {:.2} s ({:.0} MiB/s, {:.0} IOPS), 1 in 16 with FUA\n\
         \x20 verification:  all {} MiB read back through NBD and matched ({:.0} MiB/s)\n\
         \x20 allocation:    {:.1} MiB of data in {} extents, the rest holes",
        blocks.len(),
        written as f64 / 1048576.0,
        wrote.as_secs_f64(),
        written as f64 / 1048576.0 / wrote.as_secs_f64(),
        blocks.len() as f64 / wrote.as_secs_f64(),
        size >> 20,
        size as f64 / 1048576.0 / read.as_secs_f64(),
        data as f64 / 1048576.0,
        extents.len(),
    ))
}
