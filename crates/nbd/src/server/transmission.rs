//! The transmission phase: requests in, replies out, many in flight.
//!
//! One task per connection reads requests with a framed decoder (a single
//! `read` often brings in many), checks each against the export, runs the
//! valid ones concurrently, and sends whatever replies have accumulated with
//! one `writev`. A write's payload is read in
//! full before the write is started, so a client that hangs up mid-request
//! leaves nothing half-written. On shutdown the reader stops, in-flight
//! requests finish and their replies are sent.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use dmm_store::ZeroMode;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::handshake::Session;
use super::replies::{self, Reply};
use super::{ConnectionError, ServerConfig};
use crate::proto::{Command, ProtocolError, RequestHeader, cmd_flag, errno};

/// Socket read buffer per connection. Write payloads are split off it
/// without a copy; room for a couple of the largest common writes (1 MiB)
/// keeps a payload that arrives in pieces from being moved when the buffer
/// grows.
const READ_BUFFER: usize = 2 << 20;

/// A request with its payload (empty unless it is a write).
pub(crate) struct Request {
    header: RequestHeader,
    payload: Bytes,
}

/// Splits the byte stream into requests.
struct RequestDecoder {
    max_payload: u32,
    pending: Option<RequestHeader>,
}

impl Decoder for RequestDecoder {
    type Item = Request;
    type Error = ConnectionError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, ConnectionError> {
        let header = match self.pending.take() {
            Some(header) => header,
            None => {
                let Some(bytes) = src.get(..RequestHeader::SIZE) else {
                    src.reserve(RequestHeader::SIZE);
                    return Ok(None);
                };
                let header = RequestHeader::parse(bytes.try_into().expect("header size"))?;
                src.advance(RequestHeader::SIZE);
                header
            }
        };
        if !header.command.has_payload() {
            let payload = Bytes::new();
            return Ok(Some(Request { header, payload }));
        }
        let len = header.length as usize;
        if header.length > self.max_payload {
            let (what, limit) = ("write payload", self.max_payload.into());
            return Err(ProtocolError::TooLarge {
                what,
                len: len as u64,
                limit,
            }
            .into());
        }
        if src.len() < len {
            src.reserve(len - src.len());
            self.pending = Some(header);
            return Ok(None);
        }
        let payload = src.split_to(len).freeze();
        make_room(src, len);
        Ok(Some(Request { header, payload }))
    }
}

/// Replies waiting for the socket, as buffers in order; each flagged if it
/// ends a reply.
#[derive(Default)]
struct Outbox {
    parts: VecDeque<(Bytes, bool)>,
    replies: usize,
    bytes: usize,
}

impl Outbox {
    fn push(&mut self, reply: Reply) {
        let last = reply.len().saturating_sub(1);
        for (i, part) in reply.into_iter().enumerate() {
            self.bytes += part.len();
            self.parts.push_back((part, i == last));
        }
        self.replies += 1;
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Removes `written` bytes from the front.
    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while let Some((part, last)) = self.parts.front_mut() {
            if written < part.len() {
                part.advance(written);
                return;
            }
            written -= part.len();
            if *last {
                self.replies -= 1;
            }
            self.parts.pop_front();
        }
    }

    /// Writes as much as the socket takes; `Ok(true)` if anything went out.
    fn poll_send<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Result<bool, ConnectionError> {
        let mut sent = false;
        while !self.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .parts
                .iter()
                .take(MAX_IOV)
                .map(|(part, _)| IoSlice::new(part))
                .collect();
            match Pin::new(&mut *stream).poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(written)) => {
                    self.consume(written);
                    sent = true;
                }
                Poll::Ready(Err(err)) => return Err(err.into()),
                Poll::Pending => break,
            }
        }
        // A TLS stream may keep the end of what it encrypted until flushed,
        // also from an earlier round whose write the socket cut short, so
        // every round flushes (a plain socket's flush is ready at once and
        // does nothing); when it cannot finish now, the socket wakes this
        // task.
        if let Poll::Ready(Err(err)) = Pin::new(&mut *stream).poll_flush(cx) {
            return Err(err.into());
        }
        Ok(sent)
    }
}

/// Buffers per `writev` (the kernel's IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

