//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/`.
//!
//! Seeds are valid conversations, so the fuzzer starts from inputs that get
//! through the handshake and into every command handler instead of having
//! to discover magic numbers first. Each server seed is checked by running
//! it against the server and decoding the replies: every option and request
//! must succeed. The client seeds are recorded from a dmm client talking to
//! a dmm server through a tap, doing exactly what the `client_replies`
//! harness does, plus two hand-written ones for servers without structured
//! replies or without `NBD_OPT_GO`.
//!
//! Run from `fuzz/`: `cargo run --example seeds`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dmm_fuzz::{EXPORT_SIZE, Handshake, PIPE, run};
use dmm_nbd::proto::{
    ClientOption, Command, InfoRequest, MetaQuery, RequestHeader, chunk, cmd_flag,
    encode_chunk_header, encode_option_reply, encode_simple_reply, magic, opt, rep,
    transmission_flag as tf,
};
use dmm_nbd::{Export, ExportTable, NbdStore, Server, ServerConfig};
use dmm_store::{BlockStore, MemoryStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };

    // server_tls_session: options in clear, then STARTTLS.
    let flags = (dmm_nbd::proto::handshake_flag::C_FIXED_NEWSTYLE
        | dmm_nbd::proto::handshake_flag::C_NO_ZEROES)
        .to_be_bytes();
    let go = ClientOption::Go(InfoRequest {
        name: String::new(),
        requests: Vec::new(),
    });
    for (name, options) in [
        ("go-in-clear", vec![go.clone()]),
        (
            "list-then-abort",
            vec![ClientOption::List, ClientOption::Abort],
        ),
        (
            "export-name-in-clear",
            vec![ClientOption::ExportName(String::new())],
        ),
        ("starttls", vec![go, ClientOption::StartTls]),
    ] {
        let mut seed = flags.to_vec();
        for option in &options {
            option.encode(&mut seed);
        }
        let output = dmm_fuzz::serve_tls_input("seed", &seed);
        dmm_fuzz::assert_no_export_in_clear(&output);
        write("server_tls_session", name, &seed);
    }

    // server_transmission: the choice byte, then requests.
    for choice in 0..8u8 {
        let handshake = Handshake::from_byte(choice);
        let requests = requests(handshake);
        let mut seed = vec![choice];
        seed.extend_from_slice(&requests);
        let mut session = Vec::new();
        handshake.encode(&mut session);
        session.extend_from_slice(&requests);
        check_server(&format!("transmission {choice}"), &session, handshake, None);
        write("server_transmission", &format!("requests-{choice}"), &seed);
        write("server_session", &format!("requests-{choice}"), &session);
    }
    // The same, sent in pieces of k³ bytes (bits 3 to 7 of the choice byte).
    for k in [1u8, 3, 5, 12] {
        let choice = 3 | k << 3;
        let handshake = Handshake::from_byte(choice);
        let requests = requests(handshake);
        let mut seed = vec![choice];
        seed.extend_from_slice(&requests);
        let mut session = Vec::new();
        handshake.encode(&mut session);
        session.extend_from_slice(&requests);
        let fragment = dmm_fuzz::fragment(choice);
        check_server(
            &format!("transmission {choice} in pieces of {fragment:?}"),
            &session,
            handshake,
            fragment,
        );
        write("server_transmission", &format!("requests-{choice}"), &seed);
    }

    // server_session: every option the server knows.
    let mut options = 3u32.to_be_bytes().to_vec();
    for option in [
        ClientOption::List,
        ClientOption::StartTls,
        ClientOption::ExtendedHeaders,
        ClientOption::Unknown(42),
        ClientOption::Info(InfoRequest {
            name: "disk".into(),
            requests: vec![0, 1, 2, 3],
        }),
        ClientOption::StructuredReply,
        ClientOption::ListMetaContext(MetaQuery {
            export: "disk".into(),
            queries: vec![],
        }),
        ClientOption::ListMetaContext(MetaQuery {
            export: String::new(),
            queries: vec!["base:".into()],
        }),
        ClientOption::SetMetaContext(MetaQuery {
            export: "disk".into(),
            queries: vec!["qemu:dirty-bitmap:x".into(), "base:allocation".into()],
        }),
        ClientOption::Go(InfoRequest {
            name: "disk".into(),
            requests: vec![3, 1, 2],
        }),
    ] {
        option.encode(&mut options);
    }
    let mut all = options.clone();
    all.extend_from_slice(&requests(Handshake {
        structured: true,
        allocation: true,
        export_name: false,
    }));
    write("server_session", "all-options", &all);
    let mut abort = 3u32.to_be_bytes().to_vec();
    ClientOption::List.encode(&mut abort);
    ClientOption::Abort.encode(&mut abort);
    write("server_session", "abort", &abort);
    let mut zeroes = 1u32.to_be_bytes().to_vec();
    ClientOption::ExportName("disk".into()).encode(&mut zeroes);
    request(&mut zeroes, 0, Command::Read, 1, 0, 512, &[]);
    request(&mut zeroes, 0, Command::Disconnect, 2, 0, 0, &[]);
    write("server_session", "export-name-zeroes", &zeroes);

    // option_parser: code then data, for every option.
    for (i, option) in [
        ClientOption::ExportName("disk".into()),
        ClientOption::Abort,
        ClientOption::List,
        ClientOption::StartTls,
        ClientOption::Info(InfoRequest {
            name: "disk".into(),
            requests: vec![0, 1, 2, 3],
        }),
        ClientOption::Go(InfoRequest {
            name: String::new(),
            requests: vec![3],
        }),
        ClientOption::StructuredReply,
        ClientOption::ListMetaContext(MetaQuery {
            export: String::new(),
            queries: vec!["base:".into()],
        }),
        ClientOption::SetMetaContext(MetaQuery {
            export: "disk".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        }),
        ClientOption::ExtendedHeaders,
        ClientOption::Unknown(42),
    ]
    .into_iter()
    .enumerate()
    {
        let mut wire = Vec::new();
        option.encode(&mut wire);
        write(
            "option_parser",
            &format!("option-{i}"),
            &wire[8..12]
                .iter()
                .chain(&wire[16..])
                .copied()
                .collect::<Vec<_>>(),
        );
    }

    // client_replies: recorded from a dmm server, and hand-written.
    for (name, filled) in [("recorded-empty", false), ("recorded-data", true)] {
        let (to_client, to_server) = record(filled);
        write("client_replies", name, &to_client);
        // What the dmm client sends is a realistic server_session seed too.
        write("server_session", &format!("dmm-client-{name}"), &to_server);
    }
    write("client_replies", "simple-replies", &simple_server(true));
    write("client_replies", "export-name", &simple_server(false));
    for name in [
        "recorded-empty",
        "recorded-data",
        "simple-replies",
        "export-name",
    ] {
        check_client(
            name,
            &std::fs::read(corpus.join("client_replies").join(name)).unwrap(),
        );
    }
    // api_bodies and properties: requests the daemon accepts, each
    // checked to pass, so mutations start from the accepting paths.
    let volume = [
        "source=/srv/old.raw",
        "target=nbd://node2/vm1",
        "strategy=lr",
        "rate=200M",
        "segsize=1M",
        "priority=high",
        "verify=full",
        "export=vm1",
        "switchover=manual",
    ];
    let tree = [
        "kind=tree",
        "source=/home",
        "target=/mnt/new/home",
        "access=/srv/home",
        "maxdfproc=4",
        "maxnsproc=2",
        "collision=rename",
        "rate=50M",
    ];
    for (name, lines) in [("volume", &volume[..]), ("tree", &tree[..])] {
        let text = lines.join("\n");
        dmm_daemon::check_property_lines(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        write("properties", name, text.as_bytes());
        let properties: serde_json::Map<String, serde_json::Value> = lines
            .iter()
            .map(|line| line.split_once('=').unwrap())
            .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
            .collect();
        let body = serde_json::json!({ "properties": properties, "halted": true }).to_string();
        dmm_daemon::check_create_body(body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        write("api_bodies", name, body.as_bytes());
    }
    println!("seeds written to {}", corpus.display());
}

fn request(
    out: &mut Vec<u8>,
    flags: u16,
    command: Command,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode(out);
    out.extend_from_slice(payload);
}

/// One of every command the export accepts, ending with a disconnect.
fn requests(handshake: Handshake) -> Vec<u8> {
    let mut out = Vec::new();
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    request(&mut out, 0, Command::Write, 1, 0, 4096, &payload);
    request(
        &mut out,
        cmd_flag::FUA,
        Command::Write,
        2,
        65536 - 512,
        512,
        &payload[..512],
    );
    request(&mut out, 0, Command::Read, 3, 0, 4096, &[]);
    // Data, then holes: the sparse read path with structured replies.
    request(&mut out, 0, Command::Read, 4, 0, 16384, &[]);
    if handshake.structured {
        request(&mut out, cmd_flag::DF, Command::Read, 5, 0, 16384, &[]);
    }
    request(&mut out, 0, Command::Flush, 6, 0, 0, &[]);
    request(&mut out, 0, Command::Trim, 7, 8192, 4096, &[]);
    request(
        &mut out,
        cmd_flag::NO_HOLE,
        Command::WriteZeroes,
        8,
        12288,
        4096,
        &[],
    );
    request(&mut out, 0, Command::WriteZeroes, 9, 16384, 8192, &[]);
    request(&mut out, 0, Command::Cache, 10, 0, 65536, &[]);
    if handshake.structured && handshake.allocation && !handshake.export_name {
        request(
            &mut out,
            0,
            Command::BlockStatus,
            11,
            0,
            EXPORT_SIZE as u32,
            &[],
        );
        request(
            &mut out,
            cmd_flag::REQ_ONE,
            Command::BlockStatus,
            12,
            4096,
            65536,
            &[],
        );
    }
    request(&mut out, 0, Command::Read, 13, EXPORT_SIZE - 512, 512, &[]);
    request(&mut out, 0, Command::Disconnect, 14, 0, 0, &[]);
    out
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
}

/// Runs `session` against the server and decodes the replies; panics if any
/// option or request failed or the replies do not add up.
fn check_server(what: &str, session: &[u8], handshake: Handshake, fragment: Option<usize>) {
    let output = dmm_fuzz::serve_fragmented(what, session, fragment);
    // Greeting, then option replies.
    assert_eq!(&output[..8], &magic::INIT.to_be_bytes(), "{what}: greeting");
    let mut at = 18;
    let mut options = 0;
    while output.len() >= at + 20 && output[at..at + 8] == magic::OPTION_REPLY.to_be_bytes() {
        let (option, reply, len) = (
            be_u32(&output, at + 8),
            be_u32(&output, at + 12),
            be_u32(&output, at + 16),
        );
        // Meta contexts need structured replies first: that refusal is right.
        let expected = option == opt::SET_META_CONTEXT && !handshake.structured;
        assert_eq!(
            rep::is_error(reply),
            expected,
            "{what}: option {option} reply {reply:#x}"
        );
        at += 20 + len as usize;
        options += 1;
    }
    if handshake.export_name {
        at += 10;
    }
    // Requests, by cookie.
    let mut reads = HashMap::new();
    let mut input = 4;
    while input < session.len() {
        if session[input..input + 8] == magic::OPTS.to_be_bytes() {
            input += 16 + be_u32(session, input + 12) as usize;
            continue;
        }
        let header = RequestHeader::parse(session[input..input + 28].try_into().unwrap()).unwrap();
        input += 28;
        if header.command == Command::Write {
            input += header.length as usize;
        }
        if header.command == Command::Read {
            reads.insert(header.cookie, header.length as usize);
        }
    }
    let mut replies = 0;
    while at < output.len() {
        match be_u32(&output, at) {
            magic::SIMPLE_REPLY => {
                let error = be_u32(&output, at + 4);
                let cookie = u64::from_be_bytes(output[at + 8..at + 16].try_into().unwrap());
                assert_eq!(error, 0, "{what}: request {cookie} failed");
                at += 16 + reads.get(&cookie).copied().unwrap_or(0);
                replies += 1;
            }
            magic::STRUCTURED_REPLY => {
                let flags = u16::from_be_bytes(output[at + 4..at + 6].try_into().unwrap());
                let kind = u16::from_be_bytes(output[at + 6..at + 8].try_into().unwrap());
                assert!(!chunk::is_error(kind), "{what}: error chunk at {at}");
                at += 20 + be_u32(&output, at + 16) as usize;
                replies += usize::from(flags & chunk::FLAG_DONE != 0);
            }
            other => panic!("{what}: bad reply magic {other:#x} at {at}"),
        }
    }
    assert_eq!(at, output.len(), "{what}: truncated reply");
    println!("{what}: {options} option replies, {replies} requests answered");
}

/// Replays a client seed the way `client_replies` does; panics unless every
/// request succeeds.
fn check_client(what: &str, seed: &[u8]) {
    run(what, async {
        let (client_side, mut server_side) = tokio::io::duplex(PIPE);
        let seed = seed.to_vec();
        let peer = tokio::spawn(async move {
            let (mut reader, mut writer) = tokio::io::split(&mut server_side);
            let send = async {
                writer.write_all(&seed).await.unwrap();
                writer.shutdown().await.unwrap();
            };
            let receive = async {
                let mut sink = Vec::new();
                let _ = reader.read_to_end(&mut sink).await;
            };
            tokio::join!(send, receive);
        });
        {
            let store = NbdStore::over(client_side, "", what.into()).await.unwrap();
            let (read, extents, write, flush) = tokio::join!(
                store.read(0, 4096),
                store.extents(0, 4096),
                store.write(0, vec![0xa5; 512].into(), false),
                store.flush(),
            );
            let data = read.unwrap();
            let extents = extents.unwrap();
            write.unwrap();
            flush.unwrap();
            println!(
                "{what}: read {} bytes ({} non-zero), extents {extents:?}",
                data.len(),
                data.iter().filter(|&&b| b != 0).count()
            );
        }
        peer.await.unwrap();
    })
}

/// Copies `from` to `to` until end of file, keeping a copy.
async fn tap(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            let _ = to.shutdown().await;
            return seen;
        }
        seen.extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            return seen;
        }
    }
}

