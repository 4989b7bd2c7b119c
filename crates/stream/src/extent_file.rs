//! One extent's file on a tier, in the tier's format, open for appends
//! and reads at once: the writer appends, readers read any offset, the
//! mover copies it into another extent, and none of them waits for
//! another's I/O (each copies what it needs under a short lock and does
//! its I/O outside it).
//!
//! A plain file holds the extent's bytes as they are. A zstd file holds
//! frames ([`crate::seekable`]); the bytes appended since the last frame
//! are kept in memory until a frame is full or the writer syncs (a sync
//! closes a short frame, so fsynced bytes are never only in memory), and
//! the seek table is written when the extent is sealed.
//!
//! One appender at a time: [`ExtentFile::append`], `sync`, `seal`,
//! `cut` and `copy_from` are called by the one owner of the extent's end
//! (the stream's writer for its tail, the mover for a receiving extent).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result, on};
use crate::orbit::Format;
use crate::seekable::{self, FRAME_BYTES, Frame};

/// Bytes a plain copy moves per read and write.
const COPY_BYTES: usize = 1 << 20;

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
    /// Stream bytes held, in the file and in `pending`.
    len: u64,
    /// zstd: the frames in the file.
    frames: Vec<Frame>,
    /// zstd: bytes after the last frame, not in the file yet.
    pending: Vec<u8>,
    /// Bytes of the file holding data (a seek table may follow).
    file_end: u64,
    /// zstd: a seek table follows the frames.
    sealed: bool,
    /// Written since the last sync.
    dirty: bool,
}

impl Held {
    /// Stream bytes in the file (not only in memory).
    fn on_disk(&self) -> u64 {
        self.len - self.pending.len() as u64
    }

    /// A frame written after the last.
    fn record(&mut self, frame: Frame) {
        self.file_end = frame.file_end();
        self.frames.push(frame);
        self.dirty = true;
    }
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

    /// Opens an extent file after a restart: a zstd file's frames are
    /// read from its seek table or found by a scan, and bytes a crash
    /// left after the last whole frame are cut.
    pub fn open(path: &Path, format: Format) -> Result<ExtentFile> {
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
            Format::Plain => Held {
                len: size,
                file_end: size,
                ..Held::default()
            },
            Format::Zstd => {
                let found = seekable::frames_of(&file).map_err(on(
                    ErrorKind::Tier,
                    "read frames of",
                    path,
                ))?;
                let file_end = found.frames_end();
                if !found.sealed && file_end < size {
                    file.set_len(file_end).map_err(on(
                        ErrorKind::Tier,
                        "cut the torn frame of",
                        path,
                    ))?;
                }
                Held {
                    len: found.frames.last().map_or(0, Frame::end),
                    frames: found.frames,
                    file_end,
                    sealed: found.sealed,
                    ..Held::default()
                }
            }
        };
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

    pub fn format(&self) -> Format {
        self.format
    }

