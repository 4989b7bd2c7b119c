//! zstd's seekable format (zstd's `contrib/seekable_format`): a file of
//! independent zstd frames, each holding at most [`FRAME_BYTES`] of the
//! stream, followed by a skippable frame holding the seek table.
//!
//! On disk, field by field (little-endian):
//!
//! | field | bytes | meaning |
//! |---|---|---|
//! | frames | … | zstd frames, each with its content size and checksum |
//! | skippable magic | 4 | `0x184D2A5E` |
//! | frame size | 4 | bytes of the seek table that follow: 8 per entry + 9 |
//! | entries | 8 each | per frame: its compressed size (u32), then its decompressed size (u32) |
//! | number of frames | 4 | |
//! | descriptor | 1 | 0: entries carry no checksum (each zstd frame has its own) |
//! | seekable magic | 4 | `0x8F92EAB1` |
//!
//! `zstd -d` skips the skippable frame and decompresses the frames one
//! after another: the file reads back as the whole stream. A reader of an
//! offset finds its frame through the table and decompresses that frame
//! alone. Frames concatenate, so two files link into one by appending the
//! second's frames after the first's and writing one table for all.
//!
//! A tail being appended to has no table (writing one after every frame
//! would cost a rewrite that grows with the file): the table is written
//! when the extent is sealed. A file without one, or whose last frame a
//! crash tore, is read by [`scan`], which walks the frames from the start
//! and keeps those that decompress with a good checksum.
//!
//! A move's target file holds the drained bytes in its *head*, a region
//! reserved at the switch ([`head_bytes`]: room for the drained bytes
//! compressed, whatever they compress to) before the frames appended from
//! the switch on. Once drained, what the head's frames left of it becomes
//! *padding*: skippable frames (magic `0x184D2A50`, a 4-byte size, then
//! nothing written: a hole), which `zstd -d` skips and the seek table
//! lists as frames of no stream bytes. So no byte is written twice to the
//! new tier, and the target is one zstd file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use zstd::zstd_safe;

/// Stream bytes per frame, at most: a read decompresses this much at most.
pub const FRAME_BYTES: usize = 256 << 10;

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// The skippable frames that pad a target's head.
const PADDING_MAGIC: u32 = 0x184D_2A50;
/// A skippable frame's header: magic and size.
const SKIPPABLE_HEADER: u64 = 8;
/// The largest padding frame (its size field is a u32).
const PADDING_MAX: u64 = 1 << 31;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const FOOTER_BYTES: usize = 9;
const ENTRY_BYTES: usize = 8;
/// The zstd level of the dense tiers: fast enough to compress on the
/// write path.
const LEVEL: i32 = 3;
/// The most a frame of [`FRAME_BYTES`] compresses to (incompressible data
/// grows a little), which [`scan`] reads to find a frame's size.
const FRAME_BOUND: usize = FRAME_BYTES + (FRAME_BYTES >> 7) + 1024;

/// One frame: where it is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Its offset in the file.
    pub at: u64,
    pub compressed: u32,
    /// Its offset in the file's stream bytes.
    pub start: u64,
    pub decompressed: u32,
}

impl Frame {
    /// The file offset after it.
    pub fn file_end(&self) -> u64 {
        self.at + u64::from(self.compressed)
    }

    /// The stream offset (within the file) after it.
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.decompressed)
    }
}

/// One frame of `data` (at most [`FRAME_BYTES`]), with content size and
/// checksum.
pub fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    debug_assert!(data.len() <= FRAME_BYTES);
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    compressor.include_checksum(true)?;
    compressor.include_contentsize(true)?;
    compressor.compress(data)
}

/// The file bytes a target reserves for a head of `stream_bytes` (drained
/// in frames of [`FRAME_BYTES`]): their compressed bound, and room for a
/// padding frame's header.
pub fn head_bytes(stream_bytes: u64) -> u64 {
    let frames = stream_bytes / FRAME_BYTES as u64;
    let last = (stream_bytes % FRAME_BYTES as u64) as usize;
    let bound = |len: usize| zstd_safe::compress_bound(len) as u64;
    frames * bound(FRAME_BYTES) + if last > 0 { bound(last) } else { 0 } + SKIPPABLE_HEADER
}

/// The padding frames filling `[at, end)` of a file (at least
/// [`SKIPPABLE_HEADER`] bytes): where each goes and its header.
pub fn padding(mut at: u64, end: u64, start: u64) -> Vec<(Frame, [u8; 8])> {
    let mut frames = Vec::new();
    while at < end {
        let mut len = (end - at).min(PADDING_MAX);
        if end - at - len < SKIPPABLE_HEADER && end - at > len {
            len -= SKIPPABLE_HEADER;
        }
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&PADDING_MAGIC.to_le_bytes());
        header[4..].copy_from_slice(&((len - SKIPPABLE_HEADER) as u32).to_le_bytes());
        frames.push((
            Frame {
                at,
                compressed: len as u32,
                start,
                decompressed: 0,
            },
            header,
        ));
        at += len;
    }
    frames
}

