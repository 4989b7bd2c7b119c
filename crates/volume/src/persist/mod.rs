//! Resumable migration state on disk, and the order in which it is written.
//!
//! A migration's state directory holds:
//!
//! - `migration.json`: what is migrated where (written once);
//! - `checkpoint`: a snapshot of every chunk's state plus the phase, copy
//!   position and counters, replaced atomically (temp file, fsync, rename);
//! - `journal.N`: state changes made by client writes since checkpoint N,
//!   appended *before* the data write they describe.
//!
//! The rules that make a kill -9 at any instant safe (DESIGN.md's crash
//! contract):
//!
//! 1. A change caused by a client write is appended to the journal before
//!    the write is sent to a store. The journal lives in the page cache, so
//!    it survives the death of the process; a client flush (or a FUA write
//!    that changed a state) fsyncs it after the stores are flushed.
//! 2. A change caused by the copier (a chunk copied) is never journaled: it
//!    becomes durable with the next checkpoint, which snapshots the states
//!    first, then flushes both stores, then writes the snapshot. A chunk
//!    copied but not yet checkpointed is simply copied again after a crash.
//! 3. Replaying a journal over a checkpoint can only make the state more
//!    conservative (a chunk dirtied again, a chunk marked destination-only
//!    whose destination copy exists), never claim a copy that is not there.
//! 4. A new journal's name is made durable (its directory synced) before
//!    anything is recorded in it: a synced record in a file whose name a
//!    power cut takes away is lost.
//!
//! The files are written through [`StateFiles`] (`files.rs`), on disk or,
//! in crash tests, in memory that loses power (`crash.rs`).

mod crash;
mod files;

pub use crash::CrashFiles;
pub use files::{DiskFiles, StateFile, StateFiles};

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use crate::chunks::ChunkState;
use crate::error::{ErrorKind, MigrationError, Operation};
use crate::strategy::{Mode, Strategy};

const CHECKPOINT_MAGIC: &[u8; 8] = b"DMMCKPT1";
const CHECKPOINT: &str = "checkpoint";
const META: &str = "migration.json";

/// What a migration moves, recorded when it is created and checked when it
/// is resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub source: String,
    pub destination: String,
    pub volume_size: u64,
    pub chunk_size: u64,
    pub strategy: Strategy,
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Copying under the strategy's routing mode.
    Copying,
    /// The destination holds the volume; the source is kept for rollback.
    SwitchedOver,
    /// Verification passed.
    Verified,
    /// The source is released; the destination is the volume.
    Committed,
    /// Copying destination-only chunks back to the source.
    RollingBack,
    /// The source holds the volume again.
    RolledBack,
}

impl Phase {
    fn code(self) -> u64 {
        match self {
            Phase::Copying => 0,
            Phase::SwitchedOver => 1,
            Phase::Verified => 2,
            Phase::Committed => 3,
            Phase::RollingBack => 4,
            Phase::RolledBack => 5,
        }
    }

    fn from_code(code: u64) -> Option<Phase> {
        Some(match code {
            0 => Phase::Copying,
            1 => Phase::SwitchedOver,
            2 => Phase::Verified,
            3 => Phase::Committed,
            4 => Phase::RollingBack,
            5 => Phase::RolledBack,
            _ => return None,
        })
    }
}

/// Everything but the chunk states, saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Journal generation that continues this checkpoint.
    pub generation: u64,
    pub phase: Phase,
    /// The routing mode the copy phase was in.
    pub mode: Mode,
    /// Copy pass number (precopy makes several).
    pub pass: u32,
    /// The copier's position within the pass, in chunks.
    pub cursor: u64,
    /// Bytes the copier has written to the destination, over all runs.
    pub copied_bytes: u64,
    /// Offsets of chunks whose verification failed.
    pub mismatches: Vec<u64>,
    /// The boot of the machine that wrote the checkpoint
    /// (`/proc/sys/kernel/random/boot_id`): a different one on resume
    /// means the machine went down, page cache and all.
    #[serde(default)]
    pub boot: Option<String>,
    /// The stores must be compared before the migration goes on (a crash
    /// may have left them apart); cleared once they were.
    #[serde(default)]
    pub reconcile: bool,
}

/// A checkpoint: the position and the chunk states.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub position: Position,
    pub both: RoaringBitmap,
    pub destination: RoaringBitmap,
}

/// One journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Chunk { chunk: u64, state: ChunkState },
    Phase(Phase),
}

const KIND_CHUNK: u64 = 1;
const KIND_PHASE: u64 = 2;

impl Record {
    fn encode(self) -> u64 {
        match self {
            Record::Chunk { chunk, state } => (KIND_CHUNK << 60) | (chunk << 2) | state as u64,
            Record::Phase(phase) => (KIND_PHASE << 60) | phase.code(),
        }
    }

