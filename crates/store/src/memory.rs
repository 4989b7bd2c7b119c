//! A sparse store in memory, for tests and demos.
//!
//! Pages are allocated on first write and freed by discard, so the
//! allocation map behaves like a sparse file's and the conformance suite can
//! check it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;

use crate::{
    BlockStore, Capabilities, Extent, ExtentKind, Op, Result, ZeroMode, check_range,
    check_writable, coalesce,
};

const PAGE: u64 = 4096;

/// A sparse in-memory store.
pub struct MemoryStore {
    target: String,
    size: u64,
    read_only: bool,
    pages: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl MemoryStore {
    /// An empty (all-hole) store of `size` bytes.
    pub fn new(size: u64) -> MemoryStore {
        MemoryStore {
            target: format!("memory:{size}"),
            size,
            read_only: false,
            pages: RwLock::new(BTreeMap::new()),
        }
    }

    /// The same store, refusing writes.
    pub fn into_read_only(mut self) -> MemoryStore {
        self.read_only = true;
        self
    }

    /// A store holding a copy of this one's bytes now.
    pub fn duplicate(&self) -> MemoryStore {
        MemoryStore {
            target: self.target.clone(),
            size: self.size,
            read_only: self.read_only,
            pages: RwLock::new(self.pages.read().clone()),
        }
    }

    /// Bytes held in allocated pages.
    pub fn allocated_bytes(&self) -> u64 {
        self.pages.read().len() as u64 * PAGE
    }

    fn page_span(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let end = offset + len;
        let first = offset / PAGE;
        let last = end.div_ceil(PAGE);
        (first..last).map(move |page| {
            let start = page * PAGE;
            let from = offset.max(start) - start;
            let to = end.min(start + PAGE) - start;
            (page, from as usize, to as usize)
        })
    }

    /// Reads now: a memory store never waits.
    pub(crate) fn read_now(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        check_range(self, Op::Read, offset, len as u64)?;
        let mut out = vec![0u8; len];
        let pages = self.pages.read();
        let mut at = 0;
        for (page, from, to) in Self::page_span(offset, len as u64) {
            if let Some(data) = pages.get(&page) {
                out[at..at + to - from].copy_from_slice(&data[from..to]);
            }
            at += to - from;
        }
        Ok(out)
    }

    /// Writes now.
    pub(crate) fn write_now(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_writable(self, Op::Write, offset, data.len() as u64)?;
        let mut pages = self.pages.write();
        let mut at = 0;
        for (page, from, to) in Self::page_span(offset, data.len() as u64) {
            let dest = pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            dest[from..to].copy_from_slice(&data[at..at + to - from]);
            at += to - from;
        }
        Ok(())
    }

    /// Discards now.
    pub(crate) fn discard_now(&self, offset: u64, len: u64) -> Result<()> {
        check_writable(self, Op::Discard, offset, len)?;
        self.zero_range(offset, len, false);
        Ok(())
    }

    /// Writes zeroes now.
    pub(crate) fn write_zeroes_now(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        check_writable(self, Op::WriteZeroes, offset, len)?;
        self.zero_range(offset, len, !mode.may_punch);
        Ok(())
    }

    /// The allocation map now.
    pub(crate) fn extents_now(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self, Op::Extents, offset, len)?;
        let pages = self.pages.read();
        let extents = Self::page_span(offset, len).map(|(page, from, to)| {
            let kind = if pages.contains_key(&page) {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            Extent::new(page * PAGE + from as u64, (to - from) as u64, kind)
        });
        Ok(coalesce(extents))
    }

    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut pages = self.pages.write();
        for (page, from, to) in Self::page_span(offset, len) {
            let whole = from == 0 && to == PAGE as usize;
            if whole && !keep_allocated {
                pages.remove(&page);
            } else if let Some(data) = pages.get_mut(&page) {
                data[from..to].fill(0);
            } else if keep_allocated {
                pages.insert(page, vec![0; PAGE as usize].into_boxed_slice());
            }
        }
    }
}

#[async_trait]
impl BlockStore for MemoryStore {
    fn target(&self) -> &str {
        &self.target
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            preferred_block_size: PAGE as u32,
            rotational: false,
            discard: true,
            fast_zero: true,
            flush_covers_all_handles: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_now(offset, len)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<()> {
        self.write_now(offset, &data)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        self.discard_now(offset, len)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, _fua: bool) -> Result<()> {
        self.write_zeroes_now(offset, len, mode)
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.extents_now(offset, len)
    }
}
