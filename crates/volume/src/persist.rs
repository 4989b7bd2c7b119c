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

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

/// A migration's state directory, locked against a second dmm.
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

/// Turns an I/O failure on `path` into a state error of `operation`.
fn failed(operation: Operation, path: &Path) -> impl FnOnce(io::Error) -> MigrationError + '_ {
    move |err| state_error(operation, path).with_source(err)
}

fn state_error(operation: Operation, path: &Path) -> MigrationError {
    MigrationError::new(ErrorKind::State, operation).on(path.display().to_string())
}

/// Reads a whole file; `None` if it does not exist.
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, MigrationError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed(Operation::ReadState, path)(e)),
    }
}

impl StateDir {
    /// Opens (creating) the directory and takes its lock.
    pub fn open(path: &Path) -> Result<StateDir, MigrationError> {
        std::fs::create_dir_all(path).map_err(failed(Operation::OpenState, path))?;
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(failed(Operation::OpenState, &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |errno| {
                state_error(Operation::OpenState, path)
                    .with_detail("in use by another dmm process")
                    .with_source(io::Error::from(errno))
            },
        )?;
        Ok(StateDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn load_meta(&self) -> Result<Option<Meta>, MigrationError> {
        let path = self.path.join(META);
        let Some(bytes) = read_if_present(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| state_error(Operation::ReadState, &path).with_source(e))
    }

    pub fn save_meta(&self, meta: &Meta) -> Result<(), MigrationError> {
        let bytes = serde_json::to_vec_pretty(meta).map_err(|e| {
            state_error(Operation::WriteState, &self.path.join(META)).with_source(e)
        })?;
        self.replace(META, &bytes)
    }

    /// Writes `name` atomically: temp file, fsync, rename, fsync directory.
    fn replace(&self, name: &str, bytes: &[u8]) -> Result<(), MigrationError> {
        let temp = self.path.join(format!("{name}.tmp"));
        let target = self.path.join(name);
        let write = || {
            let mut file = File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        write().map_err(failed(Operation::WriteState, &temp))?;
        std::fs::rename(&temp, &target).map_err(failed(Operation::WriteState, &target))?;
        File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(failed(Operation::WriteState, &self.path))
    }

    pub fn load_checkpoint(&self) -> Result<Option<Checkpoint>, MigrationError> {
        let path = self.path.join(CHECKPOINT);
        let Some(bytes) = read_if_present(&path)? else {
            return Ok(None);
        };
        decode_checkpoint(&bytes)
            .map(Some)
            .ok_or_else(|| state_error(Operation::ReadState, &path).with_detail("corrupt"))
    }

    pub fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), MigrationError> {
        let bytes = encode_checkpoint(checkpoint)
            .map_err(failed(Operation::WriteState, &self.path.join(CHECKPOINT)))?;
        self.replace(CHECKPOINT, &bytes)
    }

    fn journal_path(&self, generation: u64) -> PathBuf {
        self.path.join(format!("journal.{generation}"))
    }

    /// Opens journal `generation` for appending.
    pub fn journal(&self, generation: u64) -> Result<Journal, MigrationError> {
        let path = self.journal_path(generation);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(failed(Operation::OpenState, &path))?;
        Ok(Journal {
            file: std::sync::Arc::new(file),
            generation,
        })
    }

    /// Every record of journals `generation` and later, in order.
    pub fn replay(&self, generation: u64) -> Result<Vec<Record>, MigrationError> {
        let mut records = Vec::new();
        for generation in generation.. {
            let path = self.journal_path(generation);
            let Some(bytes) = read_if_present(&path)? else {
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
        let entries =
            std::fs::read_dir(&self.path).map_err(failed(Operation::WriteState, &self.path))?;
        for entry in entries {
            let name = entry
                .map_err(failed(Operation::WriteState, &self.path))?
                .file_name();
            let old = name
                .to_str()
                .and_then(|n| n.strip_prefix("journal."))
                .and_then(|g| g.parse::<u64>().ok())
                .is_some_and(|g| g < generation);
            if old {
                let path = self.path.join(name);
                std::fs::remove_file(&path).map_err(failed(Operation::WriteState, &path))?;
            }
        }
        Ok(())
    }
}

/// The append-only journal of one checkpoint generation.
pub struct Journal {
    file: std::sync::Arc<File>,
    generation: u64,
}

impl Journal {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Appends a record (one `write`, no fsync).
    pub fn append(&mut self, record: Record) -> io::Result<()> {
        (&*self.file).write_all(&record.encode().to_le_bytes())
    }

    /// The file, to fsync without holding the journal.
    pub fn handle(&self) -> std::sync::Arc<File> {
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
