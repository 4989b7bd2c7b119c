//! The server against hand-made protocol traffic: bad input at every stage
//! gets the right NBD error or a disconnect of that one client, never a
//! crash, a hang or a half-applied write; and the server keeps serving
//! everyone else.

mod common;

use std::sync::Arc;

use common::TestServer;
use common::raw::{Raw, chunk_error};
use dmm_nbd::proto::{ClientOption, InfoRequest, MetaQuery, chunk, errno, opt, rep};
use dmm_nbd::{Export, NbdStore};
use dmm_store::{BlockStore, Bytes, MemoryStore};

const SIZE: u64 = 1 << 20;
const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const BLOCK_STATUS: u16 = 7;

async fn server() -> (TestServer, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new(SIZE));
    let server = TestServer::start(vec![
        Export::new("disk", store.clone()).with_description("test disk"),
        Export::new("ro", Arc::new(MemoryStore::new(SIZE))).read_only(),
    ])
    .await;
    (server, store)
}

fn go(name: &str) -> ClientOption {
    ClientOption::Go(InfoRequest {
        name: name.into(),
        requests: vec![],
    })
}

/// Negotiates `export`, with structured replies and base:allocation if
/// asked; returns the transmission flags.
async fn enter(raw: &mut Raw, export: &str, structured: bool) -> u16 {
    if structured {
        assert_eq!(
            raw.option(&ClientOption::StructuredReply).await[0].0,
            rep::ACK
        );
        let meta = ClientOption::SetMetaContext(MetaQuery {
            export: export.into(),
            queries: vec!["base:allocation".into()],
        });
        let replies = raw.option(&meta).await;
        assert_eq!(replies[0].0, rep::META_CONTEXT);
    }
    let replies = raw.option(&go(export)).await;
    assert_eq!(replies.last().unwrap().0, rep::ACK, "{replies:?}");
    let info = &replies[0].1;
    assert_eq!(u16::from_be_bytes(info[..2].try_into().unwrap()), 0);
    assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), SIZE);
    u16::from_be_bytes(info[10..12].try_into().unwrap())
}

/// The server still serves a well-behaved client.
async fn still_serving(server: &TestServer) {
    let store = NbdStore::connect_uri(&server.uri("disk"))
        .await
        .expect("connect");
    store.read(0, 4096).await.expect("read");
}

#[tokio::test]
async fn unknown_option_is_unsupported_and_negotiation_continues() {
    let (server, _) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    raw.send_option(4242, b"whatever").await;
    let (option, reply, message) = raw.option_reply().await;
    assert_eq!((option, reply), (4242, rep::ERR_UNSUP));
    assert!(!message.is_empty(), "errors carry a message");
    enter(&mut raw, "disk", false).await;
}

#[tokio::test]
async fn malformed_option_data_is_invalid() {
    let (server, _) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    // GO whose name length runs past the data.
    raw.send_option(opt::GO, &[0, 0, 0, 50, b'd']).await;
    assert_eq!(raw.option_reply().await.1, rep::ERR_INVALID);
    // LIST takes no data.
    raw.send_option(opt::LIST, &[1, 2]).await;
    assert_eq!(raw.option_reply().await.1, rep::ERR_INVALID);
    // Meta contexts before structured replies.
    let meta = ClientOption::ListMetaContext(MetaQuery {
        export: "disk".into(),
        queries: vec![],
    });
    assert_eq!(raw.option(&meta).await[0].0, rep::ERR_INVALID);
    enter(&mut raw, "disk", true).await;
}

#[tokio::test]
async fn unknown_export_is_refused_by_name() {
    let (server, _) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    let replies = raw.option(&go("nope")).await;
    assert_eq!(replies[0].0, rep::ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&replies[0].1).contains("nope"));
    // EXPORT_NAME cannot be refused with an error: the server hangs up.
    let mut raw = Raw::negotiating(&server.socket).await;
    raw.send_option(opt::EXPORT_NAME, b"nope").await;
    assert!(raw.is_closed_by_server().await);
    still_serving(&server).await;
}

