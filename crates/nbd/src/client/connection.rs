//! One client connection in transmission: many requests in flight, replies
//! matched by cookie.
//!
//! Callers submit requests from any task; a writer task sends them in
//! batches (see [`crate::writer`]) and a reader task parses replies and
//! completes the waiting callers. Read data goes straight from the socket
//! into the caller's buffer. When the connection breaks, every waiting
//! caller and every later one gets the reason.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use dmm_store::{Extent, ExtentKind};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::handshake::ExportInfo;
use crate::proto::{
    ChunkHeader, Command, ProtocolError, ReplyHeader, RequestHeader, allocation, be_u16, be_u32,
    be_u64, chunk,
};
use crate::writer::write_messages;

/// Largest structured chunk payload other than read data.
const MAX_CHUNK_METADATA: u32 = 1 << 20;

/// A successful reply.
pub(crate) enum Response {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The server answered with an error.
    Server { errno: u32, message: String },
    /// The connection is gone.
    Lost(String),
}

struct Pending {
    command: Command,
    offset: u64,
    length: u32,
    data: Vec<u8>,
    extents: Vec<Extent>,
    error: Option<(u32, String)>,
    done: oneshot::Sender<Result<Response, Failure>>,
}

impl Pending {
    fn finish(self) {
        let result = match (self.error, self.command) {
            (Some((errno, message)), _) => Err(Failure::Server { errno, message }),
            (None, Command::Read) => Ok(Response::Data(self.data)),
            (None, Command::BlockStatus) => Ok(Response::Extents(self.extents)),
            (None, _) => Ok(Response::Done),
        };
        let _ = self.done.send(result);
    }
}

#[derive(Default)]
struct Shared {
    pending: HashMap<u64, Pending>,
    closed: Option<String>,
}

impl Shared {
    /// Fails every waiting request and refuses later ones.
    fn close(&mut self, reason: String) {
        for (_, pending) in self.pending.drain() {
            let _ = pending.done.send(Err(Failure::Lost(reason.clone())));
        }
        self.closed.get_or_insert(reason);
    }
}

/// A connection ready for requests.
pub(crate) struct Connection {
    outbox: mpsc::UnboundedSender<Vec<Bytes>>,
    shared: Arc<Mutex<Shared>>,
    next_cookie: AtomicU64,
}

impl Connection {
    /// Starts the reader and writer tasks on a negotiated stream.
    pub(crate) fn start<S>(stream: S, info: &ExportInfo) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (outbox, queue) = mpsc::unbounded_channel();
        let writer_shared = shared.clone();
        tokio::spawn(async move {
            if let Err(err) = write_messages(writer, queue).await {
                writer_shared.lock().close(format!("send failed: {err}"));
            }
        });
        let reader_shared = shared.clone();
        let replies = Replies {
            reader: BufReader::with_capacity(64 * 1024, reader),
            shared: reader_shared.clone(),
            allocation: info.allocation,
        };
        tokio::spawn(async move {
            let reason = match replies.run().await {
                Ok(()) => "server closed the connection".to_owned(),
                Err(err) => err.to_string(),
            };
            reader_shared.lock().close(reason);
        });
        Connection {
            outbox,
            shared,
            next_cookie: AtomicU64::new(1),
        }
    }

    /// Gives the connection up: every waiting request fails, and any
    /// later one (a server that stopped answering, a network cut that
    /// TCP would take many minutes to notice).
    pub(crate) fn close(&self, reason: String) {
        self.shared.lock().close(reason);
    }

    /// Sends a request and waits for its reply.
    pub(crate) async fn request(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Response, Failure> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        let data = if command == Command::Read {
            vec![0u8; length as usize]
        } else {
            Vec::new()
        };
        let pending = Pending {
            command,
            offset,
            length,
            data,
            extents: Vec::new(),
            error: None,
            done,
        };
        {
            let mut shared = self.shared.lock();
            if let Some(reason) = &shared.closed {
                return Err(Failure::Lost(reason.clone()));
            }
            shared.pending.insert(cookie, pending);
        }
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut message = vec![encode(&header)];
        message.extend(payload);
        if self.outbox.send(message).is_err() {
            self.shared.lock().pending.remove(&cookie);
            return Err(Failure::Lost("connection closed".into()));
        }
        reply
            .await
            .unwrap_or_else(|_| Err(Failure::Lost("reply lost".into())))
    }
}

fn encode(header: &RequestHeader) -> Bytes {
    let mut buf = BytesMut::with_capacity(RequestHeader::SIZE);
    header.encode(&mut buf);
    buf.freeze()
}