type InFlight = FuturesUnordered<BoxFuture<'static, (Reply, usize)>>;

/// One connection in transmission: a single task reads requests, drives
/// their execution and writes the replies, so a reply is sent from the
/// thread (and CPU cache) that produced it.
struct Connection<S> {
    requests: FramedRead<S, RequestDecoder>,
    session: Arc<Session>,
    config: ServerConfig,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    in_flight: InFlight,
    in_flight_bytes: usize,
    outbox: Outbox,
    reading: bool,
    /// The socket failed: replies are dropped, requests still finish.
    broken: bool,
    result: Result<(), ConnectionError>,
}

/// Makes sure a payload as large as the one just taken will fit without
/// growing the buffer later: growing then would copy the part of it that has
/// already arrived. Done while little is buffered, the move is cheap.
fn make_room(src: &mut BytesMut, last_payload: usize) {
    let wanted = RequestHeader::SIZE + last_payload;
    if src.len() < 64 * 1024 && src.capacity() - src.len() < wanted {
        src.reserve(READ_BUFFER.max(wanted));
    }
}

/// Serves requests until the client disconnects or `shutdown` fires.
pub(crate) async fn serve<S>(
    stream: S,
    session: Session,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let decoder = RequestDecoder {
        max_payload: config.max_payload,
        pending: None,
    };
    let mut connection = Connection {
        requests: FramedRead::with_capacity(stream, decoder, READ_BUFFER),
        session: Arc::new(session),
        config: config.clone(),
        shutdown: Box::pin(shutdown.cancelled_owned()),
        in_flight: FuturesUnordered::new(),
        in_flight_bytes: 0,
        outbox: Outbox::default(),
        reading: true,
        broken: false,
        result: Ok(()),
    };
    std::future::poll_fn(|cx| connection.poll(cx)).await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        loop {
            if self.reading && self.shutdown.as_mut().poll(cx).is_ready() {
                self.reading = false;
            }
            let mut progress = self.poll_requests(cx);
            progress |= self.poll_in_flight(cx);
            progress |= self.poll_outbox(cx);
            if !self.reading && self.in_flight.is_empty() && self.outbox.is_empty() {
                return Poll::Ready(std::mem::replace(&mut self.result, Ok(())));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() + self.outbox.replies < self.config.max_in_flight
            && self.in_flight_bytes + self.outbox.bytes < self.config.max_in_flight_bytes
    }

    /// Takes in every request that has arrived, while there is room.
    fn poll_requests(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while self.reading && self.has_room() {
            let request = match self.requests.poll_next_unpin(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(request))) => request,
                Poll::Ready(Some(Err(err))) => {
                    self.fail(err);
                    break;
                }
                Poll::Ready(None) => {
                    self.reading = false;
                    break;
                }
            };
            progress = true;
            match admit(&self.session, &request.header) {
                Admission::Run => {
                    let bytes = request.header.length as usize;
                    self.in_flight_bytes += bytes;
                    let work = execute(self.session.clone(), request, bytes);
                    self.in_flight.push(Box::pin(work));
                }
                Admission::Refuse(reply) => self.queue(reply),
                Admission::Disconnect => self.reading = false,
            }
        }
        progress
    }

    fn poll_in_flight(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while let Poll::Ready(Some((reply, bytes))) = self.in_flight.poll_next_unpin(cx) {
            self.in_flight_bytes -= bytes;
            self.queue(reply);
            progress = true;
        }
        progress
    }

    fn poll_outbox(&mut self, cx: &mut Context<'_>) -> bool {
        match self.outbox.poll_send(self.requests.get_mut(), cx) {
            Ok(sent) => sent,
            Err(err) => {
                self.fail(err);
                true
            }
        }
    }

    fn queue(&mut self, reply: Reply) {
        if !self.broken {
            self.outbox.push(reply);
        }
    }

    /// Stops reading and replying; requests already running still finish.
    fn fail(&mut self, err: ConnectionError) {
        self.reading = false;
        self.broken = true;
        self.outbox = Outbox::default();
        if self.result.is_ok() {
            self.result = Err(err);
        }
    }
}

enum Admission {
    Run,
    Refuse(Reply),
    Disconnect,
}

