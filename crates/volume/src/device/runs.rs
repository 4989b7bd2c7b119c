//! Runs of chunks that read as zeroes, copied or verified in one step, so
//! that a sparse volume costs what its data costs, not what its size does.
//!
//! A run starts at a chunk the copier or the verifier is about to handle.
//! The allocation map of the side it reads (SEEK_DATA/SEEK_HOLE for files
//! and block devices, block status for NBD exports) says how many whole
//! chunks from there read as zeroes. A copy then needs no data: the other
//! side already reads as zeroes (nothing is written) or is zeroed in one
//! request, and the run moves to `Both` under one exclusive lock, with the
//! same check as a chunk copy that no client changed it meanwhile. A
//! verification needs no reading where both sides read as zeroes.

use dmm_store::{BlockStore, Result};

use super::VirtualDevice;
use crate::chunks::ChunkState;
use crate::copy::zero;

/// The most chunks one run covers: bounds the lock it takes.
const MOST_CHUNKS: u64 = 1 << 16;

/// The most chunks one run zeroes on the other side under one lock (a
/// destination that does not read as zeroes already, such as a reused
/// block device).
const MOST_ZEROED: u64 = 64;

/// What a run did, starting at a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// This many chunks, from the first, were handled in one step.
    Done(u64),
    /// The first chunk is not in a run, and no chunk before `until` can
    /// start one (the data goes on at least that far).
    Data { until: u64 },
}

impl VirtualDevice {
    /// How many whole chunks from `chunk` (at most `most`) read as zeroes
    /// on `store`, as its allocation map says.
    async fn zero_chunks(&self, store: &dyn BlockStore, chunk: u64, most: u64) -> Result<Run> {
        let chunks = self.chunks();
        let (size, volume) = (chunks.chunk_size(), chunks.volume_size());
        let start = chunk * size;
        let end = (start + most * size).min(volume);
        let mut at = start;
        while at < end {
            let extents = store.extents(at, end - at).await?;
            let Some(first) = extents.first() else { break };
            if !first.kind.reads_as_zero() {
                if at == start {
                    let until = first.end().min(volume).div_ceil(size).max(chunk + 1);
                    return Ok(Run::Data { until });
                }
                break;
            }
            let zero_end = extents
                .iter()
                .take_while(|e| e.kind.reads_as_zero())
                .last()
                .map_or(at, |e| e.end());
            let stopped = zero_end < end && extents.iter().any(|e| !e.kind.reads_as_zero());
            at = zero_end.min(end).max(at + 1);
            if stopped {
                break;
            }
        }
        // Whole chunks only, but a run that reaches the end of the volume
        // takes its short last chunk too.
        let whole = match at >= volume {
            true => chunks.len() - chunk,
            false => at / size - chunk,
        };
        Ok(Run::Done(whole))
    }

    /// Copies the run of chunks in `from` that starts at `chunk` and reads
    /// as zeroes on the side they are copied from: the other side is left
    /// as it is where it reads as zeroes already, zeroed otherwise, and the
    /// run moves to `Both`. `Run::Done(0)` is never returned: a chunk that
    /// cannot be handled so is `Run::Data` for the per-chunk copy.
    pub(crate) async fn copy_zero_run(&self, chunk: u64, from: ChunkState) -> Result<Run> {
        let (reader, writer, side) = self.copy_direction(from);
        // Client changes completed so far: the maps read after this see
        // their data; one completed later shows in its counter.
        let most = MOST_CHUNKS.min(self.chunks().len() - chunk);
        let changes: Vec<u32> = (chunk..chunk + most)
            .map(|c| self.ledger.changes(c))
            .collect();
        let mut count = match self.zero_chunks(reader, chunk, most).await? {
            Run::Done(0) => return Ok(Run::Data { until: chunk + 1 }),
            Run::Done(count) => count,
            data => return Ok(data),
        };
        let zeroing = match self.zero_chunks(writer, chunk, count).await? {
            Run::Done(ready) if ready > 0 => {
                count = ready;
                false
            }
            _ => {
                count = count.min(MOST_ZEROED);
                true
            }
        };
        let _guard = self.locks.exclusive(chunk..chunk + count).await;
        // No client changed a chunk of the run since its map was read.
        let count = (chunk..chunk + count)
            .zip(&changes)
            .take_while(|&(c, &seen)| self.ledger.get(c) == from && self.ledger.changes(c) == seen)
            .count() as u64;
        if count == 0 {
            return Ok(Run::Data { until: chunk + 1 });
        }
        let run = chunk..chunk + count;
        if zeroing {
            let (offset, _) = self.chunks().bytes(chunk);
            let (last, len) = self.chunks().bytes(run.end - 1);
            zero(writer, offset, last + len - offset).await?;
        }
        if let Some(queue) = self.aio_attached() {
            run.clone().for_each(|c| queue.copied(c));
        }
        self.ledger.run_landed(run, from, ChunkState::Both, side);
        Ok(Run::Done(count))
    }

    /// Verifies the run of `Both` chunks that starts at `chunk` and reads
    /// as zeroes on both stores, without reading it. A chunk still in
    /// `Both` after both maps were read was not written in between (a
    /// write records leaving `Both` before its data goes out).
    pub(crate) async fn verify_zero_run(&self, chunk: u64) -> Result<Run> {
        let count = match self
            .zero_chunks(&*self.bulk_source, chunk, MOST_CHUNKS)
            .await?
        {
            Run::Done(0) => return Ok(Run::Data { until: chunk + 1 }),
            Run::Done(count) => count,
            data => return Ok(data),
        };
        let count = match self
            .zero_chunks(&*self.bulk_destination, chunk, count)
            .await?
        {
            Run::Done(count) if count > 0 => count,
            _ => return Ok(Run::Data { until: chunk + 1 }),
        };
        let both = (chunk..chunk + count)
            .take_while(|&c| self.ledger.get(c) == ChunkState::Both)
            .count() as u64;
        match both {
            0 => Ok(Run::Data { until: chunk + 1 }),
            both => Ok(Run::Done(both)),
        }
    }
}