/// The stream bytes of `frame`, read from `file` (none for padding).
pub fn decompress(file: &File, frame: &Frame) -> io::Result<Vec<u8>> {
    if frame.decompressed == 0 {
        return Ok(Vec::new());
    }
    let mut compressed = vec![0; frame.compressed as usize];
    file.read_exact_at(&mut compressed, frame.at)?;
    zstd::bulk::decompress(&compressed, frame.decompressed as usize)
}

/// The skippable frame holding the seek table of `frames`.
pub fn encode_table(frames: &[Frame]) -> Vec<u8> {
    let body = frames.len() * ENTRY_BYTES + FOOTER_BYTES;
    let mut table = Vec::with_capacity(8 + body);
    table.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    table.extend_from_slice(&(body as u32).to_le_bytes());
    for frame in frames {
        table.extend_from_slice(&frame.compressed.to_le_bytes());
        table.extend_from_slice(&frame.decompressed.to_le_bytes());
    }
    table.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    table.push(0);
    table.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    table
}

/// What a file holds, as found by [`table`] or [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub frames: Vec<Frame>,
    /// A valid seek table follows the frames.
    pub sealed: bool,
}

impl Found {
    /// The file offset after the last frame.
    pub fn frames_end(&self) -> u64 {
        self.frames.last().map_or(0, Frame::file_end)
    }
}

/// The frames of `file`: from its seek table when it has a valid one,
/// else by [`scan`].
pub fn frames_of(file: &File) -> io::Result<Found> {
    match table(file)? {
        Some(frames) => Ok(Found {
            frames,
            sealed: true,
        }),
        None => Ok(Found {
            frames: scan(file, 0, 0, u64::MAX)?,
            sealed: false,
        }),
    }
}

/// The frames named by the seek table at the end of `file`, if it has
/// one that agrees with the file's size.
fn table(file: &File) -> io::Result<Option<Vec<Frame>>> {
    let size = file.metadata()?.len();
    if size < (8 + FOOTER_BYTES) as u64 {
        return Ok(None);
    }
    let mut footer = [0u8; FOOTER_BYTES];
    file.read_exact_at(&mut footer, size - FOOTER_BYTES as u64)?;
    if word(&footer[5..9]) != SEEKABLE_MAGIC || footer[4] & 0x80 != 0 {
        return Ok(None);
    }
    let count = u64::from(word(&footer[0..4]));
    let table_bytes = 8 + count * ENTRY_BYTES as u64 + FOOTER_BYTES as u64;
    if table_bytes > size {
        return Ok(None);
    }
    let mut table = vec![0u8; table_bytes as usize];
    file.read_exact_at(&mut table, size - table_bytes)?;
    if word(&table[0..4]) != SKIPPABLE_MAGIC {
        return Ok(None);
    }
    let (mut frames, mut at, mut start) = (Vec::with_capacity(count as usize), 0u64, 0u64);
    for entry in table[8..8 + count as usize * ENTRY_BYTES].chunks(ENTRY_BYTES) {
        let (compressed, decompressed) = (word(&entry[0..4]), word(&entry[4..8]));
        frames.push(Frame {
            at,
            compressed,
            start,
            decompressed,
        });
        at += u64::from(compressed);
        start += u64::from(decompressed);
    }
    Ok((at == size - table_bytes).then_some(frames))
}

/// The frames of `file` found by walking them from file offset `at`
/// (stream offset `start`) up to `limit`: each one whose size its header
/// gives, that fits in the file, and that decompresses with a good
/// checksum, and padding frames. The walk stops at the first that does
/// not (a frame a crash tore, a head not filled yet) or at a seek table.
pub fn scan(file: &File, mut at: u64, mut start: u64, limit: u64) -> io::Result<Vec<Frame>> {
    let size = file.metadata()?.len().min(limit);
    let mut frames = Vec::new();
    let mut window = vec![0u8; FRAME_BOUND];
    while at < size {
        let len = ((size - at) as usize).min(FRAME_BOUND);
        file.read_exact_at(&mut window[..len], at)?;
        let Some(frame) = frame_at(&window[..len], at, start, size - at) else {
            break;
        };
        at = frame.file_end();
        start = frame.end();
        frames.push(frame);
    }
    Ok(frames)
}

/// The whole, valid frame at the start of `bytes` (`left` bytes of the
/// file from there), if there is one.
fn frame_at(bytes: &[u8], at: u64, start: u64, left: u64) -> Option<Frame> {
    if bytes.len() >= SKIPPABLE_HEADER as usize && word(&bytes[..4]) == PADDING_MAGIC {
        let len = SKIPPABLE_HEADER + u64::from(word(&bytes[4..8]));
        return (len <= left).then_some(Frame {
            at,
            compressed: len as u32,
            start,
            decompressed: 0,
        });
    }
    if bytes.len() >= 4 && word(&bytes[..4]) == SKIPPABLE_MAGIC {
        return None;
    }
    let compressed = zstd_safe::find_frame_compressed_size(bytes).ok()?;
    let content = zstd_safe::get_frame_content_size(bytes).ok()??;
    if compressed > bytes.len() || content > FRAME_BYTES as u64 {
        return None;
    }
    let whole = zstd::bulk::decompress(&bytes[..compressed], content as usize).ok()?;
    (whole.len() as u64 == content).then_some(Frame {
        at,
        compressed: compressed as u32,
        start,
        decompressed: content as u32,
    })
}

fn word(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("four bytes"))
}