    /// The stream bytes it holds.
    pub fn len(&self) -> u64 {
        self.held.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stream bytes it holds in the file (a zstd tail keeps up to a
    /// frame in memory until the next sync).
    pub fn on_disk(&self) -> u64 {
        self.held.lock().on_disk()
    }

    /// The file's size on its tier.
    pub fn stored_bytes(&self) -> u64 {
        self.held.lock().file_end
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
    /// it: the file is complete for any zstd reader.
    pub fn seal(&self) -> Result<()> {
        self.sync()?;
        if self.format == Format::Plain {
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

    /// Keeps only its first `len` stream bytes (a zstd file: `len` must
    /// end a frame). Used when a move starts a step again after a crash.
    pub fn cut(&self, len: u64) -> Result<()> {
        let mut held = self.held.lock();
        let file_end = match self.format {
            Format::Plain => len,
            Format::Zstd => {
                let keep = held.frames.partition_point(|f| f.end() <= len);
                if held.frames[..keep].last().map_or(0, Frame::end) != len {
                    return Err(Error::on(ErrorKind::Tier, "cut", &self.path)
                        .with_detail(format!("{len} does not end a frame")));
                }
                held.frames.truncate(keep);
                held.pending.clear();
                held.sealed = false;
                held.frames.last().map_or(0, Frame::file_end)
            }
        };
        self.file
            .set_len(file_end)
            .map_err(on(ErrorKind::Tier, "cut", &self.path))?;
        held.len = len;
        held.file_end = file_end;
        held.dirty = true;
        Ok(())
    }

    /// Appends the bytes `other` holds in its file from its stream offset
    /// `from` on (a zstd file copies whole frames, not recompressed;
    /// `from` must start one); returns the offset it copied up to. The
    /// link of a target extent into a receiving extent, while the target
    /// is still appended to.
    pub fn copy_from(&self, other: &ExtentFile, from: u64) -> Result<u64> {
        match self.format {
            Format::Plain => self.copy_bytes(other, from),
            Format::Zstd => self.copy_frames(other, from),
        }
    }

    fn copy_bytes(&self, other: &ExtentFile, from: u64) -> Result<u64> {
        let end = other.on_disk();
        let mut at = from;
        while at < end {
            let bytes = other.read_at(at, COPY_BYTES.min((end - at) as usize))?;
            self.append(&bytes)?;
            at += bytes.len() as u64;
        }
        Ok(at)
    }

    fn copy_frames(&self, other: &ExtentFile, from: u64) -> Result<u64> {
        let frames: Vec<Frame> = {
            let held = other.held.lock();
            let first = held.frames.partition_point(|f| f.start < from);
            held.frames[first..].to_vec()
        };
        let mut at = from;
        for frame in frames {
            if frame.start != at {
                return Err(Error::on(ErrorKind::Tier, "link", &other.path)
                    .with_detail(format!("no frame starts at {at}")));
            }
            let mut bytes = vec![0; frame.compressed as usize];
            other.file.read_exact_at(&mut bytes, frame.at).map_err(on(
                ErrorKind::Tier,
                "read a frame of",
                &other.path,
            ))?;
            let copy = self.write_frame(&bytes, frame.decompressed)?;
            let mut held = self.held.lock();
            held.len += u64::from(frame.decompressed);
            held.record(copy);
            at = frame.end();
        }
        Ok(at)
    }

    /// Takes over the bytes `other` holds only in memory (a zstd tail's
    /// unfinished frame), as the last step of a link: no I/O. `other`
    /// keeps its copy for readers that still hold it.
    pub fn adopt_pending(&self, other: &ExtentFile) {
        let pending = other.held.lock().pending.clone();
        let mut held = self.held.lock();
        held.len += pending.len() as u64;
        held.pending.extend_from_slice(&pending);
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
        let on_disk = held.on_disk();
        let tail = if end > on_disk {
            let from = (offset.max(on_disk) - on_disk) as usize;
            held.pending[from..(end - on_disk) as usize].to_vec()
        } else {
            Vec::new()
        };
        (held.frames[first..last].to_vec(), tail)
    }

    /// Compresses the first `bytes` of the pending bytes into a frame.
    fn close_frame(&self, bytes: usize) -> Result<()> {
        let data = self.held.lock().pending[..bytes].to_vec();
        let compressed = seekable::compress(&data).map_err(on(
            ErrorKind::Tier,
            "compress a frame of",
            &self.path,
        ))?;
        let frame = self.write_frame(&compressed, bytes as u32)?;
        let mut held = self.held.lock();
        held.pending.drain(..bytes);
        held.record(frame);
        Ok(())
    }

    /// Writes one compressed frame after the last; the caller records
    /// it (with the bytes it holds) under one lock, so that readers see
    /// the frame and the pending bytes change together.
    fn write_frame(&self, compressed: &[u8], decompressed: u32) -> Result<Frame> {
        let (at, start) = {
            let mut held = self.held.lock();
            self.unseal(&mut held)?;
            (held.file_end, held.frames.last().map_or(0, Frame::end))
        };
        self.file.write_all_at(compressed, at).map_err(on(
            ErrorKind::Tier,
            "append a frame to",
            &self.path,
        ))?;
        Ok(Frame {
            at,
            compressed: compressed.len() as u32,
            start,
            decompressed,
        })
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
