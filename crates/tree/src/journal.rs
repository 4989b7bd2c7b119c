//! The journal of one tree migration: which source entries exist in the
//! target, under which names, what of each is still missing, the namespace
//! changes under way, and the per-entry errors. One SQLite file per
//! migration (WAL mode) next to the migration's other state, written in
//! batches by the namespace through [`Journal::apply`]; `DESIGN.md` gives
//! its tables and the ordering rules that make it crash-safe.
//!
//! The file is opened, versioned and locked by `dmm-catalog`'s
//! [`Database`], like the catalog: this module owns only its tables and
//! rows.

use std::io;
use std::path::Path;

use dmm_catalog::{Database, Layout};
use rusqlite::{Connection, params};

use crate::error::{Error, ErrorKind, Result};

/// An entry's identifier; the root of the tree is [`ROOT`].
pub type EntryId = i64;

/// The root directory of the tree.
pub const ROOT: EntryId = 1;

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// A directory whose children are not in the target yet.
    Unpopulated,
    /// A directory whose children all have placeholders.
    Populated,
    /// A regular file with data still to copy.
    Pending,
    /// A regular file with all its data and final metadata.
    Done,
}

impl EntryState {
    fn as_str(self) -> &'static str {
        match self {
            EntryState::Unpopulated => "unpopulated",
            EntryState::Populated => "populated",
            EntryState::Pending => "pending",
            EntryState::Done => "done",
        }
    }

    fn parse(text: &str) -> rusqlite::Result<EntryState> {
        Ok(match text {
            "unpopulated" => EntryState::Unpopulated,
            "populated" => EntryState::Populated,
            "pending" => EntryState::Pending,
            "done" => EntryState::Done,
            other => {
                return Err(rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("unknown entry state {other:?}").into(),
                ));
            }
        })
    }
}

/// One tracked entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRow {
    pub id: EntryId,
    pub state: EntryState,
    /// Path relative to the source root (bytes); `None` for a directory
    /// created through the access point.
    pub source: Option<Vec<u8>>,
    pub size: u64,
    pub source_ino: u64,
    pub target_ino: u64,
    /// The source file's ctime when dmm read its size, in nanoseconds
    /// since the epoch (0: not known, as in a journal of version 1).
    pub source_ctime: i64,
    /// Changed through the access point (verification skips it, its times
    /// are the client's).
    pub changed: bool,
    /// A directory that already existed in the target and was merged.
    pub merged: bool,
    /// Serialized bitmap of the segments already copied.
    pub segments: Option<Vec<u8>>,
}

/// A name of a tracked entry in the target: `name` inside `parent`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameRow {
    pub parent: EntryId,
    pub name: Vec<u8>,
    pub entry: EntryId,
}

/// An entry the migrator could not copy, with the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRow {
    pub entry: EntryId,
    pub path: Vec<u8>,
    pub message: String,
    pub attempts: u32,
    /// Milliseconds since the epoch of the last attempt.
    pub at: i64,
}

/// One change to the journal; [`Journal::apply`] writes a batch of
/// them in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Insert(EntryRow),
    State(EntryId, EntryState),
    Segments(EntryId, Vec<u8>),
    Changed(EntryId),
    Delete(EntryId),
    AddName(NameRow),
    RemoveName {
        parent: EntryId,
        name: Vec<u8>,
    },
    /// A namespace change or population under way (the body is the
    /// engine's, opaque here).
    BeginIntent {
        id: i64,
        body: String,
    },
    FinishIntent(i64),
    RecordError(ErrorRow),
    ClearError(EntryId),
}

/// Everything in the journal, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<EntryRow>,
    pub names: Vec<NameRow>,
    pub intents: Vec<(i64, String)>,
    pub errors: Vec<ErrorRow>,
}

/// Counts that prove (or disprove) completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outstanding {
    pub unpopulated: u64,
    pub pending: u64,
    pub intents: u64,
    pub errors: u64,
}

impl Outstanding {
    pub fn is_complete(&self) -> bool {
        *self == Outstanding::default()
    }
}

/// The journal file: WAL with `synchronous = NORMAL`, so a commit survives
/// a crash of dmm (the WAL is in the page cache) without an fsync per
/// batch; [`Journal::sync`] makes everything durable.
const JOURNAL: Layout = Layout {
    what: "the tree journal",
    pragmas: "PRAGMA journal_mode = WAL;
              PRAGMA synchronous = NORMAL;
              PRAGMA busy_timeout = 5000;",
    steps: &[
        "
    CREATE TABLE entries (
        id         INTEGER PRIMARY KEY,
        state      TEXT NOT NULL,
        source     BLOB,
        size       INTEGER NOT NULL,
        source_ino INTEGER NOT NULL,
        target_ino INTEGER NOT NULL,
        changed    INTEGER NOT NULL,
        merged     INTEGER NOT NULL,
        segments   BLOB
    );
    CREATE INDEX entries_by_state ON entries (state);
    CREATE TABLE names (
        parent INTEGER NOT NULL,
        name   BLOB NOT NULL,
        entry  INTEGER NOT NULL,
        PRIMARY KEY (parent, name)
    );
    CREATE INDEX names_by_entry ON names (entry);
    CREATE TABLE intents (
        id   INTEGER PRIMARY KEY,
        body TEXT NOT NULL
    );
    CREATE TABLE errors (
        entry    INTEGER PRIMARY KEY,
        path     BLOB NOT NULL,
        message  TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        at       INTEGER NOT NULL
    );",
        "
    ALTER TABLE entries ADD COLUMN source_ctime INTEGER NOT NULL DEFAULT 0;",
    ],
};

