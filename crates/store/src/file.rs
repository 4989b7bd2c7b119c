//! Raw image files and block devices.
//!
//! Reads try `preadv2(RWF_NOWAIT)` on the calling thread first: when the data
//! is in the page cache (the common case for a hot volume) that answers in a
//! microsecond without a thread hop. Buffered writes are copied into the page
//! cache on the calling thread too, as long as that stays fast: a write that
//! takes longer than [`SLOW_INLINE_WRITE`] (the kernel is throttling dirty
//! pages) sends the following writes to the blocking pool for
//! [`OFFLOAD_PERIOD`]. Everything else that may sleep (a cache miss, FUA
//! writes, fsync, fallocate, the allocation map) runs on tokio's blocking
//! pool so that a slow disk never stalls the event loop. A bulk handle
//! ([`BlockStore::bulk`]) sends all its I/O to the pool: a migration's
//! copier must not borrow the threads that serve clients.
//!
//! The allocation map comes from `SEEK_DATA`/`SEEK_HOLE`; zeroing prefers
//! `fallocate` (punch hole, then zero range) and falls back to writing zero
//! buffers where the filesystem or device refuses.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use crate::{
    BlockStore, Capabilities, Error, ErrorKind, Extent, ExtentKind, LocalFile, Op, Result,
    ZeroMode, check_range, check_writable, coalesce,
};

/// Reads up to this size try the page cache on the calling thread; larger
/// ones go to the blocking pool, where their copy overlaps with the caller's
/// network I/O.
const INLINE_READ_LIMIT: usize = 128 << 10;
/// Writes up to this size go into the page cache on the calling thread,
/// whose cache still holds the payload it just received.
const INLINE_WRITE_LIMIT: usize = 1 << 20;
/// An inline write slower than this means the page cache is not absorbing
/// writes any more.
const SLOW_INLINE_WRITE: Duration = Duration::from_millis(2);
/// How long writes go to the blocking pool after a slow inline write.
const OFFLOAD_PERIOD: Duration = Duration::from_secs(1);
/// Zero buffers written when the filesystem cannot zero a range itself.
const ZERO_BUFFER: usize = 1 << 20;
/// An allocation-map call stops after this many extents.
const MAX_EXTENTS: usize = 1024;

/// How to open a file store.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub read_only: bool,
}

/// A raw image file or a block device.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
    /// Whether I/O may run on the calling thread (false for bulk handles).
    inline: bool,
}

struct Inner {
    file: Arc<File>,
    target: Arc<str>,
    size: u64,
    read_only: bool,
    block_device: bool,
    rotational: bool,
    block_size: u32,
    /// Device and inode (or device number, for block devices).
    identity: String,
    /// Writes go to the blocking pool until this instant (nanoseconds since
    /// `opened`).
    offload_until: AtomicU64,
    opened: Instant,
    /// Buffered writes to a regular file take, one at a time, from here
    /// rather than from the inode lock: the filesystem serializes them
    /// anyway, and a waiting thread sleeps instead of spinning in the
    /// kernel (which, on a small machine, starves the copy's reads).
    buffered_writes: Option<parking_lot::Mutex<()>>,
}

impl FileStore {
    /// Opens a regular file or a block device.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<FileStore> {
        let path = path.as_ref();
        let target: Arc<str> = path.display().to_string().into();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|e| Error::io(Op::Open, target.clone(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(Op::Open, target.clone(), e))?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            rustix::fs::seek(&file, SeekFrom::End(0))
                .map_err(|e| Error::io(Op::Open, target.clone(), e.into()))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(Error::new(ErrorKind::InvalidInput, Op::Open, target)
                .with_detail("not a regular file or block device"));
        };
        let device = if block_device {
            meta.rdev()
        } else {
            meta.dev()
        };
        Ok(FileStore {
            inner: Arc::new(Inner {
                file: Arc::new(file),
                target,
                size,
                read_only: options.read_only,
                block_device,
                rotational: is_rotational(device),
                block_size: (meta.blksize() as u32).clamp(512, 1 << 20),
                identity: if block_device {
                    format!("block:{device}")
                } else {
                    format!("file:{}:{}", meta.dev(), meta.ino())
                },
                offload_until: AtomicU64::new(0),
                opened: Instant::now(),
                buffered_writes: (!block_device).then(|| parking_lot::Mutex::new(())),
            }),
            inline: true,
        })
    }

    /// Runs `work` on the blocking pool with the store's state.
    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        work: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || work(&inner)).await;
        let io_result = result.unwrap_or_else(|join| Err(io::Error::other(join.to_string())));
        io_result.map_err(|e| Error::io(op, self.inner.target.clone(), e).at(offset, len))
    }
}

