//! A stream's extent map: which extent holds each offset, on which tier,
//! and how a move changes it, phase by phase (the phases and their order
//! are one table, [`NEXT`]).
//!
//! A stream with no move under way is one extent, its tail. A move to
//! another tier, as `DESIGN.md` describes it, with one new file, the
//! target: its head (the receiving extent) receives the drained bytes, its
//! tail the appends from the switch on.
//!
//! | phase | extents, in stream order |
//! |---|---|
//! | (none) | source `[start, len)`, the tail |
//! | `Prepared` | the same; the target file exists, empty |
//! | `Switched` | source `[start, s)`; target's tail `[s, len)`, the tail |
//! | `Drained` | target's head `[start, s)`; target's tail `[s, len)`, the tail |
//! | `Linked` | target `[start, len)`, the tail (its head and tail one extent) |

/// One extent: a file of one tier holding `[start, end)` of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The file's number, unique within the stream.
    pub file: u64,
    /// The tier's index in the orbit.
    pub tier: usize,
    pub start: u64,
    pub end: u64,
    /// The stream offset of the file's first byte (a target's tail starts
    /// after its head).
    pub base: u64,
}

/// How far a move went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prepared,
    Switched,
    Drained,
    Linked,
}

/// Each phase and the one that follows it.
pub const NEXT: [(Phase, Phase); 3] = [
    (Phase::Prepared, Phase::Switched),
    (Phase::Switched, Phase::Drained),
    (Phase::Drained, Phase::Linked),
];

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepared => "prepared",
            Phase::Switched => "switched",
            Phase::Drained => "drained",
            Phase::Linked => "linked",
        }
    }

    /// The phase `text` names (as [`Phase::as_str`] writes it).
    pub fn parse(text: &str) -> Option<Phase> {
        [
            Phase::Prepared,
            Phase::Switched,
            Phase::Drained,
            Phase::Linked,
        ]
        .into_iter()
        .find(|phase| phase.as_str() == text)
    }

    /// The phase after this one, if any.
    pub fn next(self) -> Option<Phase> {
        NEXT.iter()
            .find(|(from, _)| *from == self)
            .map(|(_, to)| *to)
    }
}

/// A move under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub phase: Phase,
    /// The tier it moves to.
    pub tier: usize,
    /// The target's file.
    pub target: u64,
    /// The switch offset, once switched.
    pub switched_at: Option<u64>,
}

/// A step asked for in the wrong phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {step}: {state}")]
pub struct PhaseError {
    step: &'static str,
    state: String,
}

/// A stream's extents and its move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    extents: Vec<Extent>,
    moving: Option<Move>,
    next_file: u64,
}

impl ExtentMap {
    /// A new, empty stream on `tier`.
    pub fn new(tier: usize) -> ExtentMap {
        ExtentMap {
            extents: vec![Extent {
                file: 0,
                tier,
                start: 0,
                end: 0,
                base: 0,
            }],
            moving: None,
            next_file: 1,
        }
    }

    /// A map as the journal recorded it (the extents' ends set from their
    /// files by the caller through [`ExtentMap::set_end`]).
    pub fn restore(extents: Vec<Extent>, moving: Option<Move>, next_file: u64) -> ExtentMap {
        assert!(!extents.is_empty(), "a stream has an extent");
        ExtentMap {
            extents,
            moving,
            next_file,
        }
    }

    /// The number the next file of the stream gets.
    pub fn next_file(&self) -> u64 {
        self.next_file
    }