/// Whether a journal write must be on disk before the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a crash of dmm; the page cache reaches the disk later.
    Lazy,
    /// Survives a power cut.
    Durable,
}

/// The journal of one tree migration.
pub struct Journal {
    database: Database,
}

impl Journal {
    /// Opens (creating) the journal at `path`.
    pub fn open(path: &Path) -> Result<Journal> {
        let database = Database::open(path, &JOURNAL)
            .map_err(|err| Error::on(ErrorKind::Journal, "open", path).with_source(err))?;
        Ok(Journal { database })
    }

    /// Runs `work` with the connection; its SQL errors become journal
    /// errors saying what was being done (`operation`).
    fn with<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.database.with(work).map_err(|err| {
            let failed = Error::on(ErrorKind::Journal, operation, self.database.path());
            match system_errno(&err) {
                Some(errno) => failed.with_source(io::Error::from_raw_os_error(errno)),
                None => failed.with_source(err),
            }
        })
    }

    /// Writes `changes` in one transaction, in order; with
    /// [`Durability::Durable`], the journal is on disk on return (with no
    /// changes, everything committed before is made durable).
    pub fn apply(&self, changes: &[Change], durability: Durability) -> Result<()> {
        match (changes.is_empty(), durability) {
            (true, Durability::Lazy) => Ok(()),
            (true, Durability::Durable) => self.sync(),
            (false, Durability::Lazy) => self.with("write", |c| write(c, changes)),
            (false, Durability::Durable) => self.with("write", |c| {
                // The WAL is fsynced by each commit while this holds.
                c.execute_batch("PRAGMA synchronous = FULL")?;
                let written = write(c, changes);
                c.execute_batch("PRAGMA synchronous = NORMAL")?;
                written
            }),
        }
    }

    /// Makes every committed change durable (fsync of the WAL).
    pub fn sync(&self) -> Result<()> {
        self.with("checkpoint", |c| {
            c.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))
        })
    }

    /// The whole journal.
    pub fn load(&self) -> Result<Snapshot> {
        self.with("load", |c| load(c))
    }

    /// What keeps the migration from being complete, counted from the
    /// journal itself.
    pub fn outstanding(&self) -> Result<Outstanding> {
        self.with("read", |c| {
            let count = |sql: &str| -> rusqlite::Result<u64> {
                c.query_row(sql, [], |r| r.get::<_, i64>(0))
                    .map(|n| n as u64)
            };
            Ok(Outstanding {
                unpopulated: count("SELECT count(*) FROM entries WHERE state = 'unpopulated'")?,
                pending: count("SELECT count(*) FROM entries WHERE state = 'pending'")?,
                intents: count("SELECT count(*) FROM intents")?,
                errors: count("SELECT count(*) FROM errors")?,
            })
        })
    }
}

/// Writes `changes` in one transaction, in order.
fn write(c: &mut Connection, changes: &[Change]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    for change in changes {
        apply_one(&tx, change)?;
    }
    tx.commit()
}

fn apply_one(tx: &rusqlite::Transaction<'_>, change: &Change) -> rusqlite::Result<()> {
    match change {
        Change::Insert(row) => tx.execute(
            "INSERT OR REPLACE INTO entries
                 (id, state, source, size, source_ino, target_ino, changed, merged, segments,
                  source_ctime)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                row.id,
                row.state.as_str(),
                row.source,
                row.size as i64,
                row.source_ino as i64,
                row.target_ino as i64,
                row.changed,
                row.merged,
                row.segments,
                row.source_ctime,
            ],
        ),
        Change::State(id, state) => tx.execute(
            "UPDATE entries SET state = ?2 WHERE id = ?1",
            params![id, state.as_str()],
        ),
        Change::Segments(id, bits) => tx.execute(
            "UPDATE entries SET segments = ?2 WHERE id = ?1",
            params![id, bits],
        ),
        Change::Changed(id) => tx.execute("UPDATE entries SET changed = 1 WHERE id = ?1", [id]),
        Change::Delete(id) => {
            tx.execute("DELETE FROM names WHERE entry = ?1", [id])?;
            tx.execute("DELETE FROM errors WHERE entry = ?1", [id])?;
            tx.execute("DELETE FROM entries WHERE id = ?1", [id])
        }
        Change::AddName(name) => tx.execute(
            "INSERT OR REPLACE INTO names (parent, name, entry) VALUES (?1, ?2, ?3)",
            params![name.parent, name.name, name.entry],
        ),
        Change::RemoveName { parent, name } => tx.execute(
            "DELETE FROM names WHERE parent = ?1 AND name = ?2",
            params![parent, name],
        ),
        Change::BeginIntent { id, body } => tx.execute(
            "INSERT OR REPLACE INTO intents (id, body) VALUES (?1, ?2)",
            params![id, body],
        ),
        Change::FinishIntent(id) => tx.execute("DELETE FROM intents WHERE id = ?1", [id]),
        Change::RecordError(row) => tx.execute(
            "INSERT OR REPLACE INTO errors (entry, path, message, attempts, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![row.entry, row.path, row.message, row.attempts, row.at],
        ),
        Change::ClearError(id) => tx.execute("DELETE FROM errors WHERE entry = ?1", [id]),
    }
    .map(drop)
}

