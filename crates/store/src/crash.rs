//! A store that can lose power: the crash tests' disk.
//!
//! A real disk with a volatile write cache keeps, across a power cut, the
//! writes a flush covered and those made with FUA; any other write may be
//! lost, and the one in flight may be torn. Killing a process never shows
//! that (the page cache keeps everything it wrote), so crash tests run on
//! this store instead: it keeps the live bytes every read sees apart from
//! the durable bytes a power cut leaves.
//!
//! Every crash store (and whatever else simulates a disk, such as the
//! volume's crash state files) hangs on one [`Power`] rail. [`Power::cut`]
//! stops them all at one instant; while it is held, [`CrashStore::survivor`]
//! gives what each device holds after the cut, as a new store, optionally
//! with the last write that was not durable yet torn (a random subset of
//! its 512-byte sectors written, the others not).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{BlockStore, Capabilities, Extent, MemoryStore, Result, ZeroMode};

/// The unit a torn write is cut in.
pub const SECTOR: u64 = 512;

/// The power rail simulated devices share: each operation runs with the
/// power on, and a cut waits for the operations under way, then holds
/// every device still.
#[derive(Clone, Default)]
pub struct Power {
    rail: Arc<RwLock<()>>,
}

/// An operation of a simulated device in progress: no cut happens meanwhile.
pub struct PowerOn<'a> {
    _rail: RwLockReadGuard<'a, ()>,
}

/// A power cut: every device on the rail stands still while this is held.
pub struct Blackout<'a> {
    _rail: RwLockWriteGuard<'a, ()>,
}

impl Power {
    pub fn new() -> Power {
        Power::default()
    }

    /// Runs one device operation: hold the result for its duration (and
    /// never take a second one meanwhile: a waiting cut would deadlock).
    pub fn on(&self) -> PowerOn<'_> {
        PowerOn {
            _rail: self.rail.read(),
        }
    }

    /// Cuts the power: waits for the operations under way, then holds all
    /// the devices still until the result is dropped.
    pub fn cut(&self) -> Blackout<'_> {
        Blackout {
            _rail: self.rail.write(),
        }
    }
}

/// A change not durable yet.
#[derive(Clone)]
enum Change {
    Write {
        offset: u64,
        data: Bytes,
    },
    Zero {
        offset: u64,
        len: u64,
        mode: ZeroMode,
    },
    Discard {
        offset: u64,
        len: u64,
    },
}

/// What a power cut leaves of the writes that were not durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Only the durable bytes.
    DurableOnly,
    /// The durable bytes, and the sectors of the last change (a write not
    /// durable yet, made after every durable one) that this seed picks.
    TearLast { seed: u64 },
}

/// A memory store whose durable bytes are kept apart from its live ones.
pub struct CrashStore {
    power: Power,
    live: MemoryStore,
    durable: MemoryStore,
    /// Every change since the last flush, oldest first, each with whether
    /// it was durable (FUA) when made: a flush replays them all in order
    /// onto the durable bytes.
    since_flush: Mutex<Vec<(Change, bool)>>,
}

impl CrashStore {
    /// An empty (all-hole) store of `size` bytes on its own power rail.
    pub fn new(size: u64) -> CrashStore {
        CrashStore::on_rail(size, &Power::new())
    }

    /// An empty (all-hole) store of `size` bytes on `power`.
    pub fn on_rail(size: u64, power: &Power) -> CrashStore {
        CrashStore {
            power: power.clone(),
            live: MemoryStore::new(size),
            durable: MemoryStore::new(size),
            since_flush: Mutex::new(Vec::new()),
        }
    }

    /// The same store, refusing writes.
    pub fn into_read_only(self) -> CrashStore {
        CrashStore {
            live: self.live.into_read_only(),
            ..self
        }
    }

    /// What this store holds after the power cut `_blackout` of its rail,
    /// as a new store on `power`.
    pub fn survivor(&self, _blackout: &Blackout<'_>, cut: Cut, power: &Power) -> CrashStore {
        let after = CrashStore {
            power: power.clone(),
            live: self.durable.duplicate(),
            durable: self.durable.duplicate(),
            since_flush: Mutex::new(Vec::new()),
        };
        // Only the newest change can be torn: one older than a durable
        // change could overwrite its bytes.
        let last = self.since_flush.lock().last().cloned();
        if let (Cut::TearLast { seed }, Some((Change::Write { offset, data }, false))) = (cut, last)
        {
            for (at, sector) in torn_sectors(offset, &data, seed) {
                // In range: the write it comes from was.
                let _ = after.live.write_now(at, &sector);
                let _ = after.durable.write_now(at, &sector);
            }
        }
        after
    }

    /// Cuts this store's power alone and returns what is left, on a new
    /// rail.
    pub fn power_cut(&self, cut: Cut) -> CrashStore {
        let blackout = self.power.cut();
        self.survivor(&blackout, cut, &Power::new())
    }

    /// Applies a change to the live bytes and records it: applied to the
    /// durable bytes at once when it is durable (FUA), and kept for the
    /// next flush either way.
    fn change(&self, change: Change, durable: bool) -> Result<()> {
        let _on = self.power.on();
        apply(&self.live, &change)?;
        // The durable bytes change under the log's lock only: a flush
        // replaying older changes must not land after this one.
        let mut since_flush = self.since_flush.lock();
        if durable {
            apply(&self.durable, &change)?;
        }
        since_flush.push((change, durable));
        Ok(())
    }
}