impl Drop for Connection {
    fn drop(&mut self) {
        // A soft disconnect; the writer shuts the socket after sending it.
        let header = RequestHeader {
            flags: 0,
            command: Command::Disconnect,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let _ = self.outbox.send(vec![encode(&header)]);
    }
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("receive failed: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

/// The reader task's state.
struct Replies<R> {
    reader: BufReader<R>,
    shared: Arc<Mutex<Shared>>,
    allocation: Option<u32>,
}

impl<R: AsyncRead + Unpin> Replies<R> {
    async fn run(mut self) -> Result<(), ReadError> {
        loop {
            let mut magic = [0u8; 4];
            match self.reader.read_exact(&mut magic).await {
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                other => other?,
            };
            let rest = ReplyHeader::remaining_after_magic(u32::from_be_bytes(magic))?;
            let mut header = [0u8; 20];
            header[..4].copy_from_slice(&magic);
            self.reader.read_exact(&mut header[4..4 + rest]).await?;
            match ReplyHeader::parse(&header[..4 + rest])? {
                ReplyHeader::Simple(simple) => {
                    let mut pending = self.take(simple.cookie)?;
                    if simple.error != 0 {
                        pending.error = Some((simple.error, String::new()));
                    } else if pending.command == Command::Read {
                        self.reader.read_exact(&mut pending.data).await?;
                    }
                    pending.finish();
                }
                ReplyHeader::Chunk(chunk) => {
                    let mut pending = self.take(chunk.cookie)?;
                    self.apply(&chunk, &mut pending).await?;
                    if chunk.flags & chunk::FLAG_DONE != 0 {
                        pending.finish();
                    } else {
                        self.shared.lock().pending.insert(chunk.cookie, pending);
                    }
                }
            }
        }
    }

    fn take(&self, cookie: u64) -> Result<Pending, ProtocolError> {
        self.shared
            .lock()
            .pending
            .remove(&cookie)
            .ok_or_else(|| ProtocolError::Unexpected(format!("reply to unknown cookie {cookie}")))
    }

    async fn payload(&mut self, length: u32) -> Result<Vec<u8>, ReadError> {
        if length > MAX_CHUNK_METADATA {
            let (what, len, limit) = ("reply chunk", length.into(), MAX_CHUNK_METADATA.into());
            return Err(ProtocolError::TooLarge { what, len, limit }.into());
        }
        let mut buf = vec![0u8; length as usize];
        self.reader.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn apply(
        &mut self,
        header: &ChunkHeader,
        pending: &mut Pending,
    ) -> Result<(), ReadError> {
        let malformed = |what| ProtocolError::Malformed(what);
        match header.kind {
            chunk::NONE if header.length == 0 => Ok(()),
            chunk::OFFSET_DATA if header.length > 8 => {
                let offset = self.reader.read_u64().await?;
                let len = (header.length - 8) as usize;
                let at =
                    within(pending, offset, len as u64).ok_or(malformed("data chunk range"))?;
                self.reader
                    .read_exact(&mut pending.data[at..at + len])
                    .await?;
                Ok(())
            }
            chunk::OFFSET_HOLE if header.length == 12 => {
                let body = self.payload(12).await?;
                let offset = be_u64(&body, 0).unwrap_or_default();
                let len = be_u32(&body, 8).unwrap_or_default() as usize;
                let at =
                    within(pending, offset, len as u64).ok_or(malformed("hole chunk range"))?;
                pending.data[at..at + len].fill(0);
                Ok(())
            }
            chunk::BLOCK_STATUS if header.length >= 12 && (header.length - 4).is_multiple_of(8) => {
                let body = self.payload(header.length).await?;
                if be_u32(&body, 0) == self.allocation {
                    pending.extents = descriptors(pending.offset, &body[4..]);
                }
                Ok(())
            }
            kind if chunk::is_error(kind) && header.length >= 6 => {
                let body = self.payload(header.length).await?;
                let errno = be_u32(&body, 0).unwrap_or_default();
                let len = usize::from(be_u16(&body, 4).unwrap_or_default());
                let message = body.get(6..6 + len).unwrap_or_default();
                let message = String::from_utf8_lossy(message).into_owned();
                pending.error.get_or_insert((errno.max(1), message));
                Ok(())
            }
            _ => Err(malformed("reply chunk").into()),
        }
    }
}

/// Where a chunk's range starts in the request's buffer, if it lies inside
/// the request.
fn within(pending: &Pending, offset: u64, len: u64) -> Option<usize> {
    let at = offset.checked_sub(pending.offset)?;
    let fits = pending.command == Command::Read
        && at.checked_add(len)? <= u64::from(pending.length)
        && len > 0;
    fits.then_some(at as usize)
}

/// `base:allocation` descriptors as extents from `offset`.
fn descriptors(mut offset: u64, body: &[u8]) -> Vec<Extent> {
    body.chunks_exact(8)
        .filter_map(|d| {
            let len = u64::from(be_u32(d, 0)?);
            let flags = be_u32(d, 4)?;
            let kind = match (
                flags & allocation::STATE_HOLE,
                flags & allocation::STATE_ZERO,
            ) {
                (_, 0) => ExtentKind::Data,
                (0, _) => ExtentKind::Zero,
                _ => ExtentKind::Hole,
            };
            let extent = Extent::new(offset, len, kind);
            offset += len;
            (len > 0).then_some(extent)
        })
        .collect()
}
