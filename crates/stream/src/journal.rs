//! The journal of one stream store: each stream's owner, its extents and
//! its move, one SQLite file (WAL) opened, versioned and locked by
//! `dmm-catalog`'s [`Database`] like the catalog and the tree journals.
//!
//! A move's phases are *phased commits*: each phase rewrites the stream's
//! extents and its move row in one transaction ([`Journal::record`]), so
//! that a restart finds the map of one phase, never a mix. Extents are
//! recorded by their start; their ends are in their files (a restart reads
//! them there, see `store.rs`).
//!
//! Tables, column by column:
//!
//! | table | column | meaning |
//! |---|---|---|
//! | `streams` | `name` | the stream's file name under the access point |
//! | | `uid`, `gid`, `mode` | its owner and permission bits |
//! | | `created` | when it was created (seconds since the epoch) |
//! | | `next_file` | the number its next extent file gets |
//! | `extents` | `stream`, `file` | the extent's file, `NAME.FILE.log` or `.zst` on its tier |
//! | | `tier` | the tier's index in the orbit |
//! | | `start` | the stream offset of its first byte |
//! | | `base` | the stream offset of its file's first byte (a target's tail starts after its head) |
//! | `moves` | `stream` | the stream that moves |
//! | | `phase` | `prepared`, `switched` or `drained` (a linked move has no row) |
//! | | `tier`, `target` | where it moves and its new file |
//! | | `switched_at` | the switch offset, once switched |
//! | `figures` | `name`, `value` | bytes drained, bytes redirected, moves linked |

use std::path::Path;

use dmm_catalog::{Database, Layout};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::error::{Error, ErrorKind, Result};
use crate::extents::{Extent, ExtentMap, Move, Phase};

const JOURNAL: Layout = Layout {
    what: "the stream journal",
    pragmas: "PRAGMA journal_mode = WAL;
              PRAGMA synchronous = FULL;
              PRAGMA busy_timeout = 5000;",
    steps: &["
    CREATE TABLE streams (
        name      TEXT PRIMARY KEY,
        uid       INTEGER NOT NULL,
        gid       INTEGER NOT NULL,
        mode      INTEGER NOT NULL,
        created   INTEGER NOT NULL,
        next_file INTEGER NOT NULL
    );
    CREATE TABLE extents (
        stream TEXT NOT NULL,
        file   INTEGER NOT NULL,
        tier   INTEGER NOT NULL,
        start  INTEGER NOT NULL,
        base   INTEGER NOT NULL,
        PRIMARY KEY (stream, file, start)
    );
    CREATE TABLE moves (
        stream      TEXT PRIMARY KEY,
        phase       TEXT NOT NULL,
        tier        INTEGER NOT NULL,
        target      INTEGER NOT NULL,
        switched_at INTEGER
    );
    CREATE TABLE figures (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    "],
};

/// A stream's owner and permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A stream as the journal holds it.
#[derive(Debug, Clone)]
pub struct Saved {
    pub name: String,
    pub owner: Owner,
    pub created: i64,
    /// Its extents' ends are their starts until the files are read.
    pub map: ExtentMap,
}

/// What the store's moves did, summed over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    /// Bytes copied from source extents into targets' heads.
    pub drained: u64,
    /// Bytes appended to targets between their switch and their link.
    pub redirected: u64,
    /// Moves linked.
    pub moves: u64,
}

/// An open stream journal.
pub struct Journal {
    database: Database,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal> {
        let database = Database::open(path, &JOURNAL).map_err(|err| {
            Error::on(ErrorKind::Journal, "open", path).with_detail(err.to_string())
        })?;
        Ok(Journal { database })
    }

    /// Every stream with its map and move.
    pub fn streams(&self) -> Result<Vec<Saved>> {
        self.with("read the streams", |c| {
            let mut query =
                c.prepare("SELECT name, uid, gid, mode, created, next_file FROM streams")?;
            let rows = query.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Owner {
                        uid: r.get(1)?,
                        gid: r.get(2)?,
                        mode: r.get(3)?,
                    },
                    r.get::<_, i64>(4)?,
                    r.get::<_, u64>(5)?,
                ))
            })?;
            let mut saved = Vec::new();
            for row in rows {
                let (name, owner, created, next_file) = row?;
                let map = ExtentMap::restore(extents(c, &name)?, moving(c, &name)?, next_file);
                saved.push(Saved {
                    name,
                    owner,
                    created,
                    map,
                });
            }
            Ok(saved)
        })
    }

    /// Records a new stream.
    pub fn create(&self, name: &str, owner: Owner, created: i64, map: &ExtentMap) -> Result<()> {
        self.with("record a new stream", |c| {
            let t = c.transaction()?;
            t.execute(
                "INSERT INTO streams (name, uid, gid, mode, created, next_file)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    name,
                    owner.uid,
                    owner.gid,
                    owner.mode,
                    created,
                    map.next_file()
                ],
            )?;
            write_map(&t, name, map)?;
            t.commit()
        })
    }

    /// Records `map` (its extents and its move) as the stream's, in one
    /// transaction: one phase of a move. A stream removed meanwhile is
    /// not found (and nothing is recorded).
    pub fn record(&self, name: &str, map: &ExtentMap) -> Result<()> {
        let recorded = self.with("record a stream's extents", |c| {
            let t = c.transaction()?;
            let updated = t.execute(
                "UPDATE streams SET next_file = ?2 WHERE name = ?1",
                params![name, map.next_file()],
            )?;
            if updated == 0 {
                return Ok(false);
            }
            write_map(&t, name, map)?;
            t.commit().map(|()| true)
        })?;
        match recorded {
            true => Ok(()),
            false => Err(Error::new(
                ErrorKind::NotFound,
                format!("stream {name} was removed"),
            )),
        }
    }

    pub fn set_owner(&self, name: &str, owner: Owner) -> Result<()> {
        self.with("record a stream's owner", |c| {
            c.execute(
                "UPDATE streams SET uid = ?2, gid = ?3, mode = ?4 WHERE name = ?1",
                params![name, owner.uid, owner.gid, owner.mode],
            )
            .map(drop)
        })
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.with("forget a stream", |c| {
            let t = c.transaction()?;
            for table in [
                "DELETE FROM streams WHERE name = ?1",
                "DELETE FROM extents WHERE stream = ?1",
                "DELETE FROM moves WHERE stream = ?1",
            ] {
                t.execute(table, [name])?;
            }
            t.commit()
        })
    }

    pub fn figures(&self) -> Result<Figures> {
        self.with("read the figures", |c| {
            let get = |name: &str| {
                c.query_row("SELECT value FROM figures WHERE name = ?1", [name], |r| {
                    r.get::<_, u64>(0)
                })
                .optional()
                .map(Option::unwrap_or_default)
            };
            Ok(Figures {
                drained: get("drained")?,
                redirected: get("redirected")?,
                moves: get("moves")?,
            })
        })
    }

    /// Adds a linked move's bytes to the figures.
    pub fn add_figures(&self, more: Figures) -> Result<()> {
        self.with("record the figures", |c| {
            let t = c.transaction()?;
            for (name, value) in [
                ("drained", more.drained),
                ("redirected", more.redirected),
                ("moves", more.moves),
            ] {
                t.execute(
                    "INSERT INTO figures (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = value + ?2",
                    params![name, value],
                )?;
            }
            t.commit()
        })
    }

    fn with<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.database.with(work).map_err(|err| {
            Error::on(ErrorKind::Journal, operation, self.database.path()).with_source(err)
        })
    }
}