    fn decode(word: u64) -> Option<Record> {
        let body = word & ((1 << 60) - 1);
        match word >> 60 {
            KIND_CHUNK => Some(Record::Chunk {
                chunk: body >> 2,
                state: ChunkState::from_u8((body & 3) as u8)?,
            }),
            KIND_PHASE => Phase::from_code(body).map(Record::Phase),
            _ => None,
        }
    }
}

/// A migration's state directory.
pub struct StateDir {
    files: Arc<dyn StateFiles>,
}

fn state_error(operation: Operation, path: &Path) -> MigrationError {
    MigrationError::new(ErrorKind::State, operation).on(path.display().to_string())
}

impl StateDir {
    /// Opens (creating) the directory on disk and takes its lock.
    pub fn open(path: &Path) -> Result<StateDir, MigrationError> {
        match DiskFiles::open(path) {
            Ok(files) => Ok(StateDir::on(Arc::new(files))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(state_error(Operation::OpenState, path)
                    .with_detail("in use by another dmm process")
                    .with_source(e))
            }
            Err(e) => Err(state_error(Operation::OpenState, path).with_source(e)),
        }
    }

    /// The state in `files`.
    pub fn on(files: Arc<dyn StateFiles>) -> StateDir {
        StateDir { files }
    }

    /// Where the files are.
    pub fn location(&self) -> &Path {
        self.files.location()
    }

    /// Turns an I/O failure on file `name` into a state error.
    fn failed(&self, operation: Operation, name: &str) -> impl FnOnce(io::Error) -> MigrationError {
        let path = self.files.location().join(name);
        move |err| state_error(operation, &path).with_source(err)
    }

    /// Reads a whole file; `None` if it does not exist.
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, MigrationError> {
        self.files
            .read(name)
            .map_err(self.failed(Operation::ReadState, name))
    }

    pub fn load_meta(&self) -> Result<Option<Meta>, MigrationError> {
        let Some(bytes) = self.read(META)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| self.failed(Operation::ReadState, META)(io::Error::other(e)))
    }

    pub fn save_meta(&self, meta: &Meta) -> Result<(), MigrationError> {
        let bytes = serde_json::to_vec_pretty(meta)
            .map_err(|e| self.failed(Operation::WriteState, META)(io::Error::other(e)))?;
        self.replace(META, &bytes)
    }

    /// Writes `name` atomically: temp file, sync, rename, sync directory.
    fn replace(&self, name: &str, bytes: &[u8]) -> Result<(), MigrationError> {
        let temp = format!("{name}.tmp");
        let write = || {
            let file = self.files.create(&temp)?;
            file.append(bytes)?;
            file.sync()
        };
        write().map_err(self.failed(Operation::WriteState, &temp))?;
        self.files
            .rename(&temp, name)
            .map_err(self.failed(Operation::WriteState, name))?;
        self.sync_directory()
    }

    fn sync_directory(&self) -> Result<(), MigrationError> {
        self.files
            .sync_directory()
            .map_err(self.failed(Operation::WriteState, "."))
    }

    pub fn load_checkpoint(&self) -> Result<Option<Checkpoint>, MigrationError> {
        let Some(bytes) = self.read(CHECKPOINT)? else {
            return Ok(None);
        };
        decode_checkpoint(&bytes).map(Some).ok_or_else(|| {
            state_error(
                Operation::ReadState,
                &self.files.location().join(CHECKPOINT),
            )
            .with_detail("corrupt")
        })
    }

    pub fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), MigrationError> {
        let bytes = encode_checkpoint(checkpoint)
            .map_err(self.failed(Operation::WriteState, CHECKPOINT))?;
        self.replace(CHECKPOINT, &bytes)
    }

    fn journal_name(generation: u64) -> String {
        format!("journal.{generation}")
    }

    /// Opens journal `generation` for appending, its name durable.
    pub fn journal(&self, generation: u64) -> Result<Journal, MigrationError> {
        let name = Self::journal_name(generation);
        let file = self
            .files
            .open_append(&name)
            .map_err(self.failed(Operation::OpenState, &name))?;
        self.sync_directory()?;
        let path = self.files.location().join(&name);
        Ok(Journal {
            file,
            generation,
            path,
        })
    }

    /// Every record of journals `generation` and later, in order.
    pub fn replay(&self, generation: u64) -> Result<Vec<Record>, MigrationError> {
        let mut records = Vec::new();
        for generation in generation.. {
            let Some(bytes) = self.read(&Self::journal_name(generation))? else {
                break;
            };
            // A torn last record (shorter than a word) is ignored; so is
            // anything after a word that does not decode.
            let words = bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()));
            records.extend(words.map_while(Record::decode));
        }
        Ok(records)
    }

    /// Removes journals older than `generation`.
    pub fn prune_journals(&self, generation: u64) -> Result<(), MigrationError> {
        let names = self
            .files
            .names()
            .map_err(self.failed(Operation::WriteState, "."))?;
        for name in names {
            let old = name
                .strip_prefix("journal.")
                .and_then(|g| g.parse::<u64>().ok())
                .is_some_and(|g| g < generation);
            if old {
                self.files
                    .remove(&name)
                    .map_err(self.failed(Operation::WriteState, &name))?;
            }
        }
        Ok(())
    }
}

