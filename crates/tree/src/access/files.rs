//! Open regular files: open, create, read, write, truncate, allocate and
//! copy, each with the migration's hooks in front (fetch what the operation
//! needs, journal the client's change), and `O_DIRECT` carried through to
//! the target.
//!
//! A client that opens a file with `O_DIRECT` gets a target descriptor
//! opened with `O_DIRECT` too, so its I/O bypasses the target's page cache
//! as it would on the target file system, and alignment rules are the
//! target's: a misaligned request fails with the target's EINVAL. The
//! buffers FUSE hands dmm have no alignment, so direct I/O goes through an
//! aligned bounce buffer.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use fuser::{Errno, FileAttr, FileHandle, INodeNo, Request};
use rustix::fs::{FallocateFlags, Mode, OFlags};

use super::caller::Caller;
use super::fs::{Reply, TreeFs, errno, proc_path, tree_errno};
use crate::journal::EntryId;

/// Alignment of direct I/O buffers: enough for any logical block size.
const DIRECT_ALIGN: usize = 4096;

/// An open regular file.
pub(super) struct OpenFile {
    file: File,
    entry: Option<EntryId>,
    direct: bool,
}

impl OpenFile {
    fn new(file: File, entry: Option<EntryId>, flags: OFlags) -> OpenFile {
        OpenFile {
            file,
            entry,
            direct: flags.contains(OFlags::DIRECT),
        }
    }

    /// Reads up to `size` bytes at `offset` (fewer at the end of the file).
    fn read(&self, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let mut buffer = Buffer::new(size as usize, self.direct);
        let buf = buffer.as_mut();
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(buf[..done].to_vec())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(data, offset);
        }
        let mut buffer = Buffer::new(data.len(), true);
        buffer.as_mut().copy_from_slice(data);
        self.file.write_all_at(buffer.as_mut(), offset)
    }

    pub(super) fn set_len(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }

    pub(super) fn sync(&self, data_only: bool) -> io::Result<()> {
        if data_only {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        }
    }
}

