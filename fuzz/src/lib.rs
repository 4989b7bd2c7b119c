//! Shared harness code for the dmm fuzz targets.
//!
//! Every target drives real NBD code over an in-memory `tokio::io::duplex`
//! pair on one current-thread runtime, created once per process. Each run is
//! bounded by a tokio timeout: the input is finite and the peer's write side
//! is shut after it, so anything still running after [`RUN_LIMIT`] is a hang
//! and panics (libFuzzer reports it as a crash with the input). A thread
//! stuck in a busy loop never reaches the timer; libFuzzer's `-timeout`
//! catches that case.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dmm_nbd::proto::{ClientOption, InfoRequest, MetaQuery, handshake_flag};
use dmm_nbd::{Export, ExportTable, Server, ServerConfig, ServerTls, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Longest a single run may take before it counts as a hang.
pub const RUN_LIMIT: Duration = Duration::from_secs(5);

/// Bytes buffered in each direction of the in-memory connection.
pub const PIPE: usize = 1 << 16;

/// Size of the export the server targets offer.
pub const EXPORT_SIZE: u64 = 1 << 20;

/// The process-wide runtime: current-thread, with timers.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Runs `work` on the runtime; panics if it does not finish in time.
pub fn run<F: Future>(what: &str, work: F) -> F::Output {
    runtime().block_on(async {
        match tokio::time::timeout(RUN_LIMIT, work).await {
            Ok(output) => output,
            Err(_) => panic!("{what}: hang, not finished after {RUN_LIMIT:?}"),
        }
    })
}

/// A server with one 1 MiB memory export called `disk` (the default), and
/// TLS if given.
pub fn server(tls: Option<ServerTls>) -> Server {
    let table = ExportTable::new();
    let store = Arc::new(dmm_store::MemoryStore::new(EXPORT_SIZE));
    table
        .insert(Export::new("disk", store))
        .expect("fresh table");
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(1),
        tls,
        ..Default::default()
    };
    Server::new(Arc::new(table), config)
}

/// TLS required, with certificates made once per process by `dmm tls`'s
/// PKI in a scratch directory.
pub fn tls_required() -> ServerTls {
    static CONFIG: OnceLock<ServerTls> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("dmm-fuzz-tls-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let ca = dir.join("ca");
            dmm_tls::pki::init(&ca, "fuzz CA").expect("CA");
            dmm_tls::pki::issue(&ca, &dir.join("server"), "localhost", &[]).expect("server");
            let certificates = dmm_tls::CertificateDir::new(dir.join("server"));
            let config = dmm_tls::server_config(&certificates, &dmm_tls::PeerCheck::Anyone)
                .expect("server config");
            let _ = std::fs::remove_dir_all(&dir);
            ServerTls::new(TlsMode::Require, config).expect("required")
        })
        .clone()
}

/// Plays a client that sends `input` (then shuts its write side) to a fresh
/// server, and returns everything the server sent until it hung up.
pub fn serve_input(what: &str, input: &[u8]) -> Vec<u8> {
    serve_fragmented(what, input, None)
}

/// Like [`serve_input`], against a server that requires TLS.
pub fn serve_tls_input(what: &str, input: &[u8]) -> Vec<u8> {
    serve_with(tls_required(), what, input)
}

fn serve_with(tls: ServerTls, what: &str, input: &[u8]) -> Vec<u8> {
    talk(what, server(Some(tls)), input, None)
}

/// Like [`serve_input`], but with `fragment` the input goes out in pieces of
/// that many bytes, letting the server run between them, so that it sees
/// requests and payloads arrive in parts and its reader wait for more.
pub fn serve_fragmented(what: &str, input: &[u8], fragment: Option<usize>) -> Vec<u8> {
    talk(what, server(None), input, fragment)
}

fn talk(what: &str, server: Server, input: &[u8], fragment: Option<usize>) -> Vec<u8> {
    run(what, async {
        let (mut client, server_side) = tokio::io::duplex(PIPE);
        server.spawn_connection(server_side, "fuzz".into());
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        // Write and read at once: the server stops reading while its
        // replies are not taken, and the pipe is only 64 KiB.
        let send = async {
            // The server may hang up early (bad magic, abort): the rest of
            // the input is then refused with a broken pipe, which is fine.
            let pieces = input.chunks(fragment.unwrap_or(input.len()).max(1));
            for piece in pieces {
                if writer.write_all(piece).await.is_err() {
                    break;
                }
                if fragment.is_some() {
                    tokio::task::yield_now().await;
                }
            }
            let _ = writer.shutdown().await;
        };
        let receive = async {
            let mut output = Vec::new();
            let _ = reader.read_to_end(&mut output).await;
            output
        };
        let ((), output) = tokio::join!(send, receive);
        server.shutdown().await;
        output
    })
}