/// The append-only journal of one checkpoint generation.
pub struct Journal {
    file: Arc<dyn StateFile>,
    generation: u64,
    path: PathBuf,
}

impl Journal {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Where the journal is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record (one `write`, no sync).
    pub fn append(&mut self, record: Record) -> io::Result<()> {
        self.file.append(&record.encode().to_le_bytes())
    }

    /// The file, to sync without holding the journal.
    pub fn handle(&self) -> Arc<dyn StateFile> {
        self.file.clone()
    }
}

fn encode_checkpoint(checkpoint: &Checkpoint) -> io::Result<Vec<u8>> {
    let mut out = CHECKPOINT_MAGIC.to_vec();
    let header = serde_json::to_vec(&checkpoint.position).map_err(io::Error::other)?;
    for part in [
        &header[..],
        &serialize(&checkpoint.both)?,
        &serialize(&checkpoint.destination)?,
    ] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    Ok(out)
}

fn serialize(bitmap: &RoaringBitmap) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    bitmap.serialize_into(&mut bytes)?;
    Ok(bytes)
}

fn decode_checkpoint(bytes: &[u8]) -> Option<Checkpoint> {
    let (body, hash) = bytes.split_at(bytes.len().checked_sub(32)?);
    if blake3::hash(body).as_bytes() != hash || !body.starts_with(CHECKPOINT_MAGIC) {
        return None;
    }
    let mut rest = &body[CHECKPOINT_MAGIC.len()..];
    let mut parts = Vec::new();
    for _ in 0..3 {
        let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
        parts.push(rest.get(8..8 + len)?);
        rest = &rest[8 + len..];
    }
    Some(Checkpoint {
        position: serde_json::from_slice(parts[0]).ok()?,
        both: RoaringBitmap::deserialize_from(parts[1]).ok()?,
        destination: RoaringBitmap::deserialize_from(parts[2]).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> Position {
        Position {
            generation: 3,
            phase: Phase::Copying,
            mode: Mode::LowRedundancy,
            pass: 1,
            cursor: 42,
            copied_bytes: 1 << 30,
            mismatches: vec![],
            boot: Some("b7c1".into()),
            reconcile: true,
        }
    }

    #[test]
    fn checkpoint_round_trips_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load_checkpoint().unwrap().is_none());
        let checkpoint = Checkpoint {
            position: position(),
            both: (0..1000).collect(),
            destination: [5000, 7000].into_iter().collect(),
        };
        state.save_checkpoint(&checkpoint).unwrap();
        assert_eq!(state.load_checkpoint().unwrap(), Some(checkpoint));
        let path = dir.path().join(CHECKPOINT);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(state.load_checkpoint().is_err());
    }

    #[test]
    fn journal_replays_in_order_across_generations_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut first = state.journal(1).unwrap();
        first
            .append(Record::Chunk {
                chunk: 7,
                state: ChunkState::Source,
            })
            .unwrap();
        first.append(Record::Phase(Phase::SwitchedOver)).unwrap();
        let mut second = state.journal(2).unwrap();
        second
            .append(Record::Chunk {
                chunk: 1 << 40,
                state: ChunkState::Destination,
            })
            .unwrap();
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("journal.2"))
            .unwrap()
            .write_all(&[1, 2, 3])
            .unwrap();
        let records = state.replay(1).unwrap();
        assert_eq!(
            records,
            vec![
                Record::Chunk {
                    chunk: 7,
                    state: ChunkState::Source
                },
                Record::Phase(Phase::SwitchedOver),
                Record::Chunk {
                    chunk: 1 << 40,
                    state: ChunkState::Destination
                },
            ]
        );
        assert_eq!(state.replay(2).unwrap().len(), 1);
        state.prune_journals(2).unwrap();
        assert!(!dir.path().join("journal.1").exists());
        assert!(dir.path().join("journal.2").exists());
    }

    #[test]
    fn a_second_process_cannot_take_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateDir::open(dir.path()).unwrap();
        let err = StateDir::open(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
