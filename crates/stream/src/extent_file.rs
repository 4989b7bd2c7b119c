//! One extent's file on a tier, in the tier's format, open for appends
//! and reads at once: the writer appends, readers read any offset, the
//! mover fills a target's head, and none of them waits for another's I/O
//! (each copies what it needs under a short lock and does its I/O outside
//! it).
//!
//! A plain file holds the extent's bytes as they are. A zstd file holds
//! frames ([`crate::seekable`]); the bytes appended since the last frame
//! are kept in memory until a frame is full or the writer syncs (a sync
//! closes a short frame, so fsynced bytes are never only in memory), and
//! the seek table is written when the extent is sealed.
//!
//! A move's target has a *head*: the room for the drained bytes, reserved
//! at the switch before the appends that follow it ([`ExtentFile::reserve_head`]),
//! filled by the drain ([`ExtentFile::fill_head`]) and closed by the link
//! ([`ExtentFile::close_head`]). The file's byte 0 is the source's first
//! stream byte either way.
//!
//! One appender per end: the stream's writer appends to the tail
//! (`append`, `sync`, `seal`), the mover fills the head (`fill_head`,
//! `flush`, `close_head`).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result, on};
use crate::orbit::Format;
use crate::seekable::{self, FRAME_BYTES, Frame};

/// An open extent file.
pub struct ExtentFile {
    file: File,
    path: PathBuf,
    format: Format,
    held: Mutex<Held>,
}

/// What the file holds; its lock is held only to copy or update it.
#[derive(Default)]
struct Held {
    /// Stream bytes held: a head's (once reserved), the tail's, in the
    /// file and in `pending`.
    len: u64,
    /// zstd: the frames in the file, in order (a head's first).
    frames: Vec<Frame>,
    /// zstd: bytes after the last frame, not in the file yet.
    pending: Vec<u8>,
    /// The file offset the next tail frame or bytes go to.
    file_end: u64,
    /// A head being filled.
    head: Option<Head>,
    /// zstd: a seek table follows the frames.
    sealed: bool,
    /// Written since the last sync.
    dirty: bool,
}

/// A target's head while the drain fills it.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// Its stream bytes.
    bytes: u64,
    /// Stream bytes filled so far.
    filled: u64,
    /// File bytes reserved for it.
    reserved: u64,
    /// zstd: its frames so far (the first of `frames`), and where the
    /// next goes.
    frames: usize,
    cursor: u64,
}

