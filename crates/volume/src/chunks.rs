//! Which store holds the current data of each chunk of the volume.
//!
//! The volume is cut into chunks of `segsize` bytes (the last one may be
//! shorter). Each chunk is in one of three states, and every routing
//! decision of the virtual device, every copy and every rollback follows
//! from them:
//!
//! - `Source`: only the source is current (not copied yet, or dirtied since);
//! - `Both`: source and destination hold the same bytes;
//! - `Destination`: only the destination is current.
//!
//! States live in an array of atomic words, two bits per chunk (a 1 TiB
//! volume of 1 MiB chunks takes 256 KiB), so that the hot path (a client
//! write to a chunk already in the right state) takes no lock; counters per
//! state are kept alongside for progress reports.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

/// Where a chunk's current data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ChunkState {
    Source = 0,
    Both = 1,
    Destination = 2,
}

impl ChunkState {
    pub fn from_u8(value: u8) -> Option<ChunkState> {
        match value {
            0 => Some(ChunkState::Source),
            1 => Some(ChunkState::Both),
            2 => Some(ChunkState::Destination),
            _ => None,
        }
    }

    /// Whether the destination holds current data.
    pub fn on_destination(self) -> bool {
        self != ChunkState::Source
    }

    /// Whether the source holds current data.
    pub fn on_source(self) -> bool {
        self != ChunkState::Destination
    }
}

/// Chunks per word of the state array.
const PER_WORD: u64 = 32;

/// The chunk geometry and the state of every chunk.
pub struct ChunkMap {
    volume_size: u64,
    chunk_size: u64,
    len: u64,
    /// Two bits per chunk, chunk `c` at bits `2 * (c % 32)` of word `c / 32`.
    states: Box<[AtomicU64]>,
    counts: [AtomicU64; 3],
}

impl ChunkMap {
    /// A map with every chunk in `Source`.
    pub fn new(volume_size: u64, chunk_size: u64) -> ChunkMap {
        assert!(
            chunk_size.is_power_of_two(),
            "chunk size must be a power of two"
        );
        let count = volume_size.div_ceil(chunk_size);
        ChunkMap {
            volume_size,
            chunk_size,
            len: count,
            states: (0..count.div_ceil(PER_WORD))
                .map(|_| AtomicU64::new(0))
                .collect(),
            counts: [AtomicU64::new(count), AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The word holding `chunk`'s state, and the state's shift in it.
    fn slot(&self, chunk: u64) -> (&AtomicU64, u32) {
        assert!(chunk < self.len, "chunk {chunk} out of {}", self.len);
        let word = &self.states[(chunk / PER_WORD) as usize];
        (word, (chunk % PER_WORD * 2) as u32)
    }

    /// The chunks a byte range touches.
    pub fn span(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return offset / self.chunk_size..offset / self.chunk_size;
        }
        offset / self.chunk_size..(offset + len).div_ceil(self.chunk_size)
    }

    /// The byte range of a chunk: (offset, length).
    pub fn bytes(&self, chunk: u64) -> (u64, u64) {
        let offset = chunk * self.chunk_size;
        (offset, self.chunk_size.min(self.volume_size - offset))
    }

    pub fn get(&self, chunk: u64) -> ChunkState {
        let (word, shift) = self.slot(chunk);
        state_in(word.load(Ordering::Acquire), shift)
    }

    /// Sets a chunk's state; returns the previous one.
    pub fn set(&self, chunk: u64, state: ChunkState) -> ChunkState {
        let (word, shift) = self.slot(chunk);
        let previous = word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                Some(with_state(bits, shift, state))
            })
            .expect("always updated");
        let previous = state_in(previous, shift);
        self.count_transition(previous, state);
        previous
    }

