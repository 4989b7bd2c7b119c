//! Migration strategies, and the routing rules they give the virtual device.
//!
//! A strategy (what the user picks) runs as a sequence of routing modes
//! (what the device does with each client request): precopy tracks dirty
//! chunks, slr tracks them during its pass and mirrors during its final
//! copy, auto tracks and escalates to mirroring, and every strategy ends in
//! `Destination` after the switchover. The per-chunk rules are in
//! [`Mode::read_from`] and [`Mode::plan_write`]; DESIGN.md has the table.

use dmm_control::ValueError;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::chunks::ChunkState;

/// What the user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Dirty block tracking: passes over the dirty set, then a short pause.
    Precopy,
    /// Synchronous I/O mirroring behind the copy offset.
    Mirror,
    /// Asynchronous mirroring: the destination write is queued.
    Aio,
    /// Source-based low redundancy: one pass, one final copy of dirty chunks.
    Slr,
    /// Low redundancy: copied chunks live on the destination only.
    Lr,
    /// Post-copy: the destination owns the volume from the start.
    Redirect,
    /// Precopy, escalating to mirroring when the dirty set stops shrinking.
    Auto,
}

impl Strategy {
    pub const ALL: [Strategy; 7] = [
        Strategy::Precopy,
        Strategy::Mirror,
        Strategy::Aio,
        Strategy::Slr,
        Strategy::Lr,
        Strategy::Redirect,
        Strategy::Auto,
    ];

    /// The routing mode the copy phase starts in.
    pub fn initial_mode(self) -> Mode {
        match self {
            Strategy::Precopy | Strategy::Slr | Strategy::Auto => Mode::TrackDirty,
            Strategy::Mirror => Mode::Mirror,
            Strategy::Aio => Mode::AsyncMirror,
            Strategy::Lr => Mode::LowRedundancy,
            Strategy::Redirect => Mode::Redirect,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Precopy => "precopy",
            Strategy::Mirror => "mirror",
            Strategy::Aio => "aio",
            Strategy::Slr => "slr",
            Strategy::Lr => "lr",
            Strategy::Redirect => "redirect",
            Strategy::Auto => "auto",
        })
    }
}

impl FromStr for Strategy {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Strategy, ValueError> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.to_string().eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                let names: Vec<String> = Strategy::ALL.iter().map(|s| s.to_string()).collect();
                ValueError::new(
                    "a strategy",
                    text,
                    format!("choose one of {}", names.join(", ")),
                )
            })
    }
}

/// How the virtual device routes client requests at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Source is primary; a write to a copied chunk makes it dirty.
    TrackDirty,
    /// Source is primary; writes to copied chunks go to both stores.
    Mirror,
    /// Source is primary; writes to copied chunks dirty them and queue the
    /// same write for the destination.
    AsyncMirror,
    /// Copied chunks live on the destination only; the rest on the source.
    LowRedundancy,
    /// The destination is primary; an uncopied chunk is filled from the
    /// source before its first partial write.
    Redirect,
    /// After the switchover: the destination holds the volume. With
    /// `tracking`, writes mark chunks destination-only so that a rollback
    /// knows what to copy back.
    Destination { tracking: bool },
    /// Source is primary again; destination-only chunks are copied back.
    RollingBack,
    /// The source holds the volume (rolled back).
    Source,
}

impl Mode {
    /// Whether the source holds every acknowledged write in this mode.
    pub fn source_is_complete(self) -> bool {
        matches!(
            self,
            Mode::TrackDirty | Mode::Mirror | Mode::AsyncMirror | Mode::Source
        )
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::TrackDirty => "dirty-tracking",
            Mode::Mirror => "mirroring",
            Mode::AsyncMirror => "async-mirroring",
            Mode::LowRedundancy => "low-redundancy",
            Mode::Redirect => "redirect",
            Mode::Destination { tracking: true } => "destination (source kept)",
            Mode::Destination { tracking: false } => "destination",
            Mode::RollingBack => "rolling-back",
            Mode::Source => "source",
        })
    }
}

/// Which store to fill a chunk from before a partial write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    FromSource,
    FromDestination,
}

/// What a client write does to one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    pub to_source: bool,
    pub to_destination: bool,
    /// A state change to record before the data is written.
    pub transition: Option<(ChunkState, ChunkState)>,
    /// The chunk must be made whole on the written side first.
    pub fill: Option<Fill>,
}

/// The kind of change a client makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Data or zeroes: must land wherever the chunk is current.
    Write,
    /// A discard hint: never mirrored, the chunk is dirtied instead.
    Discard,
}

const fn plan(to_source: bool, to_destination: bool) -> Plan {
    Plan {
        to_source,
        to_destination,
        transition: None,
        fill: None,
    }
}

