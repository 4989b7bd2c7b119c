//! Copying file data segment by segment, for the background workers and
//! on demand for the access point, with the marks journaled in the order
//! `DESIGN.md` requires.
//!
//! A segment is copied by whoever claims it first (a worker, or a client's
//! read or write); anyone else who needs it waits for that copy. A claim is
//! a value ([`Claim`]) whose drop releases the segment, so a copy that
//! fails, or a thread that unwinds, never leaves others waiting for it.

use std::fs::{self, File};
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use super::Namespace;
use super::progress::Segment;
use crate::error::{Error, ErrorKind, Result, on};
use crate::fidelity;
use crate::journal::EntryId;

/// How a claim on a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The copy failed (or never ran): the segment is free again.
    Failed,
    /// The segment's bytes are in the target.
    Copied,
    /// A client's change (truncate, hole punch) makes the source's bytes
    /// of the segment irrelevant.
    NotNeeded,
}

/// A segment this thread claimed; released when dropped.
struct Claim<'a> {
    namespace: &'a Namespace,
    id: EntryId,
    segment: u32,
    outcome: Outcome,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.namespace.release(self.id, self.segment, self.outcome);
    }
}

impl Namespace {
    /// Background step: copies the first segment of file `id` nobody has
    /// copied or claimed. Returns the bytes written, or `None` when no
    /// segment is left to claim.
    pub fn copy_next_segment(&self, id: EntryId) -> Result<Option<u64>> {
        let Some(segment) = self.lock().claim_free_segment(id) else {
            return Ok(None);
        };
        let mut claim = Claim {
            namespace: self,
            id,
            segment,
            outcome: Outcome::Failed,
        };
        let written = self.copy_segment(id, segment)?;
        claim.outcome = Outcome::Copied;
        Ok(Some(written))
    }