impl ExtentFile {
    /// Creates an empty extent file (the caller syncs its directory).
    pub fn create(path: &Path, format: Format) -> Result<ExtentFile> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(on(ErrorKind::Tier, "create", path))?;
        Ok(ExtentFile {
            file,
            path: path.to_owned(),
            format,
            held: Mutex::new(Held::default()),
        })
    }

    /// Opens an extent file after a restart; `head` is a target's head
    /// when the move is switched but not linked: its stream bytes, and
    /// whether the drain filled it. A zstd file's frames are read from its
    /// seek table or found by a scan, and bytes a crash left after the
    /// last whole frame are cut.
    pub fn open(path: &Path, format: Format, head: Option<(u64, bool)>) -> Result<ExtentFile> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(on(ErrorKind::Tier, "open", path))?;
        let size = file
            .metadata()
            .map_err(on(ErrorKind::Tier, "stat", path))?
            .len();
        let held = match format {
            Format::Plain => plain_held(size, head),
            Format::Zstd => zstd_held(&file, head.map(|(bytes, _)| bytes)).map_err(on(
                ErrorKind::Tier,
                "read frames of",
                path,
            ))?,
        };
        if format == Format::Zstd && !held.sealed && held.file_end < size {
            file.set_len(held.file_end).map_err(on(
                ErrorKind::Tier,
                "cut the torn frame of",
                path,
            ))?;
        }
        Ok(ExtentFile {
            file,
            path: path.to_owned(),
            format,
            held: Mutex::new(held),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stream bytes it holds (a head's included once reserved).
    pub fn len(&self) -> u64 {
        self.held.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes it takes on its tier (a head's padding takes none).
    pub fn stored_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }

    /// Appends `data` after its last byte.
    pub fn append(&self, data: &[u8]) -> Result<()> {
        match self.format {
            Format::Plain => {
                let at = self.held.lock().file_end;
                self.file.write_all_at(data, at).map_err(on(
                    ErrorKind::Tier,
                    "append to",
                    &self.path,
                ))?;
                let mut held = self.held.lock();
                held.len += data.len() as u64;
                held.file_end += data.len() as u64;
                held.dirty = true;
                Ok(())
            }
            Format::Zstd => {
                let full = {
                    let mut held = self.held.lock();
                    self.unseal(&mut held)?;
                    held.pending.extend_from_slice(data);
                    held.len += data.len() as u64;
                    held.pending.len() / FRAME_BYTES
                };
                for _ in 0..full {
                    self.close_frame(FRAME_BYTES)?;
                }
                Ok(())
            }
        }
    }

    /// Makes every byte appended so far durable: a zstd file closes a
    /// frame of what it holds in memory first.
    pub fn sync(&self) -> Result<()> {
        let pending = self.held.lock().pending.len();
        if pending > 0 {
            self.close_frame(pending)?;
        }
        self.flush()
    }

    /// Makes what is in the file durable (not the bytes a zstd tail holds
    /// in memory): the mover's sync of a head.
    pub fn flush(&self) -> Result<()> {
        let dirty = std::mem::take(&mut self.held.lock().dirty);
        if dirty {
            self.file.sync_data().map_err(|err| {
                self.held.lock().dirty = true;
                Error::on(ErrorKind::Tier, "sync", &self.path).with_source(err)
            })?;
        }
        Ok(())
    }

    /// Syncs, then (zstd) writes the seek table after the frames and syncs
    /// it: the file is complete for any zstd reader. A target whose head
    /// is still open gets no table (its frames are not contiguous until
    /// the link).
    pub fn seal(&self) -> Result<()> {
        self.sync()?;
        if self.format == Format::Plain || self.held.lock().head.is_some() {
            return Ok(());
        }
        let (table, at) = {
            let held = self.held.lock();
            (seekable::encode_table(&held.frames), held.file_end)
        };
        let sealing = || on(ErrorKind::Tier, "write the seek table of", &self.path);
        self.file.write_all_at(&table, at).map_err(sealing())?;
        self.file
            .set_len(at + table.len() as u64)
            .map_err(sealing())?;
        self.file.sync_data().map_err(sealing())?;
        self.held.lock().sealed = true;
        Ok(())
    }

    /// The switch, on a new target: room for `bytes` stream bytes before
    /// the appends that follow. No I/O (it runs between two appends).
    pub fn reserve_head(&self, bytes: u64) {
        let mut held = self.held.lock();
        assert!(
            held.len == 0 && held.head.is_none(),
            "a head is reserved once, first"
        );
        let reserved = match self.format {
            Format::Plain => bytes,
            Format::Zstd => seekable::head_bytes(bytes),
        };
        held.len = bytes;
        held.file_end = reserved;
        held.head = Some(Head {
            bytes,
            filled: 0,
            reserved,
            frames: 0,
            cursor: 0,
        });
    }

    /// The stream bytes of its head filled so far (where a drain goes on
    /// from), if it has a head.
    pub fn head_filled(&self) -> Option<u64> {
        self.held.lock().head.map(|h| h.filled)
    }

    /// Writes the next `data` of the head (the drain).
    pub fn fill_head(&self, data: &[u8]) -> Result<()> {
        let head = self.held.lock().head.ok_or_else(|| self.no_head())?;
        if head.filled + data.len() as u64 > head.bytes {
            return Err(Error::on(ErrorKind::Tier, "fill the head of", &self.path)
                .with_detail(format!("{} bytes overflow its {}", data.len(), head.bytes)));
        }
        let filling = || on(ErrorKind::Tier, "fill the head of", &self.path);
        match self.format {
            Format::Plain => {
                self.file
                    .write_all_at(data, head.filled)
                    .map_err(filling())?;
                let mut held = self.held.lock();
                let head = held.head.as_mut().expect("a head");
                head.filled += data.len() as u64;
                held.dirty = true;
            }
            Format::Zstd => {
                for piece in data.chunks(FRAME_BYTES) {
                    let compressed = seekable::compress(piece).map_err(filling())?;
                    let at = self.held.lock().head.expect("a head").cursor;
                    self.file.write_all_at(&compressed, at).map_err(filling())?;
                    let mut held = self.held.lock();
                    let head = held.head.as_mut().expect("a head");
                    let frame = Frame {
                        at,
                        compressed: compressed.len() as u32,
                        start: head.filled,
                        decompressed: piece.len() as u32,
                    };
                    let index = head.frames;
                    head.frames += 1;
                    head.cursor += compressed.len() as u64;
                    head.filled += piece.len() as u64;
                    held.frames.insert(index, frame);
                    held.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Starts the head again (a drain that read back different).
    pub fn reset_head(&self) -> Result<()> {
        let mut held = self.held.lock();
        let head = held.head.as_mut().ok_or_else(|| self.no_head())?;
        let frames = head.frames;
        (head.filled, head.frames, head.cursor) = (0, 0, 0);
        held.frames.drain(..frames);
        Ok(())
    }

    /// The link: a filled head becomes part of the file (zstd: padding
    /// frames fill what its frames left of the room).
    pub fn close_head(&self) -> Result<()> {
        let head = self.held.lock().head.ok_or_else(|| self.no_head())?;
        if head.filled != head.bytes {
            return Err(
                Error::on(ErrorKind::Tier, "link", &self.path).with_detail(format!(
                    "its head holds {} of {} bytes",
                    head.filled, head.bytes
                )),
            );
        }
        if self.format == Format::Zstd {
            let padding = seekable::padding(head.cursor, head.reserved, head.bytes);
            let closing = || on(ErrorKind::Tier, "pad the head of", &self.path);
            for (frame, header) in &padding {
                self.file
                    .write_all_at(header, frame.at)
                    .map_err(closing())?;
            }
            // The room ends inside the file even with no appends after it
            // (a byte of the last padding frame: no data is overwritten).
            self.file
                .write_all_at(&[0], head.reserved - 1)
                .map_err(closing())?;
            let mut held = self.held.lock();
            let at = head.frames;
            held.frames
                .splice(at..at, padding.into_iter().map(|(frame, _)| frame));
        }
        let mut held = self.held.lock();
        held.head = None;
        held.dirty = true;
        Ok(())
    }

    /// Up to `len` stream bytes from `offset` (fewer at its end).
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let reading = || on(ErrorKind::Tier, "read", &self.path);
        match self.format {
            Format::Plain => {
                let end = (offset + len as u64).min(self.len());
                let mut bytes = vec![0; end.saturating_sub(offset) as usize];
                self.file
                    .read_exact_at(&mut bytes, offset)
                    .map_err(reading())?;
                Ok(bytes)
            }
            Format::Zstd => {
                let (frames, tail) = self.zstd_parts(offset, len);
                let end = offset + len as u64;
                let mut out = Vec::new();
                for frame in frames {
                    let whole = seekable::decompress(&self.file, &frame).map_err(reading())?;
                    let from = offset.saturating_sub(frame.start) as usize;
                    let to = (end.min(frame.end()) - frame.start) as usize;
                    out.extend_from_slice(&whole[from..to]);
                }
                out.extend_from_slice(&tail);
                Ok(out)
            }
        }
    }

    /// The frames holding part of `[offset, offset + len)`, and the part
    /// of it held in memory.
    fn zstd_parts(&self, offset: u64, len: usize) -> (Vec<Frame>, Vec<u8>) {
        let held = self.held.lock();
        let end = (offset + len as u64).min(held.len);
        if offset >= end {
            return (Vec::new(), Vec::new());
        }
        let first = held.frames.partition_point(|f| f.end() <= offset);
        let last = held.frames.partition_point(|f| f.start < end);
        let in_memory = held.len - held.pending.len() as u64;
        let tail = if end > in_memory {
            let from = (offset.max(in_memory) - in_memory) as usize;
            held.pending[from..(end - in_memory) as usize].to_vec()
        } else {
            Vec::new()
        };
        let frames = held.frames[first..last]
            .iter()
            .filter(|f| f.decompressed > 0)
            .copied()
            .collect();
        (frames, tail)
    }

    /// Compresses the first `bytes` of the pending bytes into a frame
    /// after the last.
    fn close_frame(&self, bytes: usize) -> Result<()> {
        let (data, at, start) = {
            let mut held = self.held.lock();
            self.unseal(&mut held)?;
            let start = held.len - held.pending.len() as u64;
            (held.pending[..bytes].to_vec(), held.file_end, start)
        };
        let writing = || on(ErrorKind::Tier, "append a frame to", &self.path);
        let compressed = seekable::compress(&data).map_err(writing())?;
        self.file.write_all_at(&compressed, at).map_err(writing())?;
        let mut held = self.held.lock();
        held.pending.drain(..bytes);
        held.file_end = at + compressed.len() as u64;
        held.frames.push(Frame {
            at,
            compressed: compressed.len() as u32,
            start,
            decompressed: bytes as u32,
        });
        held.dirty = true;
        Ok(())
    }

    /// Removes the seek table before the frames grow over it.
    fn unseal(&self, held: &mut Held) -> Result<()> {
        if held.sealed {
            self.file.set_len(held.file_end).map_err(on(
                ErrorKind::Tier,
                "reopen for appends",
                &self.path,
            ))?;
            held.sealed = false;
        }
        Ok(())
    }

    fn no_head(&self) -> Error {
        Error::on(ErrorKind::Conflict, "fill the head of", &self.path)
            .with_detail("it is no switched target")
    }
}

/// What a plain file holds after a restart: its bytes, or a head's room
/// and the appends after it.
fn plain_held(size: u64, head: Option<(u64, bool)>) -> Held {
    let len = head.map_or(size, |(bytes, _)| size.max(bytes));
    Held {
        len,
        file_end: len,
        // A drain not finished starts again: the head's bytes written
        // before the crash are overwritten with the same.
        head: head.map(|(bytes, drained)| Head {
            bytes,
            filled: if drained { bytes } else { 0 },
            reserved: bytes,
            frames: 0,
            cursor: 0,
        }),
        ..Held::default()
    }
}

/// What a zstd file holds after a restart: its frames (a head's, then
/// the tail's after its room, when it has a head).
fn zstd_held(file: &File, head: Option<u64>) -> std::io::Result<Held> {
    let Some(bytes) = head else {
        let found = seekable::frames_of(file)?;
        return Ok(Held {
            len: found.frames.last().map_or(0, Frame::end),
            file_end: found.frames_end(),
            frames: found.frames,
            sealed: found.sealed,
            ..Held::default()
        });
    };
    let reserved = seekable::head_bytes(bytes);
    let head_frames: Vec<Frame> = seekable::scan(file, 0, 0, reserved)?
        .into_iter()
        .filter(|f| f.decompressed > 0)
        .collect();
    let tail = seekable::scan(file, reserved, bytes, u64::MAX)?;
    let filled = head_frames.last().map_or(0, Frame::end);
    let cursor = head_frames.last().map_or(0, Frame::file_end);
    let held = Held {
        len: tail.last().map_or(bytes, Frame::end),
        file_end: tail.last().map_or(reserved, Frame::file_end),
        head: Some(Head {
            bytes,
            filled,
            reserved,
            frames: head_frames.len(),
            cursor,
        }),
        frames: head_frames.into_iter().chain(tail).collect(),
        ..Held::default()
    };
    Ok(held)
}

/// Syncs the directory `dir`, so that files created or removed in it stay
/// so after a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(on(
        ErrorKind::Tier,
        "sync the directory",
        dir,
    ))
}
