//! Allocation maps: which parts of a store hold data and which read as zero.
//!
//! The copier skips what reads as zero, the NBD server answers
//! `base:allocation` queries with it, and sparse images stay sparse.

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated; contents must be read.
    Data,
    /// Allocated, known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes.
    Hole,
}

impl ExtentKind {
    /// Whether the extent reads as zeroes without being read.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// A run of bytes of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn new(offset: u64, len: u64, kind: ExtentKind) -> Extent {
        Extent { offset, len, kind }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Merges neighbours of the same kind and drops empty extents.
pub fn coalesce(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for extent in extents.into_iter().filter(|e| e.len > 0) {
        match out.last_mut() {
            Some(last) if last.kind == extent.kind && last.end() == extent.offset => {
                last.len += extent.len;
            }
            _ => out.push(extent),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_touching_extents_of_one_kind() {
        let merged = coalesce([
            Extent::new(0, 10, ExtentKind::Data),
            Extent::new(10, 5, ExtentKind::Data),
            Extent::new(15, 0, ExtentKind::Hole),
            Extent::new(15, 5, ExtentKind::Hole),
            Extent::new(20, 5, ExtentKind::Zero),
        ]);
        assert_eq!(
            merged,
            vec![
                Extent::new(0, 15, ExtentKind::Data),
                Extent::new(15, 5, ExtentKind::Hole),
                Extent::new(20, 5, ExtentKind::Zero),
            ]
        );
    }
}
