//! A deliberately dumb NBD client that sends exactly the bytes a test asks
//! for, so that tests can break the protocol on purpose and look at the raw
//! replies.

use std::time::Duration;

use dmm_nbd::proto::{ClientOption, RequestHeader, magic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub struct Raw {
    pub stream: UnixStream,
}

/// A structured reply chunk as received.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and reads the greeting; returns the handshake flags.
    pub async fn connect(socket: &std::path::Path) -> (Raw, u16) {
        let mut raw = Raw {
            stream: UnixStream::connect(socket).await.expect("connect"),
        };
        let mut greeting = [0u8; 18];
        raw.stream
            .read_exact(&mut greeting)
            .await
            .expect("greeting");
        assert_eq!(
            u64::from_be_bytes(greeting[..8].try_into().unwrap()),
            magic::INIT
        );
        assert_eq!(
            u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
            magic::OPTS
        );
        let flags = u16::from_be_bytes(greeting[16..].try_into().unwrap());
        (raw, flags)
    }

    /// Connects and sends fixed-newstyle + no-zeroes client flags.
    pub async fn negotiating(socket: &std::path::Path) -> Raw {
        let (mut raw, _) = Raw::connect(socket).await;
        raw.send(&3u32.to_be_bytes()).await;
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn send_option(&mut self, code: u32, data: &[u8]) {
        let mut buf = magic::OPTS.to_be_bytes().to_vec();
        buf.extend_from_slice(&code.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.send(&buf).await;
    }

    /// Reads one option reply: (option, reply type, payload).
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; 20];
        self.stream
            .read_exact(&mut header)
            .await
            .expect("option reply");
        assert_eq!(
            u64::from_be_bytes(header[..8].try_into().unwrap()),
            magic::OPTION_REPLY
        );
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await.expect("payload");
        (option, reply, payload)
    }

    pub async fn option(&mut self, option: &ClientOption) -> Vec<(u32, Vec<u8>)> {
        let mut buf = Vec::new();
        option.encode(&mut buf);
        self.send(&buf).await;
        let mut replies = Vec::new();
        loop {
            let (_, reply, payload) = self.option_reply().await;
            let last = reply == 1 || reply & (1 << 31) != 0;
            replies.push((reply, payload));
            if last {
                return replies;
            }
        }
    }

    pub async fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut buf = Vec::new();
        RequestHeader {
            flags,
            command: dmm_nbd::proto::Command::from_wire(command),
            cookie,
            offset,
            length: len,
        }
        .encode(&mut buf);
        self.send(&buf).await;
    }

    /// Reads a simple reply: (error, cookie).
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let mut header = [0u8; 16];
        self.stream
            .read_exact(&mut header)
            .await
            .expect("simple reply");
        assert_eq!(
            u32::from_be_bytes(header[..4].try_into().unwrap()),
            magic::SIMPLE_REPLY
        );
        (
            u32::from_be_bytes(header[4..8].try_into().unwrap()),
            u64::from_be_bytes(header[8..16].try_into().unwrap()),
        )
    }

    pub async fn chunk(&mut self) -> Chunk {
        let mut header = [0u8; 20];
        self.stream
            .read_exact(&mut header)
            .await
            .expect("chunk header");
        assert_eq!(
            u32::from_be_bytes(header[..4].try_into().unwrap()),
            magic::STRUCTURED_REPLY
        );
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut payload)
            .await
            .expect("chunk payload");
        Chunk {
            flags: u16::from_be_bytes(header[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(header[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(header[8..16].try_into().unwrap()),
            payload,
        }
    }

    /// Reads every chunk of one structured reply.
    pub async fn structured_reply(&mut self) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            let chunk = self.chunk().await;
            let done = chunk.flags & 1 != 0;
            chunks.push(chunk);
            if done {
                return chunks;
            }
        }
    }

    /// Whether the server closes the connection (within two seconds).
    pub async fn is_closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 256];
        let wait = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        });
        wait.await.unwrap_or(false)
    }
}

/// The error value of a structured error chunk.
pub fn chunk_error(chunk: &Chunk) -> u32 {
    assert!(chunk.kind & (1 << 15) != 0, "not an error chunk: {chunk:?}");
    u32::from_be_bytes(chunk.payload[..4].try_into().unwrap())
}