impl Plan {
    /// The plan of a change while the state cannot be recorded (the ledger
    /// is frozen): no chunk changes state, so a write goes to every store
    /// that holds its chunk. A discard, only a hint, is dropped: applied
    /// to one store of a chunk both hold, it would make them differ.
    pub fn frozen(state: ChunkState, change: Change) -> Plan {
        match change {
            Change::Discard => plan(false, false),
            Change::Write => plan(
                state != ChunkState::Destination,
                state != ChunkState::Source,
            ),
        }
    }

    fn moving(mut self, from: ChunkState, to: ChunkState) -> Plan {
        self.transition = Some((from, to));
        self
    }

    fn filled(mut self, fill: Fill, whole_chunk: bool) -> Plan {
        if !whole_chunk {
            self.fill = Some(fill);
        }
        self
    }
}

use ChunkState::{Both, Destination, Source};

impl Mode {
    /// Whether reads of chunks held by both stores go to the destination.
    fn prefers_destination(self) -> bool {
        matches!(
            self,
            Mode::LowRedundancy | Mode::Redirect | Mode::Destination { .. }
        )
    }

    /// Where to read a chunk in `state`: true for the destination.
    pub fn read_from_destination(self, state: ChunkState) -> bool {
        match state {
            Source => false,
            Destination => true,
            Both => self.prefers_destination(),
        }
    }

    /// What a change to (part of) a chunk in `state` does.
    pub fn plan_write(self, state: ChunkState, whole_chunk: bool, change: Change) -> Plan {
        let dirty = plan(true, false).moving(Both, Source);
        match (self, state) {
            (Mode::Source, _) => plan(true, false),
            (_, Destination) if self == Mode::RollingBack => plan(true, false)
                .moving(Destination, Source)
                .filled(Fill::FromDestination, whole_chunk),
            (_, Destination) => plan(false, true),
            // Asynchronous mirroring also queues the write for the
            // destination; the device's aio queue does that part.
            (Mode::RollingBack | Mode::TrackDirty | Mode::AsyncMirror, Both) => dirty,
            (Mode::Mirror, Both) if change == Change::Write => plan(true, true),
            (Mode::Mirror, Both) => dirty,
            (Mode::LowRedundancy | Mode::Redirect, Both) => {
                plan(false, true).moving(Both, Destination)
            }
            (Mode::Destination { tracking: true }, Both) => {
                plan(false, true).moving(Both, Destination)
            }
            (Mode::Destination { tracking: false }, Both) => plan(false, true),
            (Mode::Redirect | Mode::Destination { .. }, Source) => plan(false, true)
                .moving(Source, Destination)
                .filled(Fill::FromSource, whole_chunk),
            (_, Source) => plan(true, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_case_insensitively() {
        assert_eq!("LR".parse::<Strategy>(), Ok(Strategy::Lr));
        let err = "fast".parse::<Strategy>().unwrap_err().to_string();
        assert!(
            err.contains("precopy, mirror, aio, slr, lr, redirect, auto"),
            "{err}"
        );
    }

    #[test]
    fn routing_follows_the_strategy_table() {
        let write = |mode: Mode, state| mode.plan_write(state, false, Change::Write);
        // precopy: source only, copied chunks become dirty.
        assert_eq!(
            write(Mode::TrackDirty, Both),
            plan(true, false).moving(Both, Source)
        );
        assert!(!Mode::TrackDirty.read_from_destination(Both));
        // mirror: both stores behind the copy offset, source ahead of it.
        assert_eq!(write(Mode::Mirror, Both), plan(true, true));
        assert_eq!(write(Mode::Mirror, Source), plan(true, false));
        // aio: source and dirty (the device queues the destination write).
        assert_eq!(
            write(Mode::AsyncMirror, Both),
            plan(true, false).moving(Both, Source)
        );
        // lr: copied chunks live on the destination.
        assert_eq!(
            write(Mode::LowRedundancy, Both),
            plan(false, true).moving(Both, Destination)
        );
        assert_eq!(write(Mode::LowRedundancy, Source), plan(true, false));
        assert!(Mode::LowRedundancy.read_from_destination(Both));
        // redirect: everything to the destination, partial writes fill first.
        let redirect = write(Mode::Redirect, Source);
        assert_eq!(redirect.fill, Some(Fill::FromSource));
        assert_eq!(redirect.transition, Some((Source, Destination)));
        let whole = Mode::Redirect.plan_write(Source, true, Change::Write);
        assert_eq!(whole.fill, None);
        // rollback copies destination-only chunks back before writing them.
        let back = write(Mode::RollingBack, Destination);
        assert_eq!(back.fill, Some(Fill::FromDestination));
        assert!(back.to_source && !back.to_destination);
        // discards are never mirrored.
        let discard = Mode::Mirror.plan_write(Both, false, Change::Discard);
        assert_eq!(discard, plan(true, false).moving(Both, Source));
    }
}
