//! Copying file data segment by segment, for the background workers and
//! on demand for the access point, with the marks journaled in the order
//! `DESIGN.md` requires.

use std::fs::{self, File};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;

use dmm_catalog::tree_journal::{Change, EntryState};

use super::{EntryId, Namespace, serialize};
use crate::error::{Error, ErrorKind, Result, on};
use crate::fidelity;

/// What a caller may do with a segment.
enum Claim {
    /// Already in the target.
    Fetched,
    /// Claimed: the caller copies it (or declares it not needed) and
    /// releases it.
    Mine,
}

impl Namespace {
    /// Background step: copies the first segment of file `id` nobody has
    /// copied or claimed. Returns the bytes written, or `None` when no
    /// segment is left to claim.
    pub fn copy_next_segment(&self, id: EntryId) -> Result<Option<u64>> {
        let segment = {
            let mut state = self.lock();
            let segsize = self.settings.segsize;
            let Some(progress) = state.entries.get_mut(&id).and_then(|e| e.progress.as_mut())
            else {
                return Ok(None);
            };
            let count = segments(progress.limit, segsize);
            let free =
                (0..count).find(|s| !progress.fetched.contains(*s) && !progress.busy.contains(*s));
            let Some(segment) = free else { return Ok(None) };
            progress.busy.insert(segment);
            segment
        };
        let result = self.copy_segment(id, segment);
        self.release(id, segment, result.is_ok());
        result.map(Some)
    }

    /// Makes sure the bytes `range` of file `id` are in the target (a read
    /// through the access point), copying the missing segments in this
    /// thread.
    pub fn fetch(&self, id: EntryId, range: Range<u64>) -> Result<()> {
        for segment in self.segments_of(id, range) {
            if let Claim::Mine = self.claim(id, segment) {
                let result = self.copy_segment(id, segment);
                self.release(id, segment, result.is_ok());
                result?;
            }
        }
        Ok(())
    }

    /// Before a client write to `range` of a tracked file: fetches the
    /// segments it touches and journals their marks and the file's
    /// *changed* flag, so that no later copy can overwrite the write.
    pub fn prepare_write(&self, id: EntryId, range: Range<u64>) -> Result<()> {
        self.fetch(id, range)?;
        self.note_change(id)
    }

    /// Before a client truncates file `id` to `size`: fetches the segment
    /// cut in two, declares the ones past `size` not needed, and journals
    /// it all.
    pub fn prepare_truncate(&self, id: EntryId, size: u64) -> Result<()> {
        let segsize = self.settings.segsize;
        let limit = match self
            .lock()
            .entries
            .get(&id)
            .and_then(|e| e.progress.as_ref())
        {
            Some(progress) => progress.limit,
            None => return self.note_change(id),
        };
        if size < limit {
            if !size.is_multiple_of(segsize) {
                self.fetch(id, size..size + 1)?;
            }
            let first_dropped = size.div_ceil(segsize) as u32;
            for segment in first_dropped..segments(limit, segsize) {
                if let Claim::Mine = self.claim(id, segment) {
                    self.release(id, segment, true);
                }
            }
            let mut state = self.lock();
            if let Some(progress) = state.entries.get_mut(&id).and_then(|e| e.progress.as_mut()) {
                progress.limit = progress.limit.min(size);
            }
        }
        self.note_change(id)
    }

    /// Flags the file changed through the access point and journals every
    /// mark it has, before the client's change goes through.
    pub fn note_change(&self, id: EntryId) -> Result<()> {
        let must_flush = {
            let mut state = self.lock();
            let Some(entry) = state.entries.get_mut(&id) else {
                return Ok(());
            };
            if !entry.changed {
                entry.changed = true;
                state.batch.push(Change::Changed(id));
                state.unflushed.insert(id);
            }
            state.unflushed.contains(&id)
        };
        if must_flush { self.flush() } else { Ok(()) }
    }

    fn segments_of(&self, id: EntryId, range: Range<u64>) -> Range<u32> {
        let segsize = self.settings.segsize;
        let state = self.lock();
        let Some(progress) = state.entries.get(&id).and_then(|e| e.progress.as_ref()) else {
            return 0..0;
        };
        let end = range.end.min(progress.limit);
        if range.start >= end {
            return 0..0;
        }
        (range.start / segsize) as u32..end.div_ceil(segsize) as u32
    }