impl Inner {
    /// Writes on the calling thread if recent inline writes were fast;
    /// `None` if the write must go to the blocking pool instead.
    fn try_write_inline(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        let start = Instant::now();
        let since_open = start.duration_since(self.opened).as_nanos() as u64;
        if data.len() > INLINE_WRITE_LIMIT
            || since_open < self.offload_until.load(Ordering::Relaxed)
        {
            return None;
        }
        let result = self.write_all(data, offset, false);
        if start.elapsed() > SLOW_INLINE_WRITE {
            let until = since_open + OFFLOAD_PERIOD.as_nanos() as u64;
            self.offload_until.store(until, Ordering::Relaxed);
        }
        Some(result)
    }

    fn sync_data(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&self.file).map_err(io::Error::from)
    }

    fn write_all(&self, mut data: &[u8], mut offset: u64, fua: bool) -> io::Result<()> {
        let flags = if fua {
            ReadWriteFlags::DSYNC
        } else {
            ReadWriteFlags::empty()
        };
        // A FUA write syncs after the filesystem's lock is released, so
        // concurrent ones overlap their syncs: they do not queue here.
        let _one_at_a_time = match fua {
            false => self.buffered_writes.as_ref().map(|lock| lock.lock()),
            true => None,
        };
        while !data.is_empty() {
            let n = retry_eintr(|| {
                rustix::io::pwritev2(&self.file, &[io::IoSlice::new(data)], offset, flags)
            })?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Reads until `buf` is full or end of file (the rest stays zero).
    fn read_full(&self, buf: &mut [u8], offset: u64, flags: ReadWriteFlags) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let slice = &mut [io::IoSliceMut::new(&mut buf[done..])];
            match retry_eintr(|| {
                rustix::io::preadv2(&self.file, slice, offset + done as u64, flags)
            }) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(Errno::AGAIN.raw_os_error()) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Fills `buf`, an empty buffer of capacity `len`, without zeroing it
    /// first (large reads); bytes past end of file read as zero.
    fn read_into(&self, mut buf: Vec<u8>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => break,
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.resize(len, 0);
        Ok(buf)
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, flags, offset, len).map_err(io::Error::from)
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_BUFFER.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = zeroes.len().min((end - offset) as usize);
            self.write_all(&zeroes[..n], offset, false)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if mode.may_punch && self.fallocate(punch, offset, len).is_ok() {
            return Ok(());
        }
        // A block device may zero-range by writing zeroes in the kernel:
        // not fast.
        let zero_range_is_fast = !self.block_device;
        if (zero_range_is_fast || !mode.fast_only)
            && self
                .fallocate(FallocateFlags::ZERO_RANGE, offset, len)
                .is_ok()
        {
            return Ok(());
        }
        if mode.fast_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.write_zero_buffers(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let mut pos = offset;
        let mut out = Vec::new();
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(data) => data.min(end),
                Err(Errno::NXIO) => end,
                // No hole support (some filesystems, block devices): all data.
                Err(Errno::INVAL | Errno::OPNOTSUPP) if out.is_empty() => {
                    return Ok(vec![Extent::new(offset, len, ExtentKind::Data)]);
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                out.push(Extent::new(pos, data - pos, ExtentKind::Hole));
                pos = data;
                continue;
            }
            let hole = rustix::fs::seek(&self.file, SeekFrom::Hole(pos))?.min(end);
            out.push(Extent::new(pos, hole.max(pos + 1) - pos, ExtentKind::Data));
            pos = hole.max(pos + 1);
        }
        Ok(coalesce(out))
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Whether the block device behind `device` (a dev_t) is a spinning disk.
fn is_rotational(device: u64) -> bool {
    let (major, minor) = (rustix::fs::major(device), rustix::fs::minor(device));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition has no queue of its own; its parent disk does.
    [
        format!("{base}/queue/rotational"),
        format!("{base}/../queue/rotational"),
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .is_some_and(|text| text.trim() == "1")
}

#[async_trait]
impl BlockStore for FileStore {
    fn target(&self) -> &str {
        &self.inner.target
    }

    fn size(&self) -> u64 {
        self.inner.size
    }

    fn identity(&self) -> Option<String> {
        Some(self.inner.identity.clone())
    }

    fn local_file(&self) -> Option<LocalFile> {
        Some(LocalFile::new(
            self.inner.file.clone(),
            self.inner.target.clone(),
        ))
    }

    fn bulk(&self) -> Option<Arc<dyn BlockStore>> {
        Some(Arc::new(FileStore {
            inner: self.inner.clone(),
            inline: false,
        }))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.inner.read_only,
            preferred_block_size: self.inner.block_size,
            rotational: self.inner.rotational,
            discard: true,
            fast_zero: true,
            flush_covers_all_handles: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        check_range(self, Op::Read, offset, len as u64)?;
        if len > INLINE_READ_LIMIT || !self.inline {
            // Allocated here, on the thread that will also free it once the
            // data is sent: the allocator reuses the buffer for the next
            // read instead of stranding it in a blocking thread's heap.
            let buf = Vec::with_capacity(len);
            return self
                .blocking(Op::Read, offset, len as u64, move |inner| {
                    inner.read_into(buf, offset, len)
                })
                .await;
        }
        let mut buf = vec![0u8; len];
        // Errors here are retried below, where they are reported.
        let cached = self
            .inner
            .read_full(&mut buf, offset, ReadWriteFlags::NOWAIT)
            .unwrap_or(0);
        if cached == len {
            return Ok(buf);
        }
        self.blocking(Op::Read, offset, len as u64, move |inner| {
            let rest = &mut buf[cached..];
            inner.read_full(rest, offset + cached as u64, ReadWriteFlags::empty())?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        check_writable(self, Op::Write, offset, len)?;
        if self.inline
            && !fua
            && let Some(result) = self.inner.try_write_inline(&data, offset)
        {
            let target = self.inner.target.clone();
            return result.map_err(|e| Error::io(Op::Write, target, e).at(offset, len));
        }
        self.blocking(Op::Write, offset, len, move |inner| {
            inner.write_all(&data, offset, fua)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        self.blocking(Op::Flush, 0, 0, Inner::sync_data).await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        check_writable(self, Op::Discard, offset, len)?;
        self.blocking(Op::Discard, offset, len, move |inner| {
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match inner.fallocate(punch, offset, len) {
                // Discard is a hint: a filesystem that cannot punch keeps
                // the data, which is allowed.
                Err(e) if e.raw_os_error() == Some(Errno::OPNOTSUPP.raw_os_error()) => {}
                other => other?,
            }
            if fua { inner.sync_data() } else { Ok(()) }
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        check_writable(self, Op::WriteZeroes, offset, len)?;
        self.blocking(Op::WriteZeroes, offset, len, move |inner| {
            inner.zero(offset, len, mode)?;
            if fua { inner.sync_data() } else { Ok(()) }
        })
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self, Op::Extents, offset, len)?;
        self.blocking(Op::Extents, offset, len, move |inner| {
            inner.extents(offset, len)
        })
        .await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self, Op::Cache, offset, len)?;
        self.blocking(Op::Cache, offset, len, move |inner| {
            let advice = rustix::fs::Advice::WillNeed;
            rustix::fs::fadvise(&inner.file, offset, std::num::NonZeroU64::new(len), advice)
                .map_err(io::Error::from)
        })
        .await
    }
}
