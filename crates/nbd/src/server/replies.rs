//! Building transmission replies as lists of buffers for one `writev`.
//!
//! Read data is never copied: the buffer the store filled is sent as one of
//! the parts, or sliced into data chunks around runs of zeroes, which go out
//! as hole chunks when structured replies are on.

use bytes::{BufMut, Bytes, BytesMut};
use dmm_store::{ErrorKind, Extent, ExtentKind};

use crate::proto::{Command, allocation, chunk, encode_chunk_header, encode_simple_reply, errno};

/// One reply, as the buffers to send in order.
pub(crate) type Reply = Vec<Bytes>;

/// Zero detection granularity for sparse reads.
const ZERO_BLOCK: u64 = 4096;
/// Reads below this size go out as one chunk (no zero scan).
const SCAN_THRESHOLD: usize = 2 * ZERO_BLOCK as usize;
/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1024;

/// The NBD error value for a store failure of a given command.
pub(crate) fn wire_errno(kind: ErrorKind, command: Command) -> u32 {
    match kind {
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::ReadOnly | ErrorKind::PermissionDenied => errno::EPERM,
        ErrorKind::InvalidInput => errno::EINVAL,
        ErrorKind::OutOfRange if command == Command::Read => errno::EINVAL,
        ErrorKind::OutOfRange => errno::ENOSPC,
        ErrorKind::Unsupported if command == Command::WriteZeroes => errno::ENOTSUP,
        ErrorKind::Unsupported => errno::EINVAL,
        ErrorKind::Shutdown => errno::ESHUTDOWN,
        ErrorKind::Io | ErrorKind::NotFound | ErrorKind::Disconnected | ErrorKind::Protocol => {
            errno::EIO
        }
    }
}

fn header(len: usize, fill: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(len);
    fill(&mut buf);
    buf.freeze()
}

/// Success without data.
pub(crate) fn done(cookie: u64, structured: bool) -> Reply {
    if structured {
        vec![header(20, |b| {
            encode_chunk_header(b, chunk::FLAG_DONE, chunk::NONE, cookie, 0)
        })]
    } else {
        vec![header(16, |b| encode_simple_reply(b, 0, cookie))]
    }
}

/// An error, with a message for humans when structured replies allow one.
pub(crate) fn error(cookie: u64, structured: bool, errno: u32, message: &str) -> Reply {
    if !structured {
        return vec![header(16, |b| encode_simple_reply(b, errno, cookie))];
    }
    let message = &message.as_bytes()[..message.len().min(4096)];
    let len = 6 + message.len();
    vec![header(20 + len, |b| {
        encode_chunk_header(b, chunk::FLAG_DONE, chunk::ERROR, cookie, len as u32);
        b.put_u32(errno);
        b.put_u16(message.len() as u16);
        b.put_slice(message);
    })]
}

/// Data read at `offset`.
pub(crate) fn read(cookie: u64, offset: u64, data: Vec<u8>, structured: bool, df: bool) -> Reply {
    if !structured {
        return vec![
            header(16, |b| encode_simple_reply(b, 0, cookie)),
            Bytes::from(data),
        ];
    }
    if df || data.len() < SCAN_THRESHOLD {
        if !df && !data.is_empty() && is_zero(&data) {
            return vec![hole_chunk(cookie, offset, data.len() as u32, true)];
        }
        return data_chunk(cookie, offset, Bytes::from(data), true);
    }
    sparse_read(cookie, offset, Bytes::from(data))
}

/// Splits a read into data chunks and hole chunks.
fn sparse_read(cookie: u64, offset: u64, data: Bytes) -> Reply {
    let runs = zero_runs(offset, &data);
    let last = runs.len() - 1;
    let mut reply = Vec::with_capacity(runs.len() * 2);
    for (i, (start, end, zero)) in runs.into_iter().enumerate() {
        let at = offset + start as u64;
        if zero {
            reply.push(hole_chunk(cookie, at, (end - start) as u32, i == last));
        } else {
            reply.extend(data_chunk(cookie, at, data.slice(start..end), i == last));
        }
    }
    reply
}

/// Runs of (start, end, all-zero) within `data`, cut at absolute
/// `ZERO_BLOCK` boundaries and merged.
fn zero_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let next_boundary = ((offset + start as u64) / ZERO_BLOCK + 1) * ZERO_BLOCK;
        let end = ((next_boundary - offset) as usize).min(data.len());
        let zero = is_zero(&data[start..end]);
        match runs.last_mut() {
            Some(run) if run.2 == zero => run.1 = end,
            _ => runs.push((start, end, zero)),
        }
        start = end;
    }
    runs
}

/// Whether every byte is zero; ORs 64-byte blocks so the loop vectorizes.
fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    blocks.all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

fn data_chunk(cookie: u64, offset: u64, data: Bytes, last: bool) -> Reply {
    let flags = if last { chunk::FLAG_DONE } else { 0 };
    let len = 8 + data.len() as u32;
    vec![
        header(28, |b| {
            encode_chunk_header(b, flags, chunk::OFFSET_DATA, cookie, len);
            b.put_u64(offset);
        }),
        data,
    ]
}

fn hole_chunk(cookie: u64, offset: u64, len: u32, last: bool) -> Bytes {
    let flags = if last { chunk::FLAG_DONE } else { 0 };
    header(32, |b| {
        encode_chunk_header(b, flags, chunk::OFFSET_HOLE, cookie, 12);
        b.put_u64(offset);
        b.put_u32(len);
    })
}

/// The `base:allocation` status bits of an extent.
fn status(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero => allocation::STATE_ZERO,
        ExtentKind::Hole => allocation::STATE_HOLE | allocation::STATE_ZERO,
    }
}

/// A block status reply for `extents`, clipped to the request.
pub(crate) fn block_status(
    cookie: u64,
    context: u32,
    offset: u64,
    length: u32,
    extents: &[Extent],
    only_one: bool,
) -> Reply {
    let end = offset + u64::from(length);
    let limit = if only_one { 1 } else { MAX_DESCRIPTORS };
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    for extent in extents
        .iter()
        .filter(|e| e.end() > offset && e.offset < end)
    {
        let len = (extent.end().min(end) - extent.offset.max(offset)) as u32;
        let full = descriptors.len() == limit;
        match descriptors.last_mut() {
            Some(last) if last.1 == status(extent.kind) => last.0 += len,
            _ if full => break,
            _ => descriptors.push((len, status(extent.kind))),
        }
    }
    if descriptors.is_empty() {
        // Status 0 (allocated, contents unknown) is always a safe answer.
        descriptors.push((length, 0));
    }
    let len = 4 + 8 * descriptors.len();
    vec![header(20 + len, |b| {
        encode_chunk_header(b, chunk::FLAG_DONE, chunk::BLOCK_STATUS, cookie, len as u32);
        b.put_u32(context);
        for (len, flags) in descriptors {
            b.put_u32(len);
            b.put_u32(flags);
        }
    })]
}