/// The sectors of a write that `seed` keeps, each with its bytes.
fn torn_sectors(offset: u64, data: &Bytes, seed: u64) -> Vec<(u64, Bytes)> {
    let mut state = seed;
    let mut kept = Vec::new();
    let mut at = 0u64;
    while at < data.len() as u64 {
        let end = ((offset + at) / SECTOR + 1) * SECTOR - offset;
        let end = end.min(data.len() as u64);
        if splitmix64(&mut state) & 1 == 1 {
            kept.push((offset + at, data.slice(at as usize..end as usize)));
        }
        at = end;
    }
    kept
}

/// splitmix64: a seeded sequence, good enough for what crash tests pick
/// (sectors of a torn write, the length of a torn append).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn apply(store: &MemoryStore, change: &Change) -> Result<()> {
    match change {
        Change::Write { offset, data } => store.write_now(*offset, data),
        Change::Zero { offset, len, mode } => store.write_zeroes_now(*offset, *len, *mode),
        Change::Discard { offset, len } => store.discard_now(*offset, *len),
    }
}

#[async_trait]
impl BlockStore for CrashStore {
    fn target(&self) -> &str {
        self.live.target()
    }

    fn size(&self) -> u64 {
        self.live.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.live.capabilities()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let _on = self.power.on();
        self.live.read_now(offset, len)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.change(Change::Write { offset, data }, fua)
    }

    async fn flush(&self) -> Result<()> {
        let _on = self.power.on();
        let mut since_flush = self.since_flush.lock();
        for (change, _) in since_flush.iter() {
            apply(&self.durable, change)?;
        }
        since_flush.clear();
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.change(Change::Discard { offset, len }, fua)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.change(Change::Zero { offset, len, mode }, fua)
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _on = self.power.on();
        self.live.extents_now(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(fill: u8, len: usize) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    async fn after(store: &CrashStore, cut: Cut, offset: u64, len: usize) -> Vec<u8> {
        let cut = store.power_cut(cut);
        cut.read(offset, len).await.unwrap()
    }

    #[tokio::test]
    async fn a_power_cut_keeps_flushed_and_fua_writes_and_loses_the_rest() {
        let store = CrashStore::new(1 << 20);
        store.write(0, bytes(1, 4096), false).await.unwrap();
        store.flush().await.unwrap();
        store.write(4096, bytes(2, 4096), true).await.unwrap();
        store.write(8192, bytes(3, 4096), false).await.unwrap();
        store.write(0, bytes(4, 512), false).await.unwrap();
        assert_eq!(store.read(0, 512).await.unwrap(), vec![4; 512]);
        let cut = Cut::DurableOnly;
        assert_eq!(after(&store, cut, 0, 4096).await, vec![1; 4096]);
        assert_eq!(after(&store, cut, 4096, 4096).await, vec![2; 4096]);
        assert_eq!(after(&store, cut, 8192, 4096).await, vec![0; 4096]);
        store.flush().await.unwrap();
        assert_eq!(after(&store, cut, 0, 512).await, vec![4; 512]);
        assert_eq!(after(&store, cut, 8192, 4096).await, vec![3; 4096]);
    }

    #[tokio::test]
    async fn a_flush_replays_changes_in_their_order_around_fua_writes() {
        let store = CrashStore::new(1 << 20);
        store.write(0, bytes(1, 4096), false).await.unwrap();
        store.write(0, bytes(2, 4096), true).await.unwrap();
        store.discard(0, 4096, false).await.unwrap();
        assert_eq!(
            after(&store, Cut::DurableOnly, 0, 4096).await,
            vec![2; 4096]
        );
        store.flush().await.unwrap();
        assert_eq!(
            after(&store, Cut::DurableOnly, 0, 4096).await,
            vec![0; 4096]
        );
    }

    #[tokio::test]
    async fn a_torn_write_keeps_whole_sectors_of_old_or_new_bytes() {
        let store = CrashStore::new(1 << 20);
        store.write(0, bytes(1, 64 << 10), true).await.unwrap();
        store.write(100, bytes(2, 32 << 10), false).await.unwrap();
        let mut torn_some = false;
        for seed in 0..8 {
            let got = after(&store, Cut::TearLast { seed }, 0, 64 << 10).await;
            for (sector, bytes) in got.chunks(SECTOR as usize).enumerate() {
                let start = sector as u64 * SECTOR;
                let written = start + SECTOR > 100 && start < 100 + (32 << 10);
                let new = bytes.iter().filter(|&&b| b == 2).count();
                assert!(
                    new == 0 || written,
                    "sector {sector} outside the write changed"
                );
                let inside = (start.max(100)..(start + SECTOR).min(100 + (32 << 10))).count();
                assert!(new == 0 || new == inside, "sector {sector} half written");
                torn_some |= new > 0;
            }
        }
        assert!(torn_some, "some seed keeps some sectors");
        store.write(0, bytes(3, 512), true).await.unwrap();
        let got = after(&store, Cut::TearLast { seed: 1 }, 4096, 4096).await;
        assert_eq!(
            got,
            vec![1; 4096],
            "a write older than a durable one is not torn"
        );
    }
}