/// A buffer of `len` bytes, aligned for direct I/O when asked.
struct Buffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buffer {
    fn new(len: usize, aligned: bool) -> Buffer {
        let slack = if aligned { DIRECT_ALIGN } else { 0 };
        let bytes = vec![0u8; len + slack];
        let start = if aligned {
            bytes.as_ptr().align_offset(DIRECT_ALIGN)
        } else {
            0
        };
        Buffer { bytes, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// FUSE's open flags as flags to reopen the target with: creation is done,
/// the `/proc/self/fd` link that stands for the file must be followed, and
/// every write comes with its offset (the kernel places appends).
fn reopen_flags(flags: i32) -> OFlags {
    let dropped =
        OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::APPEND;
    OFlags::from_bits_retain(flags as u32 & !dropped.bits())
}

impl TreeFs {
    pub(super) fn do_open(&self, ino: INodeNo, flags: i32) -> Reply<u64> {
        let fd = self.fd(ino)?;
        let entry = self.entry(ino);
        let oflags = reopen_flags(flags);
        if oflags.contains(OFlags::TRUNC)
            && let Some(id) = entry
        {
            self.namespace.prepare_truncate(id, 0).map_err(tree_errno)?;
        }
        let file = rustix::fs::open(proc_path(&*fd), oflags | OFlags::CLOEXEC, Mode::empty())
            .map_err(errno)?;
        Ok(self.add_file(OpenFile::new(File::from(file), entry, oflags)))
    }

    /// Creates and opens a regular file, as the caller.
    pub(super) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        (mode, umask): (u32, u32),
        flags: i32,
    ) -> Reply<(FileAttr, u64)> {
        let dir = self.populated_dir(parent)?;
        let oflags =
            OFlags::from_bits_retain(flags as u32 & !(OFlags::NOCTTY | OFlags::APPEND).bits())
                | OFlags::CREATE
                | OFlags::CLOEXEC;
        let file = Caller::of(req).create(Some(umask), || {
            rustix::fs::openat(&*dir.fd, name, oflags, Mode::from_raw_mode(mode & 0o7777))
        })?;
        let attr = self.remember(&dir, name)?;
        let entry = self.namespace.entry_of_ino(self.to_target(attr.ino));
        let handle = self.add_file(OpenFile::new(File::from(file), entry, oflags));
        Ok((attr, handle))
    }

    pub(super) fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Reply<Vec<u8>> {
        let open = self.open_file(fh)?;
        if let Some(id) = open.entry
            && self.namespace.is_pending_file(id)
        {
            self.namespace.prioritise(id);
            self.namespace
                .fetch(id, offset..offset + u64::from(size))
                .map_err(tree_errno)?;
        }
        open.read(offset, size).map_err(errno)
    }

    pub(super) fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Reply<u32> {
        let open = self.open_file(fh)?;
        if let Some(id) = open.entry {
            self.namespace
                .prepare_write(id, offset..offset + data.len() as u64)
                .map_err(tree_errno)?;
        }
        open.write(offset, data).map_err(errno)?;
        Ok(data.len() as u32)
    }

    /// `fallocate`: allocating keeps the data (the file is only marked
    /// changed); punching a hole or zeroing a range replaces the source's
    /// bytes there, so the segments it cuts are fetched first and the ones
    /// it covers are not copied any more.
    pub(super) fn do_fallocate(
        &self,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Reply<()> {
        let open = self.open_file(fh)?;
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        if let Some(id) = open.entry {
            let end = offset.saturating_add(length);
            let prepared =
                if flags.intersects(FallocateFlags::PUNCH_HOLE | FallocateFlags::ZERO_RANGE) {
                    self.namespace.prepare_zero(id, offset..end)
                } else {
                    self.namespace.note_change(id)
                };
            prepared.map_err(tree_errno)?;
        }
        rustix::fs::fallocate(open.file.as_fd(), flags, offset, length).map_err(errno)
    }

    /// `copy_file_range` between two open files: the source range is
    /// fetched and the destination range prepared as for a write, then the
    /// target file system copies (or clones) it.
    pub(super) fn do_copy_file_range(
        &self,
        (fh_in, offset_in): (FileHandle, u64),
        (fh_out, offset_out): (FileHandle, u64),
        len: u64,
    ) -> Reply<u32> {
        let input = self.open_file(fh_in)?;
        let output = self.open_file(fh_out)?;
        let len = len.min(u64::from(u32::MAX));
        if let Some(id) = input.entry {
            self.namespace
                .fetch(id, offset_in..offset_in.saturating_add(len))
                .map_err(tree_errno)?;
        }
        if let Some(id) = output.entry {
            self.namespace
                .prepare_write(id, offset_out..offset_out.saturating_add(len))
                .map_err(tree_errno)?;
        }
        let (mut at_in, mut at_out) = (offset_in, offset_out);
        let copied = rustix::fs::copy_file_range(
            input.file.as_fd(),
            Some(&mut at_in),
            output.file.as_fd(),
            Some(&mut at_out),
            len as usize,
        )
        .map_err(errno)?;
        Ok(copied as u32)
    }

    pub(super) fn do_fsync(&self, fh: FileHandle, data_only: bool) -> Reply<()> {
        let open = self.open_file(fh)?;
        self.namespace.flush().map_err(tree_errno)?;
        open.sync(data_only).map_err(errno)
    }

    pub(super) fn open_file(&self, fh: FileHandle) -> Reply<std::sync::Arc<OpenFile>> {
        self.files.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_file(&self, file: OpenFile) -> u64 {
        let handle = self.handle();
        self.files.lock().insert(handle, std::sync::Arc::new(file));
        handle
    }

    pub(super) fn close_file(&self, fh: FileHandle) {
        self.files.lock().remove(&fh.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_buffers_are_aligned_and_of_the_asked_length() {
        for len in [0, 1, 4095, 4096, 131072 + 17] {
            let mut buffer = Buffer::new(len, true);
            let slice = buffer.as_mut();
            assert_eq!(slice.len(), len);
            assert_eq!(slice.as_ptr() as usize % DIRECT_ALIGN, 0);
        }
    }

    #[test]
    fn reopening_drops_creation_flags_and_keeps_the_rest() {
        let flags = (OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::DIRECT | OFlags::APPEND)
            .bits() as i32;
        assert_eq!(reopen_flags(flags), OFlags::RDWR | OFlags::DIRECT);
    }
}
