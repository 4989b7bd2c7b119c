//! A state directory that fills up or turns read-only in the middle of a
//! migration, for every strategy: the migration stops with an error naming
//! the file, clients keep reading, writing and flushing (every read checked
//! against the model), and once the directory works again the migration
//! goes on to a verified commit, either started again in the same process
//! or reopened from what reached the directory (as after a kill -9: every
//! flushed write is still there).

mod common;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use dmm_store::BlockStore;
use dmm_volume::{DiskFiles, ErrorKind, Migration, Phase, StateFile, StateFiles, Strategy};

/// State files on disk whose writes fail with `errno` while `broken` is
/// set, as on a full or read-only file system; reads keep working.
struct FailingFiles {
    inner: DiskFiles,
    broken: Arc<AtomicBool>,
    errno: i32,
}

struct FailingFile {
    inner: Arc<dyn StateFile>,
    broken: Arc<AtomicBool>,
    errno: i32,
}

fn fail_if(broken: &AtomicBool, errno: i32) -> io::Result<()> {
    match broken.load(Ordering::Acquire) {
        true => Err(io::Error::from_raw_os_error(errno)),
        false => Ok(()),
    }
}

impl FailingFiles {
    fn wrap(&self, file: Arc<dyn StateFile>) -> Arc<dyn StateFile> {
        Arc::new(FailingFile {
            inner: file,
            broken: self.broken.clone(),
            errno: self.errno,
        })
    }
}

impl StateFiles for FailingFiles {
    fn location(&self) -> &Path {
        self.inner.location()
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.read(name)
    }

    fn names(&self) -> io::Result<Vec<String>> {
        self.inner.names()
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StateFile>> {
        fail_if(&self.broken, self.errno)?;
        Ok(self.wrap(self.inner.create(name)?))
    }

    fn open_append(&self, name: &str) -> io::Result<Arc<dyn StateFile>> {
        fail_if(&self.broken, self.errno)?;
        Ok(self.wrap(self.inner.open_append(name)?))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fail_if(&self.broken, self.errno)?;
        self.inner.rename(from, to)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fail_if(&self.broken, self.errno)?;
        self.inner.remove(name)
    }

    fn sync_directory(&self) -> io::Result<()> {
        fail_if(&self.broken, self.errno)?;
        self.inner.sync_directory()
    }
}

impl StateFile for FailingFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        fail_if(&self.broken, self.errno)?;
        self.inner.append(bytes)
    }

    fn sync(&self) -> io::Result<()> {
        // A read-only file system refuses the sync of what was written
        // before; a full one syncs it.
        if self.errno == EROFS {
            fail_if(&self.broken, self.errno)?;
        }
        self.inner.sync()
    }
}

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;

/// How the migration goes on once the directory works again.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Started again in the same process (`dmm start`).
    Restart,
    /// Reopened from the directory, as after a kill -9.
    Reopen,
}

async fn state_fails_mid_copy(strategy: Strategy, errno: i32, then: Then) {
    let what = format!("{strategy}, errno {errno}, {then:?}");
    let (source, destination, model) = stores().await;
    let dir = tempfile::tempdir().unwrap();
    let broken = Arc::new(AtomicBool::new(false));
    let files = FailingFiles {
        inner: DiskFiles::open(dir.path()).unwrap(),
        broken: broken.clone(),
        errno,
    };
    let names = ("memory:source".to_owned(), "memory:destination".to_owned());
    let migration = Migration::open_on(
        source.clone(),
        destination.clone(),
        names,
        Arc::new(files),
        config(strategy),
    )
    .await
    .map(Arc::new)
    .expect("open migration");
    let device: Arc<dyn BlockStore> = migration.device();
    let (stop, clients) = start_clients(device.clone(), &model, Load::STEADY);
    let running = {
        let migration = migration.clone();
        tokio::spawn(async move { migration.run().await })
    };
    // Some way into the copy.
    while migration.progress().await.copied_bytes < 512 << 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broken.store(true, Ordering::Release);
    let failed = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the migration stops")
        .unwrap()
        .expect_err(&what);
    assert_eq!(failed.kind(), ErrorKind::State, "{what}: {failed:?}");
    let report = failed.report();
    let cause = io::Error::from_raw_os_error(errno).to_string();
    assert!(
        report.contains(&dir.path().display().to_string()) && report.contains(&cause),
        "{what}: {report}"
    );
    // Clients keep working (each of their requests is checked).
    stop_clients(stop, clients).await;
    let (stop, clients) = start_clients(device.clone(), &model, Load::STEADY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ops_frozen = stop_clients(stop, clients).await;
    assert!(ops_frozen > 20, "{what}: clients stalled after the failure");
    broken.store(false, Ordering::Release);

    let (migration, device) = match then {
        Then::Restart => (migration, device),
        Then::Reopen => {
            drop(device);
            drop(migration);
            let migration = open(&source, &destination, dir.path(), config(strategy)).await;
            let device: Arc<dyn BlockStore> = migration.device();
            let survived = format!("{what}: device after reopening");
            assert_store_survived(&*device, &model, &survived).await;
            (migration, device)
        }
    };
    // Writes that calm down, so that precopy converges too.
    let load = Load {
        writes_for: Duration::from_millis(300),
        think: Duration::from_micros(300),
    };
    let (stop, clients) = start_clients(device.clone(), &model, load);
    let outcome = tokio::time::timeout(Duration::from_secs(60), migration.run()).await;
    assert_eq!(
        outcome.expect("finishes").expect(&what),
        Phase::Verified,
        "{what}"
    );
    migration.commit().await.expect("commit");
    stop_clients(stop, clients).await;
    assert_store_matches(&*device, &model, &what).await;
    assert_store_matches(&*destination, &model, &what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_stops_the_migration_and_clients_keep_working() {
    for (i, strategy) in Strategy::ALL.into_iter().enumerate() {
        let then = [Then::Restart, Then::Reopen][i % 2];
        state_fails_mid_copy(strategy, ENOSPC, then).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_stops_the_migration_and_clients_keep_working() {
    for (i, strategy) in Strategy::ALL.into_iter().enumerate() {
        let then = [Then::Reopen, Then::Restart][i % 2];
        state_fails_mid_copy(strategy, EROFS, then).await;
    }
}
