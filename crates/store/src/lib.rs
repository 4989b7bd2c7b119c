//! Block stores: the byte-addressable places a volume lives in.
//!
//! Everything dmm moves goes from one [`BlockStore`] to another, and every
//! client request served over NBD ends as a call on one. The trait is small on
//! purpose: size, read, write (with FUA), flush, discard, write zeroes, an
//! allocation map and a few capability bits. Backends here are raw image
//! files and block devices ([`FileStore`]), memory ([`MemoryStore`]) and a
//! memory store that can lose power for crash tests ([`CrashStore`]); the
//! NBD client store lives with the protocol in `dmm-nbd`.
//!
//! Buffers are owned (`Vec<u8>` in, [`Bytes`] out) so that a backend can hand
//! them to a blocking thread or a remote peer without copying and without
//! borrowing across an await.

mod crash;
mod error;
mod extent;
mod file;
mod kernel_copy;
mod memory;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use bytes::Bytes;
pub use crash::{Blackout, CrashStore, Cut, Power, PowerOn, SECTOR, splitmix64};
pub use error::{Error, ErrorKind, Op, Result};
pub use extent::{Extent, ExtentKind, coalesce};
pub use file::{FileStore, OpenOptions};
pub use kernel_copy::{LocalFile, copy_in_kernel, start_writeback};
pub use memory::MemoryStore;

use async_trait::async_trait;

/// What a store can do beyond reading and writing, so that the layers above
/// (and NBD clients, through the transmission flags) know what to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, discards and zeroing are refused.
    pub read_only: bool,
    /// The I/O size below which the store does read-modify-write.
    pub preferred_block_size: u32,
    /// The medium seeks (spinning disk): sequential access pays off.
    pub rotational: bool,
    /// A discard gives space back (it is never required to).
    pub discard: bool,
    /// `write_zeroes` has a path that does not write zero buffers, so a
    /// caller asking for a fast zero can be served.
    pub fast_zero: bool,
    /// A flush covers writes made through any handle to the same store, so
    /// several NBD connections may share it (NBD multi-conn).
    pub flush_covers_all_handles: bool,
}

/// How `write_zeroes` may reach its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The range may be deallocated (punched) rather than written.
    pub may_punch: bool,
    /// Fail with [`ErrorKind::Unsupported`] rather than write zero buffers.
    pub fast_only: bool,
}

/// A byte-addressable store of fixed size.
///
/// Every range must lie inside `0..size()`; a range outside fails with
/// [`ErrorKind::OutOfRange`]. A write that returned is visible to every later
/// read; it is durable once `flush` returned or if it was made with `fua`.
#[async_trait]
pub trait BlockStore: Send + Sync + 'static {
    /// The path or address, for messages.
    fn target(&self) -> &str;

    /// Size in bytes.
    fn size(&self) -> u64;

    fn capabilities(&self) -> Capabilities;

    /// A handle for bulk copying (a migration's copier), if the store has a
    /// better one than itself: one whose I/O never runs on the caller's
    /// thread, so that a large copy cannot stall clients served by the same
    /// runtime. `None`: use the store itself.
    fn bulk(&self) -> Option<std::sync::Arc<dyn BlockStore>> {
        None
    }

    /// The local file behind the store, for copies the kernel makes between
    /// two files ([`copy_in_kernel`]); `None` for any other store.
    fn local_file(&self) -> Option<LocalFile> {
        None
    }

    /// What identifies the underlying file or device, so that a migration
    /// can refuse to copy a store onto itself; `None` when unknown.
    fn identity(&self) -> Option<String> {
        None
    }

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()>;

    /// Makes every write that returned so far durable.
    async fn flush(&self) -> Result<()>;

    /// Tells the store a range is no longer needed. Its contents are
    /// unspecified afterwards; the store may ignore the hint.
    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()>;

    /// Makes a range read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()>;

    /// The allocation map of a range: consecutive extents starting at
    /// `offset`. They may stop short of `offset + len` but cover at least one
    /// byte.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Hints that a range will be read soon.
    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self, Op::Cache, offset, len)
    }
}

/// Fails with [`ErrorKind::OutOfRange`] unless `offset..offset+len` lies
/// inside the store.
pub fn check_range<S: BlockStore + ?Sized>(store: &S, op: Op, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= store.size() => Ok(()),
        _ => Err(Error::new(ErrorKind::OutOfRange, op, store.target())
            .at(offset, len)
            .with_detail(format!("store size is {}", store.size()))),
    }
}

/// Fails with [`ErrorKind::ReadOnly`] if the store is read-only.
pub fn check_writable<S: BlockStore + ?Sized>(
    store: &S,
    op: Op,
    offset: u64,
    len: u64,
) -> Result<()> {
    if store.capabilities().read_only {
        return Err(Error::new(ErrorKind::ReadOnly, op, store.target()).at(offset, len));
    }
    check_range(store, op, offset, len)
}

/// Whether the store reports the whole range as holes or zeroes (without
/// reading it). `false` means "not known to be zero".
pub async fn reads_as_zero<S: BlockStore + ?Sized>(
    store: &S,
    offset: u64,
    len: u64,
) -> Result<bool> {
    let mut at = offset;
    while at < offset + len {
        let extents = store.extents(at, offset + len - at).await?;
        for extent in &extents {
            if !extent.kind.reads_as_zero() {
                return Ok(false);
            }
            at = at.max(extent.end());
        }
        if extents.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}