/// Records a dmm client doing what `client_replies` does against a dmm
/// server: (server to client, client to server).
fn record(filled: bool) -> (Vec<u8>, Vec<u8>) {
    run("record", async {
        let store = Arc::new(MemoryStore::new(EXPORT_SIZE));
        if filled {
            store.write(0, vec![7u8; 2048].into(), false).await.unwrap();
        }
        let table = ExportTable::new();
        table.insert(Export::new("disk", store)).unwrap();
        let server = Server::new(Arc::new(table), ServerConfig::default());
        let (client_side, tap_client) = tokio::io::duplex(PIPE);
        let (tap_server, server_side) = tokio::io::duplex(PIPE);
        server.spawn_connection(server_side, "seed".into());
        let (client_read, client_write) = tokio::io::split(tap_client);
        let (server_read, server_write) = tokio::io::split(tap_server);
        let down = tokio::spawn(tap(server_read, client_write));
        let up = tokio::spawn(tap(client_read, server_write));
        {
            let store = NbdStore::over(client_side, "", "seed".into())
                .await
                .unwrap();
            assert_eq!(store.read(0, 4096).await.unwrap().len(), 4096);
            assert!(!store.extents(0, 4096).await.unwrap().is_empty());
            store.write(0, vec![0xa5; 512].into(), false).await.unwrap();
            store.flush().await.unwrap();
        }
        let to_server = up.await.unwrap();
        server.shutdown().await;
        let to_client = down.await.unwrap();
        (to_client, to_server)
    })
}