    /// Makes sure the bytes `range` of file `id` are in the target (a read
    /// through the access point), copying the missing segments in this
    /// thread.
    pub fn fetch(&self, id: EntryId, range: Range<u64>) -> Result<()> {
        for segment in self.segments_of(id, range) {
            self.check_open()?;
            if let Some(mut claim) = self.claim(id, segment)? {
                self.copy_segment(id, segment)?;
                claim.outcome = Outcome::Copied;
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
        if let Some(limit) = self.limit(id).filter(|&limit| size < limit) {
            self.forget_range(id, size..limit)?;
            self.lock().truncate(id, size);
        }
        self.note_change(id)
    }

    /// Before a client makes `range` of file `id` read as zeros (punches a
    /// hole, zeroes a range): fetches the segments the range cuts, declares
    /// the ones it covers whole not needed, and journals it all.
    pub fn prepare_zero(&self, id: EntryId, range: Range<u64>) -> Result<()> {
        self.forget_range(id, range)?;
        self.note_change(id)
    }

    /// The source's bytes of `range` of file `id` will not be needed: the
    /// segments the range cuts are fetched (they keep part of their bytes),
    /// the ones it covers whole are marked not needed.
    fn forget_range(&self, id: EntryId, range: Range<u64>) -> Result<()> {
        let segsize = self.settings.segsize;
        let Some(limit) = self.limit(id) else {
            return Ok(());
        };
        let end = range.end.min(limit);
        let segments = self.segments_of(id, range.start..end);
        // The segments the range cuts keep part of their bytes: fetched.
        for segment in [segments.start, segments.end.saturating_sub(1)] {
            let start = u64::from(segment) * segsize;
            let whole = range.start <= start && (start + segsize).min(limit) <= end;
            if segments.contains(&segment) && !whole {
                self.fetch(id, start..start + 1)?;
            }
        }
        // The ones it covers whole: not needed, all at once; those being
        // copied right now are waited for.
        let first = u64::from(segments.start) * segsize;
        let whole_from = segments.start + u32::from(first < range.start);
        let busy = self.drop_segments(id, whole_from..segments.end);
        for segment in busy {
            if let Some(mut claim) = self.claim(id, segment)? {
                claim.outcome = Outcome::NotNeeded;
            }
        }
        Ok(())
    }

    /// Marks the segments of `range` of file `id` not needed, except those
    /// being copied, which it returns. (The caller made sure the range's
    /// last segment is covered whole or fetched.)
    fn drop_segments(&self, id: EntryId, range: Range<u32>) -> Vec<u32> {
        if range.is_empty() {
            return Vec::new();
        }
        let busy = self.lock().drop_segments(id, range);
        if busy.is_some() {
            self.progress.notify_all();
        }
        busy.unwrap_or_default()
    }

    /// Flags the file changed through the access point and journals every
    /// mark it has, before the client's change goes through.
    pub fn note_change(&self, id: EntryId) -> Result<()> {
        let must_flush = self.lock().note_change(id);
        if must_flush { self.flush() } else { Ok(()) }
    }

    /// The offset past which file `id` needs nothing from the source, if it
    /// still has data to copy.
    fn limit(&self, id: EntryId) -> Option<u64> {
        self.lock().limit(id)
    }

    /// The segments of file `id` that hold bytes of `range` the source
    /// still has to provide.
    fn segments_of(&self, id: EntryId, range: Range<u64>) -> Range<u32> {
        let segsize = self.settings.segsize;
        let Some(limit) = self.limit(id) else {
            return 0..0;
        };
        let end = range.end.min(limit);
        if range.start >= end {
            return 0..0;
        }
        (range.start / segsize) as u32..end.div_ceil(segsize) as u32
    }

    /// Waits while someone else copies `segment`, then claims it unless it
    /// is in the target already (`None`).
    fn claim(&self, id: EntryId, segment: u32) -> Result<Option<Claim<'_>>> {
        let mut state = self.lock();
        loop {
            match state.claim_segment(id, segment) {
                Segment::Fetched => return Ok(None),
                Segment::Claimed => {
                    return Ok(Some(Claim {
                        namespace: self,
                        id,
                        segment,
                        outcome: Outcome::Failed,
                    }));
                }
                Segment::Busy => self.wait(&mut state)?,
            }
        }
    }

    /// Copies one segment from the source to the target file.
    fn copy_segment(&self, id: EntryId, segment: u32) -> Result<u64> {
        let (source_path, limit, target_ino) = {
            let state = self.lock();
            let entry = state
                .entry(id)
                .ok_or_else(|| Error::new(ErrorKind::Target, format!("entry {id} was deleted")))?;
            let limit = entry.progress.as_ref().map_or(0, |p| p.limit());
            (entry.source.clone(), limit, entry.target_ino)
        };
        let source_path =
            source_path.ok_or_else(|| Error::new(ErrorKind::Source, "file without a source"))?;
        let source = self.source.open_file(&source_path)?;
        let (target, target_path) = self.open_target(id, target_ino)?;
        let segsize = self.settings.segsize;
        let start = u64::from(segment) * segsize;
        let end = (start + segsize).min(limit);
        let written = fidelity::copy_range(&source, &target, start, end).map_err(|err| {
            // Only the target refuses writes; anything else is blamed on
            // the source, which is what fails in practice.
            match err.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS) => {
                    on(ErrorKind::Target, "write", &target_path)(err)
                }
                _ => on(
                    ErrorKind::Source,
                    "copy data of",
                    &self.source.path(&source_path),
                )(err),
            }
        })?;
        self.keep_source_times(id, &source, &target_path);
        self.lock().add_written(written);
        Ok(written)
    }

    /// Copies again, from zero, every file dmm finished copying whose
    /// source moved since dmm read its size (its size or ctime differs):
    /// the source is meant to stay still, but an admin may write to it.
    /// A file a client changed through the access point is the client's
    /// now and is left alone. Returns the source paths copied again.
    pub fn recopy_changed_sources(&self) -> Result<Vec<std::path::PathBuf>> {
        let mut recopied = Vec::new();
        let copied = self.lock().copied_files();
        for (id, source, size, ctime) in copied {
            self.check_open()?;
            // A source gone since is reported by verification.
            let Ok(meta) = self.source.stat(&source) else {
                continue;
            };
            let now = meta.ctime.nanoseconds();
            if meta.size == size && now == ctime {
                continue;
            }
            let (Some(path), Some(target_ino)) = (self.target_path(id), self.target_ino(id)) else {
                continue;
            };
            let file = open_for_write(&path, target_ino)?;
            // Under the state lock: a client that starts changing the file
            // meanwhile waits for the copy to start over, then takes it.
            let mut state = self.lock();
            if state.entry(id).is_none_or(|e| e.changed) {
                continue;
            }
            // Emptied first: stale bytes must not survive where the new
            // source has a hole.
            file.set_len(0)
                .and_then(|()| file.set_len(meta.size))
                .map_err(on(ErrorKind::Target, "truncate", &path))?;
            state.restart_copy(id, meta.size, now);
            recopied.push(self.source.path(&source));
        }
        self.progress.notify_all();
        Ok(recopied)
    }

    /// Opens file `id` in the target for writing. A client renaming it at
    /// that moment can make its path stale: it is looked up again.
    fn open_target(&self, id: EntryId, ino: u64) -> Result<(File, std::path::PathBuf)> {
        let mut attempts = 0;
        loop {
            let path = self.target_path(id).ok_or_else(|| {
                Error::new(ErrorKind::Target, format!("entry {id} has no name left"))
            })?;
            match open_for_write(&path, ino) {
                Ok(file) => return Ok((file, path)),
                Err(_) if attempts < 3 => attempts += 1,
                Err(err) => return Err(err),
            }
        }
    }

    /// Writing a segment moved the placeholder's times: clients must keep
    /// seeing the source's (a reader such as tar checks them), unless they
    /// changed the file themselves.
    fn keep_source_times(&self, id: EntryId, source: &File, target: &std::path::Path) {
        let changed = self.lock().entry(id).is_none_or(|e| e.changed);
        if changed {
            return;
        }
        if let Ok(metadata) = source.metadata() {
            // Best effort: the final times are set again at completion.
            let _ = fidelity::set_times(target, &crate::source::Meta::from_metadata(&metadata));
        }
    }

    /// Ends a claim: the segment is marked fetched (unless the copy failed)
    /// and the file completed when it was the last one.
    fn release(&self, id: EntryId, segment: u32, outcome: Outcome) {
        let mut state = self.lock();
        state.release_segment(id, segment, outcome != Outcome::Failed);
        self.progress.notify_all();
    }
}

/// Opens the target file to write a segment, if it still is inode `ino`: a
/// client may have renamed it away and put another file in its place
/// between the look-up of its path and the open.
fn open_for_write(path: &std::path::Path, ino: u64) -> Result<File> {
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(on(ErrorKind::Target, "open", path))?;
    let found = file
        .metadata()
        .map_err(on(ErrorKind::Target, "stat", path))?
        .ino();
    if found != ino {
        return Err(
            Error::on(ErrorKind::Target, "open", path).with_detail("replaced while dmm opened it")
        );
    }
    Ok(file)
}
