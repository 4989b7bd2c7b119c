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

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::{Errno, FileHandle};
use rustix::fs::{FallocateFlags, Mode, OFlags};

use super::reply::{Reply, errno, proc_path, tree_errno};
use crate::journal::EntryId;
use crate::lock::{Mutex, Rank};
use crate::namespace::Namespace;

/// Alignment of direct I/O buffers: enough for any logical block size.
const DIRECT_ALIGN: usize = 4096;

/// An open regular file.
pub(super) struct OpenFile {
    file: File,
    entry: Option<EntryId>,
    direct: bool,
}

impl OpenFile {
    pub(super) fn new(file: File, entry: Option<EntryId>, flags: OFlags) -> OpenFile {
        OpenFile {
            file,
            entry,
            direct: flags.contains(OFlags::DIRECT),
        }
    }

    /// Reads up to `size` bytes at `offset` (fewer at the end of the file).
    fn read_at(&self, offset: u64, size: u32) -> io::Result<Vec<u8>> {
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

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
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

    fn sync(&self, data_only: bool) -> io::Result<()> {
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

/// The hooks in front of each operation on an open file: what the
/// migration must do before the client's operation reaches the target.
impl OpenFile {
    /// Opens `fd` (an `O_PATH` descriptor of tracked `entry`, if any) with
    /// FUSE's open `flags`; a truncating open is prepared as a truncate.
    pub(super) fn open(
        namespace: &Namespace,
        fd: &OwnedFd,
        entry: Option<EntryId>,
        flags: i32,
    ) -> Reply<OpenFile> {
        let oflags = reopen_flags(flags);
        if oflags.contains(OFlags::TRUNC)
            && let Some(id) = entry
        {
            namespace.prepare_truncate(id, 0).map_err(tree_errno)?;
        }
        let file = rustix::fs::open(proc_path(fd), oflags | OFlags::CLOEXEC, Mode::empty())
            .map_err(errno)?;
        Ok(OpenFile::new(File::from(file), entry, oflags))
    }

    /// Reads, after fetching the segments the read covers.
    pub(super) fn read(&self, namespace: &Namespace, offset: u64, size: u32) -> Reply<Vec<u8>> {
        if let Some(id) = self.entry
            && namespace.is_pending_file(id)
        {
            namespace.prioritise(id);
            namespace
                .fetch(id, offset..offset + u64::from(size))
                .map_err(tree_errno)?;
        }
        self.read_at(offset, size).map_err(errno)
    }

    /// Writes, after the segments it touches are fetched and marked.
    pub(super) fn write(&self, namespace: &Namespace, offset: u64, data: &[u8]) -> Reply<u32> {
        if let Some(id) = self.entry {
            namespace
                .prepare_write(id, offset..offset + data.len() as u64)
                .map_err(tree_errno)?;
        }
        self.write_at(offset, data).map_err(errno)?;
        Ok(data.len() as u32)
    }

    /// `fallocate`: allocating keeps the data (the file is only marked
    /// changed); punching a hole or zeroing a range replaces the source's
    /// bytes there, so the segments it cuts are fetched first and the ones
    /// it covers are not copied any more.
    pub(super) fn allocate(
        &self,
        namespace: &Namespace,
        (offset, length): (u64, u64),
        mode: i32,
    ) -> Reply<()> {
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        if let Some(id) = self.entry {
            let end = offset.saturating_add(length);
            let prepared =
                if flags.intersects(FallocateFlags::PUNCH_HOLE | FallocateFlags::ZERO_RANGE) {
                    namespace.prepare_zero(id, offset..end)
                } else {
                    namespace.note_change(id)
                };
            prepared.map_err(tree_errno)?;
        }
        rustix::fs::fallocate(self.file.as_fd(), flags, offset, length).map_err(errno)
    }

    /// `copy_file_range` from this file to `output`: the source range is
    /// fetched and the destination range prepared as for a write, then the
    /// target file system copies (or clones) it.
    pub(super) fn copy_to(
        &self,
        namespace: &Namespace,
        offset_in: u64,
        (output, offset_out): (&OpenFile, u64),
        len: u64,
    ) -> Reply<u32> {
        let len = len.min(u64::from(u32::MAX));
        if let Some(id) = self.entry {
            namespace
                .fetch(id, offset_in..offset_in.saturating_add(len))
                .map_err(tree_errno)?;
        }
        if let Some(id) = output.entry {
            namespace
                .prepare_write(id, offset_out..offset_out.saturating_add(len))
                .map_err(tree_errno)?;
        }
        let (mut at_in, mut at_out) = (offset_in, offset_out);
        let copied = rustix::fs::copy_file_range(
            self.file.as_fd(),
            Some(&mut at_in),
            output.file.as_fd(),
            Some(&mut at_out),
            len as usize,
        )
        .map_err(errno)?;
        Ok(copied as u32)
    }

    /// `fsync`: the target's file system and the journal first, so that
    /// the marks of what the client makes durable are durable too.
    pub(super) fn fsync(&self, namespace: &Namespace, data_only: bool) -> Reply<()> {
        namespace.flush_durably().map_err(tree_errno)?;
        self.sync(data_only).map_err(errno)
    }
}

/// The open files, by handle.
pub(super) struct OpenFiles {
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
}

impl OpenFiles {
    pub(super) fn new() -> OpenFiles {
        OpenFiles {
            files: Mutex::new(Rank::Handles, HashMap::new()),
        }
    }

    pub(super) fn get(&self, fh: FileHandle) -> Reply<Arc<OpenFile>> {
        self.files.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    pub(super) fn insert(&self, handle: u64, file: OpenFile) {
        self.files.lock().insert(handle, Arc::new(file));
    }

    pub(super) fn remove(&self, fh: FileHandle) {
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
