//! The client against a server that dies and comes back. nbdkit's cache
//! filter in writeback mode keeps written blocks in memory until a flush,
//! so a kill -9 loses the writes it acknowledged and was not asked to
//! flush, as a server with a write cache loses them in a crash. The client
//! must wait for the server, send those writes again, and lose none.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::sparse_image;
use dmm_nbd::NbdStore;
use dmm_store::BlockStore;
use dmm_testkit::caching_nbdkit;

const PIECE: usize = 64 << 10;

fn piece(index: usize) -> Bytes {
    Bytes::from(vec![index as u8 + 1; PIECE])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_before_a_server_crash_are_sent_again_after_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path(), 16 << 20);
    let socket: PathBuf = dir.path().join("server.sock");
    let mut server = caching_nbdkit(&socket, &image);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let store = NbdStore::connect_uri(&uri).await.unwrap();
    for index in 0..64 {
        let offset = (index * PIECE) as u64;
        store.write(offset, piece(index), false).await.unwrap();
    }

    // The server dies with the 64 writes in its cache; writes sent
    // meanwhile wait for it to come back, 1 s later.
    server.kill().unwrap();
    server.wait().unwrap();
    let store = std::sync::Arc::new(store);
    let outage = Instant::now();
    let writing = {
        let store = store.clone();
        tokio::spawn(async move {
            for index in 64..128 {
                let offset = (index * PIECE) as u64;
                store.write(offset, piece(index), false).await.unwrap();
            }
            store.flush().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut server = caching_nbdkit(&socket, &image);
    writing.await.unwrap();
    assert!(
        outage.elapsed() >= Duration::from_secs(1),
        "the writes waited"
    );

    // Flushed: the cache wrote everything back to the file.
    let data = std::fs::read(&image).unwrap();
    for index in 0..128 {
        let at = index * PIECE;
        assert!(
            data[at..at + PIECE] == piece(index)[..],
            "write {index} (at {at}) was lost"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_come_back_fails_the_request_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path(), 1 << 20);
    let socket = dir.path().join("server.sock");
    let mut server = caching_nbdkit(&socket, &image);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let store = NbdStore::connect_uri(&uri)
        .await
        .unwrap()
        .reconnecting_within(Duration::from_secs(2));
    server.kill().unwrap();
    server.wait().unwrap();
    let started = Instant::now();
    let err = store.read(0, 4096).await.expect_err("no server");
    let waited = started.elapsed();
    assert!(
        err.to_string().contains("did not come back within 2 s"),
        "{err}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}
