//! Copying a byte range from one store to another, the way a storage admin
//! wants it: only allocated data is read, what reads as zero becomes a hole
//! on the target (or nothing, if the target already reads zero there), and
//! the target stays sparse.
//!
//! Used by the copier for whole chunks, by the virtual device to fill a
//! chunk before a partial write, and by rollback to copy chunks back.

use bytes::Bytes;
use std::sync::Arc;

use dmm_store::{BlockStore, Result, ZeroMode, copy_in_kernel, reads_as_zero};

/// Zero detection granularity inside allocated data.
const ZERO_BLOCK: usize = 4096;

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Data bytes written to the target.
    pub data: u64,
    /// Bytes turned into zeroes (holes) on the target.
    pub zeroed: u64,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, other: Copied) {
        self.data += other.data;
        self.zeroed += other.zeroed;
    }
}

/// A range read for copying: data to write, or zeroes.
#[derive(Debug, Clone)]
pub enum Piece {
    Data { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64 },
}

/// Copies `offset..offset + len` from `from` to `to`.
pub async fn copy_range(
    from: &dyn BlockStore,
    to: &dyn BlockStore,
    offset: u64,
    len: u64,
) -> Result<Copied> {
    let pieces = read_range(from, offset, len).await?;
    write_pieces(to, pieces).await
}

/// The allocation map of a range, clipped to it and covering it whole:
/// `(start, stop, data)` runs, where `data` is false for what reads as
/// zeroes. A store that reports nothing past a point has the rest as data.
async fn allocation(from: &dyn BlockStore, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
    let mut runs = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let extents = from.extents(at, end - at).await?;
        let covers = extents.iter().any(|e| e.end() > at && e.len > 0);
        if !covers {
            runs.push((at, end, true));
            break;
        }
        for extent in &extents {
            let (start, stop) = (extent.offset.max(at), extent.end().min(end));
            if stop > start {
                runs.push((start, stop, !extent.kind.reads_as_zero()));
                at = stop;
            }
        }
    }
    Ok(runs)
}

/// Reads a range for copying: only allocated data is read, and blocks of
/// zeroes inside it become zero pieces.
pub async fn read_range(from: &dyn BlockStore, offset: u64, len: u64) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    for (start, stop, data) in allocation(from, offset, len).await? {
        match data {
            true => read_data(from, start, stop - start, &mut pieces).await?,
            false => pieces.push(Piece::Zero {
                offset: start,
                len: stop - start,
            }),
        }
    }
    Ok(pieces)
}

async fn read_data(
    from: &dyn BlockStore,
    offset: u64,
    len: u64,
    pieces: &mut Vec<Piece>,
) -> Result<()> {
    let data = Bytes::from(from.read(offset, len as usize).await?);
    for (start, stop, is_zero) in zero_runs(offset, &data) {
        let at = offset + start as u64;
        pieces.push(if is_zero {
            Piece::Zero {
                offset: at,
                len: (stop - start) as u64,
            }
        } else {
            Piece::Data {
                offset: at,
                data: data.slice(start..stop),
            }
        });
    }
    Ok(())
}

/// Writes what [`read_range`] read.
pub async fn write_pieces(to: &dyn BlockStore, pieces: Vec<Piece>) -> Result<Copied> {
    let mut copied = Copied::default();
    for piece in pieces {
        match piece {
            Piece::Data { offset, data } => {
                copied.data += data.len() as u64;
                to.write(offset, data, false).await?;
            }
            Piece::Zero { offset, len } => copied += zero(to, offset, len).await?,
        }
    }
    Ok(copied)
}

/// Copies a range between two local files inside the kernel: data extents
/// with `copy_file_range` (a reflink where the filesystem shares blocks),
/// what reads as zeroes as holes. `None` when the kernel cannot copy
/// between these two stores (the caller copies through memory). `hold` (the
/// lock on the range) is kept until every copy started has ended, even if
/// this future is dropped.
pub async fn copy_range_in_kernel<H: Send + Sync + 'static>(
    from: &dyn BlockStore,
    to: &dyn BlockStore,
    (offset, len): (u64, u64),
    hold: &Arc<H>,
) -> Result<Option<Copied>> {
    let mut copied = Copied::default();
    for (start, stop, data) in allocation(from, offset, len).await? {
        let range = (start, stop - start);
        match data {
            true if !copy_in_kernel(from, to, range, hold.clone()).await? => return Ok(None),
            true => copied.data += stop - start,
            false => copied += zero(to, start, stop - start).await?,
        }
    }
    Ok(Some(copied))
}

/// Makes a range of the target read as zero, unless it already does.
pub async fn zero(to: &dyn BlockStore, offset: u64, len: u64) -> Result<Copied> {
    if reads_as_zero(to, offset, len).await? {
        return Ok(Copied::default());
    }
    let mode = ZeroMode {
        may_punch: true,
        fast_only: false,
    };
    to.write_zeroes(offset, len, mode, false).await?;
    Ok(Copied {
        data: 0,
        zeroed: len,
    })
}

/// Runs of (start, end, all-zero) in `data`, cut at absolute `ZERO_BLOCK`
/// boundaries and merged; zero runs shorter than a block stay data.
pub fn zero_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let boundary = ((offset as usize + start) / ZERO_BLOCK + 1) * ZERO_BLOCK;
        let stop = (boundary - offset as usize).min(data.len());
        let zero = stop - start == ZERO_BLOCK && is_zero(&data[start..stop]);
        match runs.last_mut() {
            Some(run) if run.2 == zero => run.1 = stop,
            _ => runs.push((start, stop, zero)),
        }
        start = stop;
    }
    runs
}

/// Whether every byte is zero; ORs 64-byte blocks so the loop vectorizes.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    blocks.all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmm_store::MemoryStore;

    #[test]
    fn zero_runs_follow_block_boundaries() {
        let mut data = vec![0u8; 4 * 4096];
        data[4096] = 1;
        assert_eq!(
            zero_runs(0, &data),
            vec![(0, 4096, true), (4096, 8192, false), (8192, 16384, true)]
        );
        // An unaligned start: the partial first block stays data.
        assert_eq!(
            zero_runs(100, &vec![0u8; 8192]),
            vec![(0, 3996, false), (3996, 8092, true), (8092, 8192, false)]
        );
    }

    #[tokio::test]
    async fn copies_data_and_keeps_the_target_sparse() {
        let from = MemoryStore::new(1 << 20);
        let to = MemoryStore::new(1 << 20);
        let mut block = vec![0u8; 65536];
        block[..4096].fill(7);
        from.write(0, Bytes::from(block), false).await.unwrap();
        from.write(512 * 1024, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        to.write(768 * 1024, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        let copied = copy_range(&from, &to, 0, 1 << 20).await.unwrap();
        assert_eq!(copied.data, 8192, "only non-zero blocks are written");
        assert_eq!(
            to.read(0, 1 << 20).await.unwrap(),
            from.read(0, 1 << 20).await.unwrap()
        );
        assert_eq!(to.allocated_bytes(), 8192, "zeroes are holes on the target");
    }
}