    /// Moves a chunk from `from` to `to`; false if it was not in `from`.
    pub fn transition(&self, chunk: u64, from: ChunkState, to: ChunkState) -> bool {
        let (word, shift) = self.slot(chunk);
        let moved = word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                (state_in(bits, shift) == from).then(|| with_state(bits, shift, to))
            })
            .is_ok();
        if moved {
            self.count_transition(from, to);
        }
        moved
    }

    fn count_transition(&self, from: ChunkState, to: ChunkState) {
        if from != to {
            self.counts[from as usize].fetch_sub(1, Ordering::Relaxed);
            self.counts[to as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many chunks are in `state`.
    pub fn count(&self, state: ChunkState) -> u64 {
        self.counts[state as usize].load(Ordering::Relaxed)
    }

    /// The first chunk at or after `from` in `state`.
    pub fn next_in(&self, state: ChunkState, from: u64) -> Option<u64> {
        (from..self.len()).find(|&chunk| self.get(chunk) == state)
    }

    /// The chunks in `Both` and in `Destination`, for persisting.
    pub fn to_bitmaps(&self) -> (RoaringBitmap, RoaringBitmap) {
        let mut both = RoaringBitmap::new();
        let mut destination = RoaringBitmap::new();
        for chunk in 0..self.len() {
            match self.get(chunk) {
                ChunkState::Both => both.insert(chunk as u32),
                ChunkState::Destination => destination.insert(chunk as u32),
                ChunkState::Source => false,
            };
        }
        (both, destination)
    }

    /// Restores states saved with [`ChunkMap::to_bitmaps`].
    pub fn load_bitmaps(&self, both: &RoaringBitmap, destination: &RoaringBitmap) {
        for chunk in both.iter().filter(|&c| u64::from(c) < self.len()) {
            self.set(chunk.into(), ChunkState::Both);
        }
        for chunk in destination.iter().filter(|&c| u64::from(c) < self.len()) {
            self.set(chunk.into(), ChunkState::Destination);
        }
    }
}

/// The state at `shift` in a word of states.
fn state_in(bits: u64, shift: u32) -> ChunkState {
    ChunkState::from_u8(((bits >> shift) & 0b11) as u8).expect("valid chunk state")
}

/// A word of states with the one at `shift` replaced.
fn with_state(bits: u64, shift: u32, state: ChunkState) -> u64 {
    bits & !(0b11 << shift) | (state as u64) << shift
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_covers_a_short_last_chunk() {
        let map = ChunkMap::new(10 * 1024 + 5, 1024);
        assert_eq!(map.len(), 11);
        assert_eq!(map.bytes(10), (10 * 1024, 5));
        assert_eq!(map.span(1023, 2), 0..2);
        assert_eq!(map.span(2048, 1024), 2..3);
        assert_eq!(map.span(5, 0), 0..0);
    }

    #[test]
    fn transitions_keep_counts() {
        let map = ChunkMap::new(8 * 1024, 1024);
        assert!(map.transition(3, ChunkState::Source, ChunkState::Both));
        assert!(!map.transition(3, ChunkState::Source, ChunkState::Both));
        map.set(4, ChunkState::Destination);
        assert_eq!(map.count(ChunkState::Source), 6);
        assert_eq!(map.count(ChunkState::Both), 1);
        assert_eq!(map.count(ChunkState::Destination), 1);
        assert_eq!(map.next_in(ChunkState::Both, 0), Some(3));
        let (both, destination) = map.to_bitmaps();
        let copy = ChunkMap::new(8 * 1024, 1024);
        copy.load_bitmaps(&both, &destination);
        assert_eq!(copy.get(3), ChunkState::Both);
        assert_eq!(copy.get(4), ChunkState::Destination);
        assert_eq!(copy.count(ChunkState::Source), 6);
    }

    #[test]
    fn neighbours_in_one_word_keep_their_own_states() {
        let map = ChunkMap::new(100 << 10, 1024);
        for chunk in (0..100).step_by(3) {
            map.set(chunk, ChunkState::Destination);
        }
        assert!(map.transition(31, ChunkState::Source, ChunkState::Both));
        assert!(map.transition(32, ChunkState::Source, ChunkState::Both));
        for chunk in 0..100 {
            let want = match chunk {
                c if c % 3 == 0 => ChunkState::Destination,
                31 | 32 => ChunkState::Both,
                _ => ChunkState::Source,
            };
            assert_eq!(map.get(chunk), want, "chunk {chunk}");
        }
        assert_eq!(map.count(ChunkState::Destination), 34);
        assert_eq!(map.next_in(ChunkState::Both, 0), Some(31));
    }
}