#[tokio::test]
async fn broken_handshakes_end_only_that_client() {
    let (server, _) = server().await;
    // Unknown client flags.
    let (mut raw, _) = Raw::connect(&server.socket).await;
    raw.send(&0x8000_0000u32.to_be_bytes()).await;
    assert!(raw.is_closed_by_server().await);
    // Bad option magic.
    let mut raw = Raw::negotiating(&server.socket).await;
    raw.send(&[0u8; 16]).await;
    assert!(raw.is_closed_by_server().await);
    // Absurd option length.
    let mut raw = Raw::negotiating(&server.socket).await;
    let mut header = dmm_nbd::proto::magic::OPTS.to_be_bytes().to_vec();
    header.extend_from_slice(&opt::GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    raw.send(&header).await;
    assert!(raw.is_closed_by_server().await);
    // Truncated: half the client flags, then gone.
    let (mut raw, _) = Raw::connect(&server.socket).await;
    raw.send(&[0, 0]).await;
    drop(raw);
    still_serving(&server).await;
}

#[tokio::test]
async fn list_info_and_abort() {
    let (server, _) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    let replies = raw.option(&ClientOption::List).await;
    let names: Vec<String> = replies
        .iter()
        .filter(|(reply, _)| *reply == rep::SERVER)
        .map(|(_, payload)| {
            let len = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
            String::from_utf8(payload[4..4 + len].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["disk", "ro"]);
    let info = ClientOption::Info(InfoRequest {
        name: "".into(),
        requests: vec![1, 2, 3],
    });
    let replies = raw.option(&info).await;
    let kinds: Vec<u16> = replies
        .iter()
        .filter(|(reply, _)| *reply == rep::INFO)
        .map(|(_, p)| u16::from_be_bytes(p[..2].try_into().unwrap()))
        .collect();
    assert_eq!(kinds, [0, 1, 2, 3], "export, name, description, block size");
    let block = &replies.iter().find(|(_, p)| p[..2] == [0, 3]).unwrap().1;
    let sizes: Vec<u32> = block[2..]
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(sizes[0], 1);
    assert!(sizes[1].is_power_of_two() && sizes[1] <= sizes[2]);
    // INFO does not end negotiation; ABORT does, with an ack.
    assert_eq!(raw.option(&ClientOption::Abort).await[0].0, rep::ACK);
    assert!(raw.is_closed_by_server().await);
}

#[tokio::test]
async fn requests_out_of_range_are_refused_and_the_connection_continues() {
    let (server, store) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    enter(&mut raw, "disk", false).await;
    raw.request(READ, 0, 1, SIZE - 10, 20).await;
    assert_eq!(raw.simple_reply().await, (errno::EINVAL, 1));
    raw.request(READ, 0, 2, u64::MAX - 5, 10).await;
    assert_eq!(raw.simple_reply().await, (errno::EINVAL, 2));
    // A write past the end: its payload is consumed, the answer is ENOSPC.
    raw.request(WRITE, 0, 3, SIZE - 10, 20).await;
    raw.send(&[0xee; 20]).await;
    assert_eq!(raw.simple_reply().await, (errno::ENOSPC, 3));
    // A read larger than the advertised maximum.
    raw.request(READ, 0, 4, 0, 64 << 20).await;
    assert_eq!(raw.simple_reply().await, (errno::EINVAL, 4));
    // An unknown command and an unknown flag.
    raw.request(99, 0, 5, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (errno::EINVAL, 5));
    raw.request(READ, 1 << 9, 6, 0, 512).await;
    assert_eq!(raw.simple_reply().await, (errno::EINVAL, 6));
    // Block status without a negotiated context.
    raw.request(BLOCK_STATUS, 0, 7, 0, 4096).await;
    assert_eq!(raw.simple_reply().await, (errno::EINVAL, 7));
    // Still fine afterwards, and nothing was written.
    raw.request(FLUSH, 0, 8, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (0, 8));
    assert!(
        store
            .read(SIZE - 10, 10)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
}

#[tokio::test]
async fn oversized_write_payload_disconnects() {
    let (server, _) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    enter(&mut raw, "disk", false).await;
    raw.request(WRITE, 0, 1, 0, u32::MAX).await;
    assert!(raw.is_closed_by_server().await);
    still_serving(&server).await;
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let (server, _) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    let flags = enter(&mut raw, "ro", true).await;
    assert!(flags & 2 != 0, "READ_ONLY flag");
    raw.request(WRITE, 0, 9, 0, 4).await;
    raw.send(&[1, 2, 3, 4]).await;
    let reply = raw.structured_reply().await;
    assert_eq!(chunk_error(&reply[0]), errno::EPERM);
}

#[tokio::test]
async fn truncated_write_is_not_applied() {
    let (server, store) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    enter(&mut raw, "disk", false).await;
    raw.request(WRITE, 0, 1, 8192, 8192).await;
    raw.send(&[0xab; 4096]).await;
    drop(raw);
    // The server notices the hang-up; the half-sent write never lands.
    still_serving(&server).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let data = store.read(8192, 8192).await.unwrap();
    assert!(data.iter().all(|&b| b == 0), "partial write was applied");
}

#[tokio::test]
async fn sparse_reads_use_hole_chunks() {
    let (server, store) = server().await;
    store
        .write(65536, Bytes::from(vec![7u8; 8192]), false)
        .await
        .unwrap();
    let mut raw = Raw::negotiating(&server.socket).await;
    enter(&mut raw, "disk", true).await;
    raw.request(READ, 0, 1, 0, 16384).await;
    let reply = raw.structured_reply().await;
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].kind, chunk::OFFSET_HOLE);
    // Hole, data, hole.
    raw.request(READ, 0, 2, 32768, 65536).await;
    let reply = raw.structured_reply().await;
    let kinds: Vec<u16> = reply.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [chunk::OFFSET_HOLE, chunk::OFFSET_DATA, chunk::OFFSET_HOLE]
    );
    assert_eq!(reply[1].payload[8..], [7u8; 8192]);
    // With DF the same read is one data chunk.
    raw.request(READ, 1 << 2, 3, 32768, 65536).await;
    let reply = raw.structured_reply().await;
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].kind, chunk::OFFSET_DATA);
    // Block status sees the same layout.
    raw.request(BLOCK_STATUS, 0, 4, 0, 131072).await;
    let reply = raw.structured_reply().await;
    assert_eq!(reply[0].kind, chunk::BLOCK_STATUS);
    let words: Vec<u32> = reply[0].payload[4..]
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(words, [65536, 3, 8192, 0, 57344, 3]);
}

