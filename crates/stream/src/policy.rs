//! When streams move along the orbit (`-p after=1h`, `-p above=1G`, or at
//! once when neither is set), and the loop that moves them: a stream store
//! migration's run.

use std::time::{Duration, Instant, SystemTime};

use dmm_control::{Controls, Priority};
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, Result};
use crate::journal::Figures;
use crate::mover::Moved;
use crate::store::StreamStore;
use crate::stream::Stream;

/// How often the loop looks for streams that are due.
const PASS_EVERY: Duration = Duration::from_secs(1);
/// How often a waiting loop looks at its controls.
const POLL: Duration = Duration::from_millis(50);

/// Which streams move to the next tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Once the last append is older than this.
    pub after: Option<Duration>,
    /// Once the stream is larger than this.
    pub above: Option<u64>,
}

impl Policy {
    /// Whether `stream` is due to move (with neither limit set, every
    /// stream is, at once).
    pub fn due(&self, stream: &Stream, now: SystemTime) -> bool {
        let idle = now.duration_since(stream.modified()).unwrap_or_default();
        match (self.after, self.above) {
            (None, None) => true,
            (after, above) => {
                after.is_some_and(|after| idle >= after)
                    || above.is_some_and(|above| stream.len() > above)
            }
        }
    }
}

/// One stream, as a report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRow {
    pub name: String,
    pub bytes: u64,
    /// Bytes its extents take on their tiers.
    pub stored: u64,
    /// The tier of its tail.
    pub tier: String,
    /// Its move's phase and the tier it moves to.
    pub moving: Option<(String, String)>,
}

/// A stream store's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReport {
    pub streams: Vec<StreamRow>,
    pub figures: Figures,
    /// Streams with a move under way or due.
    pub pending: usize,
    pub paused: bool,
}

impl StreamStore {
    /// Moves every stream the policy makes due, and goes on with moves a
    /// restart interrupted, until stopped.
    /// `policy` is read at every pass (it may change while this runs).
    /// The calling thread is niced after the controls' priority (call it
    /// on a thread of its own).
    pub fn keep_moving(&self, policy: impl Fn() -> Policy, controls: &Controls) -> Result<()> {
        while !controls.interrupted() {
            let pass = Instant::now();
            nice(controls.priority());
            for stream in self.list() {
                let Some(to) = self.destination(&stream, &policy()) else {
                    continue;
                };
                match self.move_stream(&stream, to, controls) {
                    Ok(Moved::Stopped) => return Ok(()),
                    Ok(Moved::Linked(_)) => {}
                    // Removed as its move began: a file the move created
                    // is swept when the store is opened next.
                    Err(err) if err.kind() == ErrorKind::NotFound => {
                        tracing::debug!("{}", err.report());
                    }
                    Err(err) => return Err(err),
                }
            }
            while pass.elapsed() < PASS_EVERY && !controls.interrupted() {
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// The tier `stream` moves to now, if any: its move's, or the next
    /// one when the policy says it is due.
    fn destination(&self, stream: &Stream, policy: &Policy) -> Option<usize> {
        let map = stream.map();
        match map.moving() {
            Some(moving) => Some(moving.tier),
            None => self
                .orbit()
                .next_after(map.tail().tier)
                .filter(|_| policy.due(stream, SystemTime::now())),
        }
    }

    /// Every stream and what the moves did.
    pub fn report(&self, policy: &Policy, paused: bool) -> Result<StreamReport> {
        let tiers = self.orbit().tiers();
        let mut report = StreamReport {
            figures: self.figures()?,
            paused,
            ..StreamReport::default()
        };
        for stream in self.list() {
            let (map, shown) = (stream.map(), stream.attributes());
            if self.destination(&stream, policy).is_some() {
                report.pending += 1;
            }
            report.streams.push(StreamRow {
                name: stream.name().to_owned(),
                bytes: shown.len,
                stored: shown.stored,
                tier: tiers[map.tail().tier].name.clone(),
                moving: map
                    .moving()
                    .map(|m| (m.phase.as_str().to_owned(), tiers[m.tier].name.clone())),
            });
        }
        Ok(report)
    }
}

/// Nices the calling thread after `priority`, so that the writer and the
/// FUSE threads serving it win the CPU whenever the drain (reading,
/// compressing, writing) wants it too: a low or normal priority move takes
/// only what they leave. A thread not run as root cannot lower its nice
/// value again: it stays at the lowest priority it was given.
fn nice(priority: Priority) {
    let value = match priority {
        Priority::Low => 19,
        Priority::Normal => 10,
        Priority::High => 0,
    };
    // SAFETY: setpriority and gettid take no pointers.
    let done =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, value) };
    if done != 0 {
        tracing::debug!(
            "cannot set the stream mover's nice value to {value}: {}",
            std::io::Error::last_os_error()
        );
    }
}