    /// Waits while someone else copies `segment`, then claims it unless it
    /// is in the target already.
    fn claim(&self, id: EntryId, segment: u32) -> Claim {
        let mut state = self.lock();
        loop {
            let Some(progress) = state.entries.get_mut(&id).and_then(|e| e.progress.as_mut())
            else {
                return Claim::Fetched;
            };
            if progress.fetched.contains(segment) {
                return Claim::Fetched;
            }
            if !progress.busy.contains(segment) {
                progress.busy.insert(segment);
                return Claim::Mine;
            }
            self.progress.wait(&mut state);
        }
    }

    /// Copies one segment from the source to the target file.
    fn copy_segment(&self, id: EntryId, segment: u32) -> Result<u64> {
        let (source_path, limit) = {
            let state = self.lock();
            let entry = state
                .entries
                .get(&id)
                .ok_or_else(|| Error::new(ErrorKind::Target, format!("entry {id} was deleted")))?;
            let limit = entry.progress.as_ref().map_or(0, |p| p.limit);
            (entry.source.clone(), limit)
        };
        let target_path = self
            .target_path(id)
            .ok_or_else(|| Error::new(ErrorKind::Target, format!("entry {id} has no name left")))?;
        let source_path =
            source_path.ok_or_else(|| Error::new(ErrorKind::Source, "file without a source"))?;
        let source = self.source.open_file(&source_path)?;
        let target = open_for_write(&target_path)?;
        let segsize = self.settings.segsize;
        let start = u64::from(segment) * segsize;
        let end = (start + segsize).min(limit);
        let written = fidelity::copy_range(&source, &target, start, end).map_err(on(
            ErrorKind::Source,
            "copy data of",
            &self.source.path(&source_path),
        ))?;
        self.keep_source_times(id, &source, &target_path);
        let mut state = self.lock();
        state.counts.bytes_written += written;
        state.counts.bytes_done += end - start;
        Ok(written)
    }

    /// Writing a segment moved the placeholder's times: clients must keep
    /// seeing the source's (a reader such as tar checks them), unless they
    /// changed the file themselves.
    fn keep_source_times(&self, id: EntryId, source: &File, target: &std::path::Path) {
        let changed = self.lock().entries.get(&id).is_none_or(|e| e.changed);
        if changed {
            return;
        }
        if let Ok(metadata) = source.metadata() {
            // Best effort: the final times are set again at completion.
            let _ = fidelity::set_times(target, &crate::source::Meta::from_metadata(&metadata));
        }
    }

    /// Ends a claim: the segment is marked fetched (if `done`) and the file
    /// completed when it was the last one.
    fn release(&self, id: EntryId, segment: u32, done: bool) {
        let mut state = self.lock();
        let complete = {
            let Some(progress) = state.entries.get_mut(&id).and_then(|e| e.progress.as_mut())
            else {
                self.progress.notify_all();
                return;
            };
            progress.busy.remove(segment);
            if done {
                progress.fetched.insert(segment);
            }
            let count = segments(progress.limit, self.settings.segsize);
            progress.fetched.range_cardinality(0..count) == u64::from(count)
        };
        if done {
            let bits = serialize(
                &state.entries[&id]
                    .progress
                    .as_ref()
                    .expect("pending")
                    .fetched,
            );
            state.batch.push(Change::Segments(id, bits));
            state.unflushed.insert(id);
            super::Namespace::clear_failure(&mut state, id);
        }
        if complete {
            self.complete_file(&mut state, id);
        }
        self.progress.notify_all();
    }

    /// The last segment is in: the file leaves the pending set. (Its times
    /// are the source's already: `keep_source_times` ran after the copy,
    /// unless a client changed the file.)
    fn complete_file(&self, state: &mut super::State, id: EntryId) {
        let Some(entry) = state.entries.get_mut(&id) else {
            return;
        };
        let limit = entry.progress.take().map_or(entry.size, |p| p.limit);
        entry.state = EntryState::Done;
        state.counts.files_done += 1;
        // Bytes past a client truncation were never copied: count them done.
        state.counts.bytes_done += state.entries[&id].size.saturating_sub(limit);
        state.batch.push(Change::State(id, EntryState::Done));
        state.unflushed.insert(id);
    }
}

fn segments(limit: u64, segsize: u64) -> u32 {
    limit.div_ceil(segsize) as u32
}

fn open_for_write(path: &std::path::Path) -> Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(on(ErrorKind::Target, "open", path))
}