fn extents(c: &Connection, name: &str) -> rusqlite::Result<Vec<Extent>> {
    let mut query =
        c.prepare("SELECT file, tier, start, base FROM extents WHERE stream = ?1 ORDER BY start")?;
    let rows = query.query_map([name], |r| {
        Ok(Extent {
            file: r.get(0)?,
            tier: r.get(1)?,
            start: r.get(2)?,
            end: r.get(2)?,
            base: r.get(3)?,
        })
    })?;
    rows.collect()
}

fn moving(c: &Connection, name: &str) -> rusqlite::Result<Option<Move>> {
    c.query_row(
        "SELECT phase, tier, target, switched_at FROM moves WHERE stream = ?1",
        [name],
        |r| {
            let phase: String = r.get(0)?;
            let phase = Phase::parse(&phase).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("unknown phase {phase:?}").into(),
                )
            })?;
            Ok(Move {
                phase,
                tier: r.get(1)?,
                target: r.get(2)?,
                switched_at: r.get(3)?,
            })
        },
    )
    .optional()
}

/// Replaces the stream's extents and move rows with `map`'s.
fn write_map(t: &Transaction<'_>, name: &str, map: &ExtentMap) -> rusqlite::Result<()> {
    t.execute("DELETE FROM extents WHERE stream = ?1", [name])?;
    for extent in map.extents() {
        t.execute(
            "INSERT INTO extents (stream, file, tier, start, base) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, extent.file, extent.tier, extent.start, extent.base],
        )?;
    }
    t.execute("DELETE FROM moves WHERE stream = ?1", [name])?;
    if let Some(moving) = map.moving() {
        t.execute(
            "INSERT INTO moves (stream, phase, tier, target, switched_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                name,
                moving.phase.as_str(),
                moving.tier,
                moving.target,
                moving.switched_at
            ],
        )?;
    }
    Ok(())
}
