//! zstd's seekable format (zstd's `contrib/seekable_format`): a file of
//! independent zstd frames, each holding at most [`FRAME_BYTES`] of the
//! stream, followed by a skippable frame holding the seek table.
//!
//! On disk, field by field (little-endian):
//!
//! | field | bytes | meaning |
//! |---|---|---|
//! | frames | … | zstd frames, each with its content checksum |
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

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Stream bytes per frame, at most: a read decompresses this much at most.
pub const FRAME_BYTES: usize = 256 << 10;

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const FOOTER_BYTES: usize = 9;
const ENTRY_BYTES: usize = 8;
/// The zstd level of the dense tiers: fast enough to compress on the
/// write path.
const LEVEL: i32 = 3;

/// Why a seekable file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0}: no seek table at its end")]
    NoSeekTable(String),
    #[error("{0}: the seek table names {1} bytes of frames, the file holds {2}")]
    Inconsistent(String, u64, u64),
    #[error("{what}: offset {offset} is beyond its {len} bytes")]
    OutOfRange { what: String, offset: u64, len: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One frame: where it is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Its offset in the file.
    pub at: u64,
    pub compressed: u32,
    /// Its offset in the stream.
    pub start: u64,
    pub decompressed: u32,
}

/// A seekable zstd file open for reading and appending frames.
pub struct SeekableFile {
    file: File,
    name: String,
    frames: Vec<Frame>,
}

impl SeekableFile {
    /// Creates an empty one (no frame, an empty seek table).
    pub fn create(path: &Path) -> Result<SeekableFile> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut seekable = SeekableFile {
            file,
            name: path.display().to_string(),
            frames: Vec::new(),
        };
        seekable.write_table()?;
        Ok(seekable)
    }

    /// Opens one and reads its seek table.
    pub fn open(path: &Path) -> Result<SeekableFile> {
        let file = File::options().read(true).write(true).open(path)?;
        let name = path.display().to_string();
        let frames = read_table(&file, &name)?;
        Ok(SeekableFile { file, name, frames })
    }

    /// The stream bytes it holds.
    pub fn len(&self) -> u64 {
        self.frames
            .last()
            .map_or(0, |f| f.start + u64::from(f.decompressed))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Appends `data` (at most [`FRAME_BYTES`] per frame, split if longer)
    /// as frames, then the seek table covering them. Durable once
    /// [`SeekableFile::sync`] returned.
    pub fn append(&mut self, data: &[u8]) -> Result<()> {
        for piece in data.chunks(FRAME_BYTES) {
            let compressed = zstd::bulk::Compressor::new(LEVEL).and_then(|mut c| {
                c.include_checksum(true)?;
                c.compress(piece)
            })?;
            let at = self.frames_end();
            self.file.write_all_at(&compressed, at)?;
            self.frames.push(Frame {
                at,
                compressed: compressed.len() as u32,
                start: self.len(),
                decompressed: piece.len() as u32,
            });
        }
        self.write_table()
    }

    /// Appends the frames of `other` after its own (the link of two
    /// extents): its compressed bytes are copied, not recompressed.
    pub fn link(&mut self, other: &SeekableFile) -> Result<()> {
        for frame in &other.frames {
            let mut bytes = vec![0; frame.compressed as usize];
            other.file.read_exact_at(&mut bytes, frame.at)?;
            let at = self.frames_end();
            self.file.write_all_at(&bytes, at)?;
            self.frames.push(Frame {
                at,
                start: self.len(),
                ..*frame
            });
        }
        self.write_table()
    }

    /// Makes what was appended durable.
    pub fn sync(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }

    /// `len` stream bytes from `offset` (fewer at the end of the stream).
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if offset > self.len() {
            return Err(Error::OutOfRange {
                what: self.name.clone(),
                offset,
                len: self.len(),
            });
        }
        let end = (offset + len as u64).min(self.len());
        let first = self
            .frames
            .partition_point(|f| f.start + u64::from(f.decompressed) <= offset);
        let mut out = Vec::with_capacity((end - offset) as usize);
        for frame in &self.frames[first..] {
            if frame.start >= end {
                break;
            }
            let whole = self.decompress(frame)?;
            let from = offset.saturating_sub(frame.start) as usize;
            let to = ((end - frame.start) as usize).min(whole.len());
            out.extend_from_slice(&whole[from..to]);
        }
        Ok(out)
    }

    fn decompress(&self, frame: &Frame) -> Result<Vec<u8>> {
        let mut compressed = vec![0; frame.compressed as usize];
        self.file.read_exact_at(&mut compressed, frame.at)?;
        Ok(zstd::bulk::decompress(
            &compressed,
            frame.decompressed as usize,
        )?)
    }

    fn frames_end(&self) -> u64 {
        self.frames
            .last()
            .map_or(0, |f| f.at + u64::from(f.compressed))
    }

    /// Writes the seek table after the frames and cuts the file there.
    fn write_table(&mut self) -> Result<()> {
        let at = self.frames_end();
        let table = encode_table(&self.frames);
        self.file.write_all_at(&table, at)?;
        self.file.set_len(at + table.len() as u64)?;
        Ok(())
    }
}

/// The skippable frame holding the seek table of `frames`.
fn encode_table(frames: &[Frame]) -> Vec<u8> {
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

/// The frames named by the seek table at the end of `file`.
fn read_table(file: &File, name: &str) -> Result<Vec<Frame>> {
    let size = file.metadata()?.len();
    let missing = || Error::NoSeekTable(name.to_owned());
    if size < (8 + FOOTER_BYTES) as u64 {
        return Err(missing());
    }
    let mut footer = [0u8; FOOTER_BYTES];
    file.read_exact_at(&mut footer, size - FOOTER_BYTES as u64)?;
    let word = |bytes: &[u8]| u32::from_le_bytes(bytes.try_into().expect("four bytes"));
    if word(&footer[5..9]) != SEEKABLE_MAGIC || footer[4] & 0x80 != 0 {
        return Err(missing());
    }
    let count = word(&footer[0..4]) as u64;
    let table_bytes = 8 + count * ENTRY_BYTES as u64 + FOOTER_BYTES as u64;
    if table_bytes > size {
        return Err(missing());
    }
    let mut table = vec![0u8; table_bytes as usize];
    file.read_exact_at(&mut table, size - table_bytes)?;
    if word(&table[0..4]) != SKIPPABLE_MAGIC {
        return Err(missing());
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
    if at != size - table_bytes {
        return Err(Error::Inconsistent(name.to_owned(), at, size - table_bytes));
    }
    Ok(frames)
}