/// Checks a request against the export before anything runs.
fn admit(session: &Session, header: &RequestHeader) -> Admission {
    match check(session, header) {
        Ok(Command::Disconnect) => Admission::Disconnect,
        Ok(_) => Admission::Run,
        Err((errno, message)) => Admission::Refuse(replies::error(
            header.cookie,
            session.structured,
            errno,
            &message,
        )),
    }
}

fn check(session: &Session, header: &RequestHeader) -> Result<Command, (u32, String)> {
    let command = header.command;
    let mut allowed = cmd_flag::FUA;
    let mut writes = false;
    let mut max_length = u32::MAX;
    match command {
        Command::Disconnect | Command::Flush => return Ok(command),
        Command::Read => {
            if session.structured {
                allowed |= cmd_flag::DF;
            }
            max_length = session.max_payload;
        }
        Command::Write | Command::Trim => writes = true,
        Command::WriteZeroes => {
            writes = true;
            allowed |= cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO;
        }
        Command::Cache => {}
        Command::BlockStatus => {
            allowed |= cmd_flag::REQ_ONE;
            if session.allocation.is_none() {
                return Err((errno::EINVAL, "no metadata context was negotiated".into()));
            }
            if header.length == 0 {
                return Err((errno::EINVAL, "block status of zero bytes".into()));
            }
        }
        Command::Unknown(code) => return Err((errno::EINVAL, format!("unknown command {code}"))),
    }
    if header.flags & !allowed != 0 {
        let message = format!("flags {:#x} not valid for {command:?}", header.flags);
        return Err((errno::EINVAL, message));
    }
    if writes && session.export.is_read_only() {
        return Err((errno::EPERM, "export is read-only".into()));
    }
    if header.length > max_length {
        let message = format!("request of {} bytes exceeds {max_length}", header.length);
        return Err((errno::EINVAL, message));
    }
    let size = session.export.store.size();
    if header.end().is_none_or(|end| end > size) {
        let errno = if writes { errno::ENOSPC } else { errno::EINVAL };
        let message = format!("range beyond the end of the export ({size} bytes)");
        return Err((errno, message));
    }
    Ok(command)
}

/// Runs one admitted request; returns its reply and the bytes it held.
async fn execute(session: Arc<Session>, request: Request, bytes: usize) -> (Reply, usize) {
    let Request { header, payload } = request;
    let store = &session.export.store;
    let (cookie, offset, length) = (header.cookie, header.offset, header.length);
    let fua = header.flags & cmd_flag::FUA != 0;
    let structured = session.structured;
    let outcome = match header.command {
        Command::Read => {
            let df = header.flags & cmd_flag::DF != 0;
            store
                .read(offset, length as usize)
                .await
                .map(|data| Some(replies::read(cookie, offset, data, structured, df)))
        }
        Command::Write => store.write(offset, payload, fua).await.map(|()| None),
        Command::Flush => store.flush().await.map(|()| None),
        Command::Trim => store
            .discard(offset, length.into(), fua)
            .await
            .map(|()| None),
        Command::WriteZeroes => {
            let mode = ZeroMode {
                may_punch: header.flags & cmd_flag::NO_HOLE == 0,
                fast_only: header.flags & cmd_flag::FAST_ZERO != 0,
            };
            let zeroed = store.write_zeroes(offset, length.into(), mode, fua).await;
            zeroed.map(|()| None)
        }
        Command::Cache => store.cache(offset, length.into()).await.map(|()| None),
        Command::BlockStatus => {
            let only_one = header.flags & cmd_flag::REQ_ONE != 0;
            let context = session.allocation.unwrap_or_default();
            store.extents(offset, length.into()).await.map(|extents| {
                Some(replies::block_status(
                    cookie, context, offset, length, &extents, only_one,
                ))
            })
        }
        Command::Disconnect | Command::Unknown(_) => unreachable!("refused by check"),
    };
    let reply = match outcome {
        Ok(Some(reply)) => reply,
        Ok(None) => replies::done(cookie, structured),
        Err(err) => {
            tracing::warn!(export = %session.export.name, "{err:?}");
            let errno = replies::wire_errno(err.kind(), header.command);
            replies::error(cookie, structured, errno, &err.to_string())
        }
    };
    (reply, bytes)
}
