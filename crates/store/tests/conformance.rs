//! The conformance suite against the memory store, the crash store and raw
//! files, on the disk filesystem and on tmpfs (which differ in hole
//! handling).

use std::path::Path;
use std::sync::Arc;

use dmm_store::conformance::{Fixture, Subject};
use dmm_store::{CrashStore, FileStore, MemoryStore, OpenOptions};

async fn memory(fixture: Fixture) -> Subject {
    let store = MemoryStore::new(fixture.size);
    let store = if fixture.read_only {
        store.into_read_only()
    } else {
        store
    };
    Subject::new(Arc::new(store), ())
}

async fn crash(fixture: Fixture) -> Subject {
    let store = CrashStore::new(fixture.size);
    let store = if fixture.read_only {
        store.into_read_only()
    } else {
        store
    };
    Subject::new(Arc::new(store), ())
}

fn file_in(dir: tempfile::TempDir, fixture: Fixture) -> Subject {
    let path = dir.path().join("image.raw");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(fixture.size))
        .expect("create image");
    let options = OpenOptions {
        read_only: fixture.read_only,
    };
    let store = FileStore::open(&path, options).expect("open image");
    Subject::new(Arc::new(store), dir)
}

async fn file_on_disk(fixture: Fixture) -> Subject {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    file_in(dir, fixture)
}

async fn file_on_tmpfs(fixture: Fixture) -> Subject {
    assert!(
        Path::new("/dev/shm").is_dir(),
        "/dev/shm (tmpfs) is required"
    );
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    file_in(dir, fixture)
}

mod memory {
    dmm_store::conformance_suite!(super::memory, sparse);
}

mod crash {
    dmm_store::conformance_suite!(super::crash, sparse);
}

mod file_on_disk {
    dmm_store::conformance_suite!(super::file_on_disk, sparse);
}

mod file_on_tmpfs {
    dmm_store::conformance_suite!(super::file_on_tmpfs, sparse);
}
