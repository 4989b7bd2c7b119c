//! The store conformance suite against our NBD client, talking to three
//! servers: dmm's own (over a memory store), qemu-nbd and nbdkit. The same
//! cases pass for all of them, so the client works with servers we did not
//! write, and our server behaves like theirs.

mod common;

use std::sync::Arc;

use common::{TestServer, sparse_image, spawn_server};
use dmm_nbd::NbdStore;
use dmm_store::conformance::{Fixture, Subject};
use dmm_store::{BlockStore, MemoryStore};

/// Connects to the server at `uri`; its socket can exist a moment before
/// it accepts (qemu-nbd binds, then listens), so a refusal is retried for
/// a few seconds.
async fn connect(uri: &str) -> Arc<dyn BlockStore> {
    let started = std::time::Instant::now();
    loop {
        match NbdStore::connect_uri(uri).await {
            Ok(store) => return Arc::new(store),
            Err(_) if started.elapsed() < std::time::Duration::from_secs(10) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(err) => panic!("connect: {err}"),
        }
    }
}

async fn dmm_server(fixture: Fixture) -> Subject {
    let store = MemoryStore::new(fixture.size);
    let store = if fixture.read_only {
        store.into_read_only()
    } else {
        store
    };
    let server = TestServer::single(Arc::new(store)).await;
    Subject::new(connect(&server.uri("disk")).await, server)
}

async fn qemu_nbd(fixture: Fixture) -> Subject {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = sparse_image(dir.path(), fixture.size).display().to_string();
    let mut args = vec!["-f", "raw", "-t", "-k", "{socket}"];
    if fixture.read_only {
        args.push("--read-only");
    }
    args.push(&image);
    let guard = spawn_server("qemu-nbd", &args, dir);
    Subject::new(connect(&guard.uri()).await, guard)
}

async fn nbdkit(fixture: Fixture) -> Subject {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = fixture.size.to_string();
    let mut args = vec!["-f", "-U", "{socket}"];
    if fixture.read_only {
        args.push("--readonly");
    }
    args.extend(["memory", size.as_str()]);
    let guard = spawn_server("nbdkit", &args, dir);
    Subject::new(connect(&guard.uri()).await, guard)
}

mod dmm {
    dmm_store::conformance_suite!(super::dmm_server, sparse);
}

mod qemu {
    dmm_store::conformance_suite!(super::qemu_nbd, sparse);
}

mod kit {
    dmm_store::conformance_suite!(super::nbdkit, sparse);
}