    /// Sets the end of the extent at `index` (when a restart learns it
    /// from the extent's file).
    pub fn set_end(&mut self, index: usize, end: u64) {
        self.extents[index].end = end;
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    pub fn moving(&self) -> Option<&Move> {
        self.moving.as_ref()
    }

    /// The stream's length.
    pub fn len(&self) -> u64 {
        self.tail().end
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The extent appends go to.
    pub fn tail(&self) -> &Extent {
        self.extents.last().expect("a stream has an extent")
    }

    /// `bytes` were appended to the tail.
    pub fn appended(&mut self, bytes: u64) {
        self.extents.last_mut().expect("a stream has an extent").end += bytes;
    }

    /// The extent holding `offset`, if it is below the stream's length.
    pub fn locate(&self, offset: u64) -> Option<&Extent> {
        let at = self.extents.partition_point(|e| e.end <= offset);
        self.extents.get(at).filter(|e| e.start <= offset)
    }

    /// Starts a move of the tail to `tier`: numbers its target file
    /// (which the caller creates and syncs).
    pub fn prepare(&mut self, tier: usize) -> Result<Move, PhaseError> {
        if let Some(moving) = &self.moving {
            return Err(self.refuse("prepare a move", moving));
        }
        let moving = Move {
            phase: Phase::Prepared,
            tier,
            target: self.next_file,
            switched_at: None,
        };
        self.next_file += 1;
        self.moving = Some(moving);
        Ok(moving)
    }

    /// The switch: the tail is the target extent from the stream's length
    /// on; returns that switch offset.
    pub fn switch(&mut self) -> Result<u64, PhaseError> {
        let moving = self.step("switch", Phase::Prepared)?;
        let at = self.len();
        let base = self.tail().start;
        self.extents.push(Extent {
            file: moving.target,
            tier: moving.tier,
            start: at,
            end: at,
            base,
        });
        self.advance(Some(at));
        Ok(at)
    }

    /// The source extent was drained into the target's head: reads below
    /// the switch offset come from there.
    pub fn drained(&mut self) -> Result<(), PhaseError> {
        let moving = self.step("record the drain", Phase::Switched)?;
        let source = self.extents.len() - 2;
        self.extents[source] = Extent {
            file: moving.target,
            tier: moving.tier,
            ..self.extents[source]
        };
        self.advance(None);
        Ok(())
    }

    /// The target's head and tail are one extent again, and the move is
    /// over.
    pub fn linked(&mut self) -> Result<(), PhaseError> {
        self.step("link", Phase::Drained)?;
        let tail = self.extents.pop().expect("the target's tail");
        self.extents.last_mut().expect("the target's head").end = tail.end;
        self.moving = None;
        Ok(())
    }

    /// The move, if it is in `phase`.
    fn step(&self, step: &'static str, phase: Phase) -> Result<Move, PhaseError> {
        match self.moving {
            Some(moving) if moving.phase == phase => Ok(moving),
            Some(moving) => Err(self.refuse(step, &moving)),
            None => Err(PhaseError {
                step,
                state: "no move is under way".to_owned(),
            }),
        }
    }

    /// Moves to the next phase (the switch offset set when given).
    fn advance(&mut self, switched_at: Option<u64>) {
        let moving = self.moving.as_mut().expect("a move");
        moving.phase = moving.phase.next().expect("a phase before linked");
        if switched_at.is_some() {
            moving.switched_at = switched_at;
        }
    }

    fn refuse(&self, step: &'static str, moving: &Move) -> PhaseError {
        PhaseError {
            step,
            state: format!(
                "the move to tier {} is {}",
                moving.tier,
                moving.phase.as_str()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which (file, tier) serves each of `offsets`.
    fn served(map: &ExtentMap, offsets: &[u64]) -> Vec<Option<(u64, usize)>> {
        offsets
            .iter()
            .map(|&o| map.locate(o).map(|e| (e.file, e.tier)))
            .collect()
    }

    #[test]
    fn every_offset_is_served_by_the_right_extent_in_every_phase() {
        let mut map = ExtentMap::new(0);
        assert_eq!(map.locate(0), None, "an empty stream holds no offset");
        map.appended(100);
        let moving = map.prepare(1).unwrap();
        assert_eq!(moving.target, 1);
        assert_eq!(
            served(&map, &[0, 99, 100]),
            [Some((0, 0)), Some((0, 0)), None]
        );
        assert_eq!(map.switch().unwrap(), 100);
        map.appended(50);
        assert_eq!(
            served(&map, &[99, 100, 149, 150]),
            [Some((0, 0)), Some((1, 1)), Some((1, 1)), None]
        );
        assert_eq!(
            map.tail().base,
            0,
            "the target's first byte is the stream's"
        );
        map.drained().unwrap();
        map.appended(10);
        assert_eq!(
            served(&map, &[0, 99, 100, 159]),
            [Some((1, 1)), Some((1, 1)), Some((1, 1)), Some((1, 1))]
        );
        map.linked().unwrap();
        assert_eq!(
            map.extents(),
            [Extent {
                file: 1,
                tier: 1,
                start: 0,
                end: 160,
                base: 0,
            }]
        );
        assert_eq!(map.moving(), None);
        map.appended(5);
        assert_eq!((map.len(), map.tail().file), (165, 1));
    }

    #[test]
    fn each_step_only_in_its_phase() {
        let mut map = ExtentMap::new(0);
        assert!(
            map.switch()
                .unwrap_err()
                .to_string()
                .contains("no move is under way")
        );
        map.prepare(1).unwrap();
        let refused = map.prepare(2).unwrap_err().to_string();
        assert!(
            refused.contains("the move to tier 1 is prepared"),
            "{refused}"
        );
        assert!(map.drained().is_err());
        assert!(map.linked().is_err());
        map.switch().unwrap();
        assert!(map.switch().is_err());
        map.drained().unwrap();
        map.linked().unwrap();
        assert_eq!(Phase::Linked.next(), None);
        assert_eq!(Phase::Prepared.next(), Some(Phase::Switched));
    }
}
