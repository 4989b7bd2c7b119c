//! Property tests: random operation sequences through our client and server
//! agree with a simple model of a disk, and arbitrary bytes thrown at the
//! server never crash or hang it (the same parser the fuzz targets hammer).

mod common;

use std::sync::Arc;
use std::time::Duration;

use dmm_nbd::proto::{ClientOption, InfoRequest, MetaQuery};
use dmm_nbd::{Export, ExportTable, NbdStore, Server, ServerConfig};
use dmm_store::{BlockStore, Bytes, MemoryStore, ZeroMode};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: usize,
        seed: u8,
        fua: bool,
    },
    Read {
        offset: u64,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
        punch: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Extents {
        offset: u64,
        len: u64,
    },
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE, 1..65536u64).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>()).prop_map(|((offset, len), seed, fua)| {
            Op::Write { offset, len: len as usize, seed, fua }
        }),
        4 => range().prop_map(|(offset, len)| Op::Read { offset, len: len as usize }),
        1 => (range(), any::<bool>()).prop_map(|((offset, len), punch)| Op::Zero { offset, len, punch }),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => range().prop_map(|(offset, len)| Op::Extents { offset, len }),
        1 => Just(Op::Flush),
    ]
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 7) as u8) | 1)
        .collect()
}

/// The model: each byte's value, or `None` where a trim left it unspecified.
struct Model(Vec<Option<u8>>);

impl Model {
    fn set(&mut self, offset: u64, bytes: impl Iterator<Item = Option<u8>>) {
        for (slot, byte) in self.0[offset as usize..].iter_mut().zip(bytes) {
            *slot = byte;
        }
    }

    fn check(&self, offset: u64, got: &[u8]) -> Result<(), TestCaseError> {
        for (i, (&expected, &byte)) in self.0[offset as usize..].iter().zip(got).enumerate() {
            if let Some(expected) = expected {
                prop_assert_eq!(byte, expected, "byte {} differs", offset + i as u64);
            }
        }
        Ok(())
    }
}

async fn apply(store: &NbdStore, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match *op {
        Op::Write {
            offset,
            len,
            seed,
            fua,
        } => {
            let bytes = data(seed, len);
            store
                .write(offset, Bytes::from(bytes.clone()), fua)
                .await
                .unwrap();
            model.set(offset, bytes.into_iter().map(Some));
        }
        Op::Read { offset, len } => model.check(offset, &store.read(offset, len).await.unwrap())?,
        Op::Zero { offset, len, punch } => {
            let mode = ZeroMode {
                may_punch: punch,
                fast_only: false,
            };
            store.write_zeroes(offset, len, mode, false).await.unwrap();
            model.set(offset, std::iter::repeat_n(Some(0), len as usize));
        }
        Op::Trim { offset, len } => {
            store.discard(offset, len, false).await.unwrap();
            model.set(offset, std::iter::repeat_n(None, len as usize));
        }
        Op::Extents { offset, len } => {
            let extents = store.extents(offset, len).await.unwrap();
            prop_assert_eq!(extents[0].offset, offset);
            for pair in extents.windows(2) {
                prop_assert_eq!(pair[0].end(), pair[1].offset);
            }
            for extent in extents.iter().filter(|e| e.kind.reads_as_zero()) {
                model.check(extent.offset, &vec![0; extent.len as usize])?;
            }
        }
        Op::Flush => store.flush().await.unwrap(),
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn client_and_server_agree_with_a_model(ops in prop::collection::vec(op(), 1..60)) {
        runtime().block_on(async {
            let server = common::TestServer::single(Arc::new(MemoryStore::new(SIZE))).await;
            let store = NbdStore::connect_uri(&server.uri("disk")).await.unwrap();
            let mut model = Model(vec![Some(0); SIZE as usize]);
            for op in &ops {
                apply(&store, &mut model, op).await?;
            }
            // A final full read checks everything that is still specified.
            model.check(0, &store.read(0, SIZE as usize).await.unwrap())
        })?;
    }
}

/// A valid handshake that ends in transmission with structured replies.
fn handshake_prefix() -> Vec<u8> {
    let mut bytes = 3u32.to_be_bytes().to_vec();
    ClientOption::StructuredReply.encode(&mut bytes);
    ClientOption::SetMetaContext(MetaQuery {
        export: String::new(),
        queries: vec!["base:allocation".into()],
    })
    .encode(&mut bytes);
    ClientOption::Go(InfoRequest {
        name: String::new(),
        requests: vec![3],
    })
    .encode(&mut bytes);
    bytes
}

/// Sends `input` as a client would and reads until the server hangs up.
fn survive(input: Vec<u8>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let table = Arc::new(ExportTable::new());
        table
            .insert(Export::new("disk", Arc::new(MemoryStore::new(SIZE))))
            .unwrap();
        let config = ServerConfig {
            handshake_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let server = Server::new(table, config);
        let (mut client, server_side) = tokio::io::duplex(1 << 16);
        server.spawn_connection(server_side, "proptest".into());
        let session = async {
            let (mut reader, mut writer) = tokio::io::split(&mut client);
            let send = async {
                let _ = writer.write_all(&input).await;
                let _ = writer.shutdown().await;
            };
            let mut sink = Vec::new();
            let receive = reader.read_to_end(&mut sink);
            let (_, received) = tokio::join!(send, receive);
            let _ = received;
        };
        let finished = tokio::time::timeout(Duration::from_secs(5), session).await;
        prop_assert!(
            finished.is_ok(),
            "the server hung on {} bytes of input",
            input.len()
        );
        let stopped = tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await;
        prop_assert!(stopped.is_ok(), "a connection task outlived its client");
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_handshake_bytes_never_crash_or_hang(input in prop::collection::vec(any::<u8>(), 0..512)) {
        survive(input)?;
    }

    #[test]
    fn arbitrary_request_bytes_never_crash_or_hang(
        tail in prop::collection::vec(any::<u8>(), 0..2048),
        headers in prop::collection::vec((any::<u16>(), 0u16..10, any::<u64>(), 0u64..2 * SIZE, 0u32..70000), 0..8),
    ) {
        let mut input = handshake_prefix();
        for (flags, command, cookie, offset, length) in headers {
            dmm_nbd::proto::RequestHeader {
                flags: flags & 0x3f,
                command: dmm_nbd::proto::Command::from_wire(command),
                cookie,
                offset,
                length,
            }
            .encode(&mut input);
        }
        input.extend(tail);
        survive(input)?;
    }
}
