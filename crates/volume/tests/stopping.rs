//! Admin verbs answer promptly under a bandwidth limit: a stop or a
//! rollback requested while the copier waits for bandwidth ends that wait at
//! once, and the chunks it had not started yet stay to be copied, so the
//! migration resumes from its saved state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmm_store::{BlockStore, Bytes, FileStore, OpenOptions};
use dmm_volume::{
    ErrorKind, Migration, MigrationConfig, MigrationError, Phase, Priority, Strategy, Verify,
};

const SIZE: u64 = 64 << 20;
const PIECE: u64 = 1 << 20;
/// How long a verb may take to be answered.
const PROMPT: Duration = Duration::from_secs(2);

struct Files {
    dir: tempfile::TempDir,
    source: Arc<FileStore>,
    destination: Arc<FileStore>,
}

/// A 64 MiB source full of data (so every chunk costs bandwidth) and an
/// empty destination, both image files.
async fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        let path = dir.path().join(name);
        std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
        Arc::new(FileStore::open(&path, OpenOptions::default()).unwrap())
    };
    let (source, destination) = (open("source.img"), open("destination.img"));
    for piece in 0..SIZE / PIECE {
        let data: Vec<u8> = (0..PIECE).map(|i| (i as u8) ^ (piece as u8) | 1).collect();
        source
            .write(piece * PIECE, Bytes::from(data), false)
            .await
            .unwrap();
    }
    source.flush().await.unwrap();
    Files {
        dir,
        source,
        destination,
    }
}

fn config(rate: Option<u64>) -> MigrationConfig {
    MigrationConfig {
        strategy: Strategy::Precopy,
        chunk_size: 1 << 20,
        rate,
        in_flight: 8,
        priority: Priority::Normal,
        verify: Verify::Full,
        checkpoint_every: Duration::from_secs(2),
        max_passes: 12,
    }
}

async fn open(files: &Files, rate: Option<u64>) -> Arc<Migration> {
    open_with(files, config(rate)).await
}

async fn open_with(files: &Files, config: MigrationConfig) -> Arc<Migration> {
    let names = ("source.img".to_owned(), "destination.img".to_owned());
    let state = files.dir.path().join("state");
    let migration = Migration::open(
        files.source.clone(),
        files.destination.clone(),
        names,
        &state,
        config,
    )
    .await
    .expect("open migration");
    Arc::new(migration)
}

/// Starts `migration`, lets the copier run into its bandwidth limit, then
/// makes `request` and returns the outcome and how long it took to come.
async fn interrupt(
    migration: &Arc<Migration>,
    request: impl FnOnce(&Migration),
) -> (Result<Phase, MigrationError>, Duration) {
    let running = {
        let migration = migration.clone();
        tokio::spawn(async move { migration.run().await })
    };
    // At 256 KiB/s the first chunks put the copier seconds into its debt.
    let debt = async {
        while migration.progress().await.copied_bytes < 2 << 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), debt)
        .await
        .expect("the copier starts");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    request(migration);
    let outcome = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("run returns")
        .unwrap();
    (outcome, asked.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_under_a_bandwidth_limit_is_prompt_and_resumable() {
    let files = files().await;
    let migration = open(&files, Some(256 << 10)).await;
    let (outcome, took) = interrupt(&migration, |m| m.controls().request_stop()).await;
    assert!(
        matches!(&outcome, Err(err) if err.kind() == ErrorKind::Stopped),
        "{outcome:?}"
    );
    assert!(took < PROMPT, "stopping took {took:?}");
    let stopped = migration.progress().await;
    assert_eq!(stopped.phase, Phase::Copying);
    assert!(
        stopped.chunks_on_destination < stopped.chunks,
        "the limit left chunks to copy"
    );
    drop(migration);

    // Reopened without the limit: it resumes from the saved state.
    let migration = open(&files, None).await;
    let resumed = migration.progress().await;
    assert_eq!(resumed.copied_bytes, stopped.copied_bytes);
    assert_eq!(resumed.chunks_on_destination, stopped.chunks_on_destination);
    assert_eq!(migration.run().await.expect("resumed run"), Phase::Verified);
    migration.commit().await.unwrap();
    let done = migration.progress().await;
    assert_eq!(
        done.copied_bytes, SIZE,
        "every chunk copied once over both runs"
    );
    let (source, destination) = (
        files.source.read(0, SIZE as usize).await.unwrap(),
        files.destination.read(0, SIZE as usize).await.unwrap(),
    );
    assert!(source == destination, "the destination holds the volume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_under_a_bandwidth_limit_is_prompt() {
    let files = files().await;
    let migration = open(&files, Some(256 << 10)).await;
    let (outcome, took) = interrupt(&migration, |m| m.request_rollback().unwrap()).await;
    assert_eq!(outcome.expect("rollback"), Phase::RolledBack);
    assert!(took < PROMPT, "rolling back took {took:?}");
}

/// A kill -9 between the two halves of a mirrored write leaves a chunk
/// both stores hold different on the two, on the same boot and with local
/// files: the resume compares them and hands it to the side reads came
/// from, instead of failing verification (a kill soak found this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_write_split_by_a_kill_is_reconciled_on_resume() {
    let files = files().await;
    let mirror = MigrationConfig {
        strategy: Strategy::Mirror,
        ..config(Some(4 << 20))
    };
    let migration = open_with(&files, mirror.clone()).await;
    let running = {
        let migration = migration.clone();
        tokio::spawn(async move { migration.run().await })
    };
    let copied = async {
        while migration.progress().await.copied_bytes < 8 << 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), copied)
        .await
        .expect("the copier starts");
    // "kill -9" once a checkpoint records the first chunks in both stores.
    running.abort();
    let _ = running.await;
    migration.checkpoint().await.unwrap();
    drop(migration);
    // The half of a mirrored write that reached the destination only.
    let split = Bytes::from(vec![0xee; 4096]);
    files.destination.write(4096, split, false).await.unwrap();

    let resumed = MigrationConfig {
        rate: None,
        ..mirror
    };
    let migration = open_with(&files, resumed).await;
    assert_eq!(migration.run().await.expect("resumed run"), Phase::Verified);
    migration.commit().await.unwrap();
    let (source, destination) = (
        files.source.read(0, SIZE as usize).await.unwrap(),
        files.destination.read(0, SIZE as usize).await.unwrap(),
    );
    assert!(source == destination, "the destination holds the volume");
}