/// Which options [`handshake`] sends before entering transmission.
#[derive(Debug, Clone, Copy, Default)]
pub struct Handshake {
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub structured: bool,
    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation` on the default
    /// export.
    pub allocation: bool,
    /// Enter with `NBD_OPT_EXPORT_NAME` instead of `NBD_OPT_GO`.
    pub export_name: bool,
}

impl Handshake {
    /// Bit 0: structured replies, bit 1: `base:allocation`, bit 2: enter
    /// with `NBD_OPT_EXPORT_NAME` (bits 3 to 7: see [`fragment`]).
    pub fn from_byte(byte: u8) -> Handshake {
        Handshake {
            structured: byte & 1 != 0,
            allocation: byte & 2 != 0,
            export_name: byte & 4 != 0,
        }
    }

    /// A complete, valid client handshake for the default export.
    pub fn encode(self, out: &mut Vec<u8>) {
        let flags = handshake_flag::C_FIXED_NEWSTYLE | handshake_flag::C_NO_ZEROES;
        out.extend_from_slice(&flags.to_be_bytes());
        if self.structured {
            ClientOption::StructuredReply.encode(out);
        }
        if self.allocation {
            ClientOption::SetMetaContext(MetaQuery {
                export: String::new(),
                queries: vec!["base:allocation".into()],
            })
            .encode(out);
        }
        if self.export_name {
            ClientOption::ExportName(String::new()).encode(out);
        } else {
            ClientOption::Go(InfoRequest {
                name: String::new(),
                requests: Vec::new(),
            })
            .encode(out);
        }
    }
}

/// Bits 3 to 7 of the `server_transmission` choice byte: 0 sends the input
/// at once, `k` in pieces of `k³` bytes (1, 8, 27, ... 29791).
pub fn fragment(byte: u8) -> Option<usize> {
    let k = usize::from(byte >> 3);
    (k != 0).then(|| k * k * k)
}

/// Feeds `input` as everything an NBD server sends to the dmm client, and
/// exercises the client for as long as it stays connected.
pub fn client_input(input: &[u8]) {
    run("client", async {
        let (client_side, mut server_side) = tokio::io::duplex(PIPE);
        let peer = tokio::spawn({
            let input = input.to_vec();
            async move {
                let (mut reader, mut writer) = tokio::io::split(&mut server_side);
                let send = async {
                    let _ = writer.write_all(&input).await;
                    let _ = writer.shutdown().await;
                };
                // Take whatever the client sends, so it never blocks on a
                // full pipe, until it hangs up.
                let receive = async {
                    let mut sink = Vec::new();
                    let _ = reader.read_to_end(&mut sink).await;
                };
                tokio::join!(send, receive);
            }
        });
        if let Ok(store) = dmm_nbd::NbdStore::over(client_side, "", "fuzz".into()).await {
            use dmm_store::BlockStore;
            // All at once: the whole input is already in the pipe, so the
            // client's reader would meet the reply to a later request before
            // that request exists (and rightly drop the connection). Joined,
            // the requests are all sent, with cookies 1, 2, 3, 4 in this
            // order, before the reader runs.
            let _ = tokio::join!(
                store.read(0, 4096),
                store.extents(0, 4096),
                store.write(0, vec![0xa5; 512].into(), false),
                store.flush(),
            );
        }
        // Dropping the store sends a disconnect and shuts the client's
        // write side; the peer then sees end of file and finishes.
        peer.await.expect("peer task");
    })
}

/// Checks what a server requiring TLS sent in clear: the greeting, then
/// option replies that refuse (`NBD_REP_ERR_TLS_REQD` and other errors) or
/// acknowledge `STARTTLS` or `ABORT`; after an acknowledged `STARTTLS`,
/// only TLS. Never an export's information, a list of exports, or data.
pub fn assert_no_export_in_clear(output: &[u8]) {
    use dmm_nbd::proto::{OptionReplyHeader, opt, rep};
    let mut rest = output.get(18..).unwrap_or_default();
    while rest.len() >= OptionReplyHeader::SIZE {
        let header: &[u8; OptionReplyHeader::SIZE] =
            rest[..OptionReplyHeader::SIZE].try_into().expect("sized");
        let header = OptionReplyHeader::parse(header).expect("only option replies in clear");
        let acknowledged = header.reply == rep::ACK;
        assert!(
            rep::is_error(header.reply)
                || (acknowledged && matches!(header.option, opt::STARTTLS | opt::ABORT)),
            "sent in clear by a server requiring TLS: {header:?}"
        );
        if acknowledged {
            return;
        }
        let end = OptionReplyHeader::SIZE + header.length as usize;
        rest = rest.get(end..).unwrap_or_default();
    }
    assert!(rest.is_empty(), "a partial reply in clear: {rest:?}");
}
