//! The move of one stream to another tier, phase by phase (`DESIGN.md`,
//! "The move"): prepare, switch, drain, link. Each phase is recorded in
//! the journal in one transaction once its files are durable; a move
//! interrupted (stopped, or by a crash the store resolved) goes on from
//! the phase recorded.
//!
//! The move has one new file, the target: the switch reserves its head
//! for the bytes already written and sends the appends after it; the drain
//! fills the head; the link closes it. Each stream byte is written once to
//! the new tier. The writer never waits for the move's I/O: the move takes
//! the stream's appending lock only for the switch, a few pointer stores
//! ([`Stream::swap`]).

use std::sync::Arc;
use std::time::Duration;

use dmm_control::{Controls, RateLimiter};

use crate::error::{Error, ErrorKind, Result};
use crate::extent_file::{ExtentFile, sync_dir};
use crate::extents::{Move, Phase};
use crate::journal::Figures;
use crate::seekable::FRAME_BYTES;
use crate::store::StreamStore;
use crate::stream::Stream;

/// The drain syncs the target's head every this many bytes, so that the
/// writer's fsync of the target never has much of the drain's data to
/// flush with it.
const SYNC_EVERY: u64 = 1 << 20;

/// How often a paused or throttled drain looks at its controls again.
const POLL: Duration = Duration::from_millis(50);

/// How a move's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The stream is on its new tier, in one extent.
    Linked(Figures),
    /// Stopped on request; the journal resumes it.
    Stopped,
}

impl StreamStore {
    /// Moves `stream` to tier `to` (or goes on with the move under way),
    /// draining at the controls' rate; pauses while they say so.
    pub fn move_stream(&self, stream: &Stream, to: usize, controls: &Controls) -> Result<Moved> {
        loop {
            let map = stream.map();
            let Some(moving) = map.moving().copied() else {
                self.prepare(stream, to)?;
                continue;
            };
            match moving.phase {
                Phase::Prepared => self.switch(stream, &moving)?,
                Phase::Switched => {
                    if !self.drain(stream, &moving, controls)? {
                        return Ok(Moved::Stopped);
                    }
                }
                Phase::Drained => return self.link(stream, &moving).map(Moved::Linked),
                Phase::Linked => unreachable!("a linked move is no move"),
            }
        }
    }

    /// Creates the target on the new tier, syncs it with its directory,
    /// then records the move as prepared.
    fn prepare(&self, stream: &Stream, to: usize) -> Result<()> {
        let map = stream.map();
        let from = map.tail().tier;
        if to <= from || to >= self.orbit().tiers().len() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{} is on tier {}: it moves only to a denser tier of the orbit",
                    stream.name(),
                    self.orbit().tiers()[from].name
                ),
            ));
        }
        let tier = &self.orbit().tiers()[to];
        let number = map.next_file();
        let path = self.path(stream.name(), number, to);
        let _ = std::fs::remove_file(&path);
        let target = Arc::new(ExtentFile::create(&path, tier.format)?);
        sync_dir(&tier.dir)?;
        let map = stream.update(|view| {
            view.files.insert(number, target);
            let moving = view.map.prepare(to)?;
            debug_assert_eq!(moving.target, number);
            Ok::<_, Error>(view.map.clone())
        })?;
        self.journal().record(stream.name(), &map)
    }

    /// The switch: between two appends, the tail becomes the target, its
    /// head reserved for the bytes written so far. Recorded after (a crash
    /// before the record is resolved from the files).
    fn switch(&self, stream: &Stream, moving: &Move) -> Result<()> {
        let target = stream.file(moving.target);
        let map = stream.swap(|view| {
            let source = *view.map.tail();
            view.map.switch()?;
            target.reserve_head(source.end - source.base);
            Ok::<_, Error>(view.map.clone())
        })?;
        self.journal().record(stream.name(), &map)
    }

    /// Copies the source extent into the target's head (from where a
    /// stopped drain left it), syncs it, compares both, and records the
    /// drain: reads below the switch offset then come from the new tier,
    /// and the source extent is released. False if stopped first.
    fn drain(&self, stream: &Stream, moving: &Move, controls: &Controls) -> Result<bool> {
        let map = stream.map();
        let source_extent = map.extents()[0];
        let switched_at = moving.switched_at.expect("a switched move");
        let (source, target) = (stream.file(source_extent.file), stream.file(moving.target));
        let size = switched_at - source_extent.base;
        let mut limiter = RateLimiter::default();
        let mut at = target.head_filled().expect("a switched target has a head");
        let mut unsynced = 0;
        while at < size {
            while controls.is_paused() && !controls.interrupted() {
                std::thread::sleep(POLL);
            }
            if controls.interrupted() {
                target.flush()?;
                return Ok(false);
            }
            let bytes = source.read_at(at, FRAME_BYTES.min((size - at) as usize))?;
            target.fill_head(&bytes)?;
            at += bytes.len() as u64;
            unsynced += bytes.len() as u64;
            if unsynced >= SYNC_EVERY {
                target.flush()?;
                unsynced = 0;
            }
            let wait = limiter.spend(bytes.len() as u64, controls.rate());
            sleep_unless_interrupted(wait, controls);
        }
        target.flush()?;
        if digest(&source, size)? != digest(&target, size)? {
            target.reset_head()?;
            return Err(Error::on(ErrorKind::Mismatch, "drain", source.path())
                .with_detail(format!("{} reads back different", target.path().display())));
        }
        let map = stream.update(|view| {
            view.map.drained()?;
            Ok::<_, Error>(view.map.clone())
        })?;
        self.journal().record(stream.name(), &map)?;
        stream.update(|view| view.files.remove(&source_extent.file));
        self.remove_file(stream.name(), source_extent.file, source_extent.tier)?;
        Ok(true)
    }

    /// Closes the target's head (zstd: padding frames over the room its
    /// frames left), syncs it, and records the stream as one extent.
    fn link(&self, stream: &Stream, moving: &Move) -> Result<Figures> {
        let target = stream.file(moving.target);
        target.close_head()?;
        target.flush()?;
        let (map, len) = stream.update(|view| {
            view.map.linked()?;
            Ok::<_, Error>((view.map.clone(), view.map.len()))
        })?;
        self.journal().record(stream.name(), &map)?;
        let extent = map.extents()[0];
        let switched_at = moving.switched_at.expect("a drained move was switched");
        let figures = Figures {
            drained: switched_at - extent.base,
            redirected: len - switched_at,
            moves: 1,
        };
        self.journal().add_figures(figures)?;
        Ok(figures)
    }
}

/// Sleeps `wait` (a rate limit's), in slices, until a stop or a rollback
/// is asked for: at a low rate one frame's wait is long, and a stop must
/// not wait for it.
fn sleep_unless_interrupted(wait: Duration, controls: &Controls) {
    let until = std::time::Instant::now() + wait;
    while !controls.interrupted() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL));
    }
}

/// The BLAKE3 digest of the first `len` stream bytes of `file`.
fn digest(file: &ExtentFile, len: u64) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut at = 0;
    while at < len {
        let bytes = file.read_at(at, FRAME_BYTES.min((len - at) as usize))?;
        if bytes.is_empty() {
            break;
        }
        hasher.update(&bytes);
        at += bytes.len() as u64;
    }
    Ok(hasher.finalize())
}