#[tokio::test]
async fn many_requests_in_flight_all_get_replies() {
    let (server, store) = server().await;
    let mut raw = Raw::negotiating(&server.socket).await;
    enter(&mut raw, "disk", false).await;
    let mut batch = Vec::new();
    for i in 0..200u64 {
        let mut header = Vec::new();
        dmm_nbd::proto::RequestHeader {
            flags: 0,
            command: dmm_nbd::proto::Command::Write,
            cookie: 1000 + i,
            offset: i * 4096,
            length: 4096,
        }
        .encode(&mut header);
        batch.extend(header);
        batch.extend(vec![i as u8; 4096]);
    }
    raw.send(&batch).await;
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..200 {
        let (error, cookie) = raw.simple_reply().await;
        assert_eq!(error, 0);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (1000..1200).collect::<Vec<_>>());
    for i in 0..200u64 {
        assert!(
            store
                .read(i * 4096, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == i as u8)
        );
    }
    raw.request(DISC, 0, 0, 0, 0).await;
    assert!(raw.is_closed_by_server().await);
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_closes() {
    let (server, store) = server().await;
    // A client that does not wait for the server to come back.
    let client = NbdStore::connect_uri(&server.uri("disk"))
        .await
        .unwrap()
        .reconnecting_within(std::time::Duration::ZERO);
    let client = Arc::new(client);
    let writes: Vec<_> = (0..32u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let data = Bytes::from(vec![i as u8 + 1; 4096]);
                client.write(i * 4096, data, false).await
            })
        })
        .collect();
    let stopping = tokio::spawn({
        let server = server.server.clone();
        async move { server.shutdown().await }
    });
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("shutdown must not hang")
        .unwrap();
    // Every write that was acknowledged is in the store.
    for (i, write) in writes.into_iter().enumerate() {
        if write.await.unwrap().is_ok() {
            let data = store.read(i as u64 * 4096, 4096).await.unwrap();
            assert!(
                data.iter().all(|&b| b == i as u8 + 1),
                "acknowledged write {i} lost"
            );
        }
    }
}
