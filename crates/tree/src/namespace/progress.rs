//! The copy progress of one regular file with data still to copy: which
//! segments are in the target, which are being copied right now, and where
//! the file ends for the migration (a client's truncation). Its fields
//! change only through these methods, called by the namespace's state,
//! which recounts the file's progress around each change.

use std::ops::Range;

use roaring::RoaringBitmap;

/// Copy progress of a regular file that is not complete.
#[derive(Debug, Default)]
pub(super) struct FileProgress {
    /// Segments whose bytes are in the target.
    fetched: RoaringBitmap,
    /// Segments being copied right now.
    busy: RoaringBitmap,
    /// Bytes past this offset are not fetched (the client truncated).
    limit: u64,
    /// Every segment below this one was fetched or busy when last looked
    /// at: where the background copy looks for work first.
    cursor: u32,
}

/// Where a segment stands for a thread that needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Segment {
    /// Its bytes are in the target already.
    Fetched,
    /// Another thread is copying it.
    Busy,
    /// It was free: the caller now copies it.
    Claimed,
}

impl FileProgress {
    /// A file of `limit` bytes of which the `fetched` segments are copied.
    pub(super) fn new(limit: u64, fetched: RoaringBitmap) -> FileProgress {
        FileProgress {
            fetched,
            busy: RoaringBitmap::new(),
            limit,
            cursor: 0,
        }
    }

    /// The progress the journal recorded (`segments`: the serialized bitmap
    /// of copied segments, if any).
    pub(super) fn from_journal(limit: u64, segments: Option<&[u8]>) -> FileProgress {
        let fetched = segments
            .and_then(|bytes| RoaringBitmap::deserialize_from(bytes).ok())
            .unwrap_or_default();
        FileProgress::new(limit, fetched)
    }

    /// The copied segments, serialized for the journal.
    pub(super) fn serialized(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.fetched.serialized_size());
        self.fetched
            .serialize_into(&mut bytes)
            .expect("writing to a Vec");
        bytes
    }

    /// The offset past which the file needs nothing from the source.
    pub(super) fn limit(&self) -> u64 {
        self.limit
    }

    /// Segments of the file (those past `limit` are not needed).
    fn segments(&self, segsize: u64) -> u32 {
        self.limit.div_ceil(segsize) as u32
    }

    pub(super) fn is_complete(&self, segsize: u64) -> bool {
        let count = self.segments(segsize);
        self.fetched.range_cardinality(0..count) == u64::from(count)
    }

    /// Bytes of a file of `size` bytes that need no more copying: the
    /// fetched segments, and everything past a client's truncation.
    pub(super) fn done_bytes(&self, size: u64, segsize: u64) -> u64 {
        let count = self.segments(segsize);
        let mut bytes = self.fetched.range_cardinality(0..count) * segsize;
        if count > 0 && self.fetched.contains(count - 1) {
            // The last segment ends at the limit.
            bytes -= u64::from(count) * segsize - self.limit;
        }
        bytes + size.saturating_sub(self.limit)
    }

    /// Claims the first segment nobody has copied or claimed.
    pub(super) fn claim_free(&mut self, segsize: u64) -> Option<u32> {
        let count = self.segments(segsize);
        while self.cursor < count
            && (self.fetched.contains(self.cursor) || self.busy.contains(self.cursor))
        {
            self.cursor += 1;
        }
        let segment = (self.cursor < count).then_some(self.cursor)?;
        self.busy.insert(segment);
        Some(segment)
    }

    /// Claims `segment` unless it is fetched or another thread copies it.
    pub(super) fn claim(&mut self, segment: u32) -> Segment {
        if self.fetched.contains(segment) {
            Segment::Fetched
        } else if !self.busy.insert(segment) {
            Segment::Busy
        } else {
            Segment::Claimed
        }
    }

    /// Ends a claim: the segment is fetched if `done` (copied, or not
    /// needed any more), free again otherwise.
    pub(super) fn release(&mut self, segment: u32, done: bool) {
        self.busy.remove(segment);
        if done {
            self.fetched.insert(segment);
        } else {
            self.cursor = self.cursor.min(segment);
        }
    }

    /// A client truncated the file to `size`.
    pub(super) fn truncate(&mut self, size: u64) {
        self.limit = self.limit.min(size);
    }

    /// Marks the segments of `range` not needed, except those being
    /// copied, which it returns.
    pub(super) fn drop_range(&mut self, range: Range<u32>) -> Vec<u32> {
        let busy: Vec<u32> = self.busy.range(range.clone()).collect();
        let mut free = RoaringBitmap::new();
        free.insert_range(range);
        free -= &self.busy;
        self.fetched |= free;
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_claimed_once_and_counted_when_done() {
        let mut progress = FileProgress::new(10, RoaringBitmap::new());
        assert_eq!(progress.claim_free(4), Some(0));
        assert_eq!(progress.claim(0), Segment::Busy);
        assert_eq!(progress.claim(1), Segment::Claimed);
        progress.release(0, true);
        progress.release(1, false);
        assert_eq!(progress.claim(0), Segment::Fetched);
        assert_eq!(progress.done_bytes(10, 4), 4);
        assert_eq!(progress.drop_range(1..3), Vec::<u32>::new());
        assert!(progress.is_complete(4));
        assert_eq!(progress.done_bytes(10, 4), 10);
    }
}