/// A server without structured replies: with `NBD_OPT_GO` (and simple
/// replies), or an old fixed-less server entered by `NBD_OPT_EXPORT_NAME`.
/// Without `base:allocation` the client sends no block status, so the
/// cookies are read 1, write 2, flush 3.
fn simple_server(fixed: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&magic::INIT.to_be_bytes());
    out.extend_from_slice(&magic::OPTS.to_be_bytes());
    let flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA;
    if fixed {
        out.extend_from_slice(&1u16.to_be_bytes());
        encode_option_reply(&mut out, opt::STRUCTURED_REPLY, rep::ERR_UNSUP, b"no");
        let mut info = 0u16.to_be_bytes().to_vec();
        info.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        encode_option_reply(&mut out, opt::GO, rep::INFO, &info);
        let mut sizes = 3u16.to_be_bytes().to_vec();
        for size in [512u32, 4096, 1 << 20] {
            sizes.extend_from_slice(&size.to_be_bytes());
        }
        encode_option_reply(&mut out, opt::GO, rep::INFO, &sizes);
        encode_option_reply(&mut out, opt::GO, rep::ACK, &[]);
    } else {
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&[0u8; 124]);
    }
    encode_simple_reply(&mut out, 0, 1);
    out.extend((0..4096u32).map(|i| i as u8));
    encode_simple_reply(&mut out, 0, 2);
    encode_simple_reply(&mut out, 0, 3);
    // An unsolicited structured chunk, as a starting point for mutations.
    encode_chunk_header(&mut out, chunk::FLAG_DONE, chunk::NONE, 4, 0);
    out
}