fn load(c: &Connection) -> rusqlite::Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    let mut statement = c.prepare(
        "SELECT id, state, source, size, source_ino, target_ino, changed, merged, segments,
                source_ctime
         FROM entries ORDER BY id",
    )?;
    let rows = statement.query_map([], |r| {
        Ok(EntryRow {
            id: r.get(0)?,
            state: EntryState::parse(&r.get::<_, String>(1)?)?,
            source: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            source_ino: r.get::<_, i64>(4)? as u64,
            target_ino: r.get::<_, i64>(5)? as u64,
            changed: r.get(6)?,
            merged: r.get(7)?,
            segments: r.get(8)?,
            source_ctime: r.get(9)?,
        })
    })?;
    snapshot.entries = rows.collect::<rusqlite::Result<_>>()?;
    let mut statement = c.prepare("SELECT parent, name, entry FROM names")?;
    let rows = statement.query_map([], |r| {
        Ok(NameRow {
            parent: r.get(0)?,
            name: r.get(1)?,
            entry: r.get(2)?,
        })
    })?;
    snapshot.names = rows.collect::<rusqlite::Result<_>>()?;
    let mut statement = c.prepare("SELECT id, body FROM intents ORDER BY id")?;
    let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    snapshot.intents = rows.collect::<rusqlite::Result<_>>()?;
    let mut statement = c.prepare("SELECT entry, path, message, attempts, at FROM errors")?;
    let rows = statement.query_map([], |r| {
        Ok(ErrorRow {
            entry: r.get(0)?,
            path: r.get(1)?,
            message: r.get(2)?,
            attempts: r.get(3)?,
            at: r.get(4)?,
        })
    })?;
    snapshot.errors = rows.collect::<rusqlite::Result<_>>()?;
    Ok(snapshot)
}

/// The system error behind an SQLite failure that says the journal's file
/// system takes no more writes (full, read-only) or failed: the migration
/// blocks on it as on a full target, and clients get that errno.
fn system_errno(err: &rusqlite::Error) -> Option<i32> {
    let rusqlite::Error::SqliteFailure(failure, _) = err else {
        return None;
    };
    match failure.code {
        rusqlite::ErrorCode::DiskFull => Some(libc::ENOSPC),
        rusqlite::ErrorCode::ReadOnly => Some(libc::EROFS),
        rusqlite::ErrorCode::SystemIoFailure => Some(libc::EIO),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(id: EntryId, state: EntryState) -> EntryRow {
        EntryRow {
            id,
            state,
            source: Some(Vec::new()),
            size: 0,
            source_ino: 0,
            target_ino: 0,
            source_ctime: 0,
            changed: false,
            merged: false,
            segments: None,
        }
    }

    #[test]
    fn changes_survive_reopening_and_count_outstanding_work() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal.db");
        let journal = Journal::open(&path).unwrap();
        journal
            .apply(
                &[
                    Change::Insert(dir(ROOT, EntryState::Populated)),
                    Change::Insert(dir(2, EntryState::Unpopulated)),
                    Change::AddName(NameRow {
                        parent: ROOT,
                        name: b"a".to_vec(),
                        entry: 2,
                    }),
                    Change::BeginIntent {
                        id: 7,
                        body: "{}".into(),
                    },
                ],
                Durability::Durable,
            )
            .unwrap();
        let outstanding = journal.outstanding().unwrap();
        assert_eq!((outstanding.unpopulated, outstanding.intents), (1, 1));
        journal
            .apply(
                &[
                    Change::State(2, EntryState::Populated),
                    Change::FinishIntent(7),
                ],
                Durability::Durable,
            )
            .unwrap();
        drop(journal);
        let journal = Journal::open(&path).unwrap();
        assert!(journal.outstanding().unwrap().is_complete());
        let snapshot = journal.load().unwrap();
        assert_eq!(snapshot.entries.len(), 2);
        assert_eq!(snapshot.names[0].entry, 2);
        journal
            .apply(&[Change::Delete(2)], Durability::Lazy)
            .unwrap();
        assert!(journal.load().unwrap().names.is_empty());
    }
}
