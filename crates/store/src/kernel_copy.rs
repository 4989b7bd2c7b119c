//! Copies between two local files made by the kernel (`copy_file_range`):
//! the data never passes through dmm's memory, and a filesystem that can
//! share blocks (XFS, btrfs) turns the copy into a reflink. The caller then
//! sends each copied range on to the disk ([`start_writeback`]), so the
//! copy and its writeback overlap instead of the last flush waiting for all
//! of it. That is a separate step because it may wait for a congested disk
//! (the block layer throttles writeback), which whatever lock the caller
//! holds for the copy itself should not.

use std::fs::File;
use std::io;
use std::sync::Arc;

use rustix::io::Errno;

use crate::{BlockStore, Error, Op, Result};

/// An open local file behind a store.
#[derive(Clone)]
pub struct LocalFile {
    file: Arc<File>,
    target: Arc<str>,
}

impl LocalFile {
    pub(crate) fn new(file: Arc<File>, target: Arc<str>) -> LocalFile {
        LocalFile { file, target }
    }
}

/// Copies `len` bytes at `offset` of `from` to the same offset of `to`
/// inside the kernel. `Ok(false)` when the kernel cannot copy between these
/// two (not both local files, different filesystems that refuse, block
/// devices): nothing was written, and the caller copies through memory.
///
/// The copy runs on a blocking thread, which a dropped future cannot stop:
/// `hold` (a lock guard) is kept until the copy has ended, so that whatever
/// it guards is not released while the copy may still write.
pub async fn copy_in_kernel(
    from: &dyn BlockStore,
    to: &dyn BlockStore,
    (offset, len): (u64, u64),
    hold: impl Send + 'static,
) -> Result<bool> {
    let (Some(source), Some(target)) = (from.local_file(), to.local_file()) else {
        return Ok(false);
    };
    let name = target.target.clone();
    let copied = tokio::task::spawn_blocking(move || {
        let _held_until_the_copy_ends = hold;
        copy_range(&source.file, &target.file, offset, len)
    })
    .await
    .map_err(|e| Error::io(Op::Copy, &*name, io::Error::other(e)))?;
    match copied {
        Ok(done) => Ok(done),
        Err(err) => Err(Error::io(Op::Copy, &*name, err).at(offset, len)),
    }
}

/// Loops over short copies; `Ok(false)` if the first call says the kernel
/// cannot do it.
fn copy_range(from: &File, to: &File, offset: u64, len: u64) -> io::Result<bool> {
    let mut done = 0;
    while done < len {
        let (mut read_at, mut write_at) = (offset + done, offset + done);
        let asked = usize::try_from(len - done).unwrap_or(usize::MAX);
        match rustix::fs::copy_file_range(from, Some(&mut read_at), to, Some(&mut write_at), asked)
        {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done += n as u64,
            Err(Errno::INTR) => continue,
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) if done == 0 => {
                return Ok(false);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(true)
}

/// Starts writing a range of a local file's store back to the disk without
/// waiting for the writes to complete, so that the flush that makes a copy
/// durable finds little left to do. A best-effort hint: an error changes
/// nothing, and a store that is not a local file ignores it. It returns
/// once the writes are queued, which a congested disk may delay.
pub async fn start_writeback(store: &dyn BlockStore, offset: u64, len: u64) {
    if let Some(target) = store.local_file() {
        let queued =
            tokio::task::spawn_blocking(move || queue_writeback(&target.file, offset, len));
        let _ = queued.await;
    }
}

fn queue_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a file descriptor the caller keeps
    // open for its duration; it takes no pointers.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileStore, MemoryStore, OpenOptions};

    #[tokio::test]
    async fn files_copy_in_the_kernel_and_other_stores_say_no() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let path = dir.path().join(name);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            FileStore::open(&path, OpenOptions::default()).unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        a.write(4096, bytes::Bytes::from(data.clone()), false)
            .await
            .unwrap();
        assert!(copy_in_kernel(&a, &b, (4096, 65536), ()).await.unwrap());
        assert_eq!(b.read(4096, 65536).await.unwrap(), data);
        let memory = MemoryStore::new(1 << 20);
        assert!(!copy_in_kernel(&a, &memory, (0, 4096), ()).await.unwrap());
        let err = copy_in_kernel(&a, &b, ((1 << 20) - 10, 100), ()).await;
        assert!(err.is_err() || !err.unwrap(), "a copy past the end fails");
    }
}
