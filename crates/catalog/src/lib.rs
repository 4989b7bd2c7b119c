//! dmm's catalog: one SQLite file in the state directory that holds the
//! configuration, every migration with its properties and state, the state
//! transitions in progress, and an event log per migration.
//!
//! The rest of dmm never writes SQL: it calls this small API. State changes
//! go through *phased commits* ([`Catalog::begin`] records the intent, the
//! daemon acts, [`Catalog::finish`] records the outcome), so that a daemon
//! killed at any instant finds, on restart, exactly which transitions were
//! under way and can finish or undo them. Bitmaps and copy state are not
//! here: they live in each migration's own files, written at the pace of
//! the copy, not of client writes. `SCHEMA.md` documents the tables and
//! their versions.

mod database;
mod lifecycle;
mod queue;
mod reception;
mod schema;
mod summary;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use crate::database::{Database, Layout};
pub use crate::reception::{Reception, Stage as ReceptionStage};
pub use crate::summary::Summary;

pub use lifecycle::{
    Failure, Kind, Leads, RULES, Recovery, Refused, Reopen, Rule, State, UnknownName, Verb,
    markdown_table, valid_verbs,
};

/// A migration's identifier.
pub type MigrationId = i64;

/// A migration as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: MigrationId,
    pub kind: Kind,
    pub state: State,
    pub properties: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub updated_at: i64,
    /// The last error, when the migration failed.
    pub error: Option<String>,
    /// A state transition under way.
    pub pending: Option<Intent>,
    /// What its runs did, kept after its engine is closed (the history).
    #[serde(default)]
    pub summary: Option<Summary>,
}

/// A state transition that was started and not yet finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub id: i64,
    pub migration: MigrationId,
    /// The verb under way, as the CLI spells it (`halt --remove`).
    #[serde(with = "verb_text")]
    pub verb: Verb,
    pub from: State,
    pub to: State,
    pub created_at: i64,
}

/// An intent's verb as text in the API, as in the catalog.
mod verb_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Verb;

    pub fn serialize<S: Serializer>(verb: &Verb, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(verb)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Verb, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One entry of a migration's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub migration: MigrationId,
    pub at: i64,
    pub level: String,
    pub message: String,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such migration.
    NotFound,
    /// Another transition of the migration is under way.
    Busy,
    /// The database could not be read or written.
    Storage,
    /// The database is newer than this dmm, or not a dmm catalog.
    Incompatible,
    /// The migration is not where the request needs it (not queued).
    Conflict,
}

/// A catalog error: kind, what was being done, and the cause (shown by
/// the error's `source()` chain, not repeated in its message).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    pub kind: ErrorKind,
    pub context: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn storage(context: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |source| Error {
        kind: ErrorKind::Storage,
        context: format!("catalog: cannot {context}"),
        source: Some(Box::new(source)),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads a typed name (state, verb, kind) from a text column.
fn parse<T: std::str::FromStr<Err = UnknownName>>(text: String) -> rusqlite::Result<T> {
    text.parse().map_err(|e: UnknownName| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

/// One table's newest rows, every value as text (`None` for NULL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableRows {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    /// Rows in the table, shown or not.
    pub total: i64,
}

fn table_rows(c: &Connection, name: String, limit: u32) -> Result<TableRows> {
    // The names come from sqlite_master: quoting is enough.
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let total = c
        .query_row(&format!("SELECT count(*) FROM {quoted}"), [], |row| {
            row.get(0)
        })
        .map_err(storage("read a table"))?;
    let mut statement = c
        .prepare(&format!(
            "SELECT * FROM {quoted} ORDER BY rowid DESC LIMIT ?1"
        ))
        .map_err(storage("read a table"))?;
    let columns: Vec<String> = statement
        .column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let width = columns.len();
    let rows = statement
        .query_map([limit], |row| {
            (0..width)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Integer(n) => Some(n.to_string()),
                        rusqlite::types::ValueRef::Real(x) => Some(x.to_string()),
                        rusqlite::types::ValueRef::Text(t) => {
                            Some(String::from_utf8_lossy(t).into_owned())
                        }
                        rusqlite::types::ValueRef::Blob(b) => Some(format!("<{} bytes>", b.len())),
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(storage("read a table"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(storage("read a table"))?;
    Ok(TableRows {
        name,
        columns,
        rows,
        total,
    })
}

/// The catalog of one state directory.
pub struct Catalog {
    database: Database,
}

impl Catalog {
    /// Opens (creating or upgrading) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog> {
        let database = Database::open(path, &schema::CATALOG)?;
        Ok(Catalog { database })
    }

    fn with<T>(&self, work: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        self.database.with(work)
    }

    /// Records a new migration.
    pub fn create(
        &self,
        kind: Kind,
        state: State,
        properties: &BTreeMap<String, String>,
    ) -> Result<MigrationRecord> {
        let id = self.with(|c| {
            let tx = c.transaction().map_err(storage("create"))?;
            let at = now_ms();
            tx.execute(
                "INSERT INTO migrations (kind, state, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
                params![kind.as_str(), state.as_str(), at],
            )
            .map_err(storage("create"))?;
            let id = tx.last_insert_rowid();
            for (name, value) in properties {
                tx.execute(
                    "INSERT INTO properties (migration_id, name, value) VALUES (?1, ?2, ?3)",
                    params![id, name, value],
                )
                .map_err(storage("create"))?;
            }
            tx.commit().map_err(storage("create"))?;
            Ok(id)
        })?;
        self.get(id)
    }

    /// One migration.
    pub fn get(&self, id: MigrationId) -> Result<MigrationRecord> {
        self.with(|c| read_migration(c, id))?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no migration {id}")))
    }

    /// Every migration, by id.
    pub fn list(&self) -> Result<Vec<MigrationRecord>> {
        let ids: Vec<i64> = self.with(|c| {
            let mut statement = c
                .prepare("SELECT id FROM migrations ORDER BY id")
                .map_err(storage("list"))?;
            let rows = statement
                .query_map([], |row| row.get(0))
                .map_err(storage("list"))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(storage("list"))
        })?;
        ids.into_iter().map(|id| self.get(id)).collect()
    }

    /// Every table of the catalog with its newest `limit` rows (by rowid),
    /// read-only, for the admin's error recovery (the dashboard's
    /// database view).
    pub fn tables(&self, limit: u32) -> Result<Vec<TableRows>> {
        self.with(|c| {
            let names: Vec<String> = {
                let mut statement = c
                    .prepare(
                        "SELECT name FROM sqlite_master WHERE type = 'table' \
                         AND name NOT LIKE 'sqlite_%' ORDER BY name",
                    )
                    .map_err(storage("read the tables"))?;
                let rows = statement
                    .query_map([], |row| row.get(0))
                    .map_err(storage("read the tables"))?;
                rows.collect::<rusqlite::Result<_>>()
                    .map_err(storage("read the tables"))?
            };
            names
                .into_iter()
                .map(|name| table_rows(c, name, limit))
                .collect()
        })
    }

    /// Sets (or replaces) properties.
    pub fn set_properties(
        &self,
        id: MigrationId,
        properties: &BTreeMap<String, String>,
    ) -> Result<()> {
        self.get(id)?;
        self.with(|c| {
            let tx = c.transaction().map_err(storage("set properties"))?;
            for (name, value) in properties {
                tx.execute(
                    "INSERT INTO properties (migration_id, name, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (migration_id, name) DO UPDATE SET value = excluded.value",
                    params![id, name, value],
                )
                .map_err(storage("set properties"))?;
            }
            tx.execute(
                "UPDATE migrations SET updated_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(storage("set properties"))?;
            tx.commit().map_err(storage("set properties"))
        })
    }

    /// Removes a migration, its properties, intents and events.
    pub fn delete(&self, id: MigrationId) -> Result<()> {
        self.get(id)?;
        self.with(|c| {
            c.execute("DELETE FROM migrations WHERE id = ?1", params![id])
                .map(|_| ())
                .map_err(storage("delete"))
        })
    }

    /// Phase one of a state change: records that `verb` is taking the
    /// migration to `to`. Refused while another transition is under way.
    pub fn begin(&self, id: MigrationId, verb: Verb, to: State) -> Result<Intent> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("begin"))?;
            let intent = record_intent(&tx, id, verb, |_, _| Ok(to))?;
            tx.commit().map_err(storage("begin"))?;
            Ok(intent)
        })
    }

    /// Phase three: records the state the transition ended in (its target,
    /// or another one on failure) and closes the intent, atomically.
    pub fn finish(&self, intent: &Intent, state: State, error: Option<&str>) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("finish"))?;
            tx.execute(
                SET_STATE,
                params![intent.migration, state.as_str(), error, now_ms()],
            )
            .map_err(storage("finish"))?;
            summary::mark_end(&tx, intent.migration, state).map_err(storage("finish"))?;
            tx.execute("DELETE FROM intents WHERE id = ?1", params![intent.id])
                .map_err(storage("finish"))?;
            tx.commit().map_err(storage("finish"))
        })
    }

    /// Closes an intent without changing the state (the transition was
    /// refused or could not start).
    pub fn abandon(&self, intent: &Intent) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM intents WHERE id = ?1", params![intent.id])
                .map(|_| ())
                .map_err(storage("abandon"))
        })
    }

    /// Records a state change the migration made by itself (a switchover,
    /// a failure), outside any requested transition.
    pub fn set_state(&self, id: MigrationId, state: State, error: Option<&str>) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("set state"))?;
            tx.execute(SET_STATE, params![id, state.as_str(), error, now_ms()])
                .map_err(storage("set state"))?;
            summary::mark_end(&tx, id, state).map_err(storage("set state"))?;
            tx.commit().map_err(storage("set state"))
        })
    }

    /// A daemon-wide setting, if set.
    pub fn config(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT value FROM config WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(storage("read the configuration"))
        })
    }

    /// Sets a daemon-wide setting, or with `None` removes it (its default
    /// applies again).
    pub fn set_config(&self, key: &str, value: Option<&str>) -> Result<()> {
        self.with(|c| {
            match value {
                Some(value) => c.execute(
                    "INSERT INTO config (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, value],
                ),
                None => c.execute("DELETE FROM config WHERE key = ?1", params![key]),
            }
            .map(drop)
            .map_err(storage("change the configuration"))
        })
    }

    /// Transitions left unfinished (by a daemon that died mid-way).
    pub fn pending(&self) -> Result<Vec<Intent>> {
        self.with(|c| {
            let mut statement = c
                .prepare(
                    "SELECT id, migration_id, operation, from_state, to_state, created_at
                     FROM intents ORDER BY id",
                )
                .map_err(storage("pending"))?;
            let rows = statement
                .query_map([], read_intent)
                .map_err(storage("pending"))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(storage("pending"))
        })
    }

    /// Appends to a migration's event log.
    pub fn log(&self, id: MigrationId, level: &str, message: &str) -> Result<Event> {
        self.with(|c| {
            let at = now_ms();
            c.execute(
                "INSERT INTO events (migration_id, at, level, message) VALUES (?1, ?2, ?3, ?4)",
                params![id, at, level, message],
            )
            .map_err(storage("log"))?;
            Ok(Event {
                id: c.last_insert_rowid(),
                migration: id,
                at,
                level: level.to_owned(),
                message: message.to_owned(),
            })
        })
    }

    /// A migration's events after `after` (an event id), oldest first.
    pub fn events(&self, id: MigrationId, after: i64) -> Result<Vec<Event>> {
        self.get(id)?;
        self.with(|c| {
            let mut statement = c
                .prepare(
                    "SELECT id, migration_id, at, level, message FROM events
                     WHERE migration_id = ?1 AND id > ?2 ORDER BY id",
                )
                .map_err(storage("events"))?;
            let rows = statement
                .query_map(params![id, after], |r| {
                    Ok(Event {
                        id: r.get(0)?,
                        migration: r.get(1)?,
                        at: r.get(2)?,
                        level: r.get(3)?,
                        message: r.get(4)?,
                    })
                })
                .map_err(storage("events"))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(storage("events"))
        })
    }
}

/// Records a migration's new state; a migration that leaves the queue
/// leaves its place in it.
const SET_STATE: &str = "UPDATE migrations SET state = ?2, error = ?3, updated_at = ?4,
     queue_position = CASE WHEN ?2 = 'queued' THEN queue_position END
     WHERE id = ?1";

/// Records the intent of `verb` in `tx`, going where `to` says from the
/// migration's state. Refused while another transition is under way.
fn record_intent(
    tx: &rusqlite::Transaction<'_>,
    id: MigrationId,
    verb: Verb,
    to: impl FnOnce(&rusqlite::Transaction<'_>, State) -> Result<State>,
) -> Result<Intent> {
    let from: Option<String> = tx
        .query_row(
            "SELECT state FROM migrations WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )
        .optional()
        .map_err(storage("begin"))?;
    let Some(from) = from else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no migration {id}"),
        ));
    };
    let from = parse::<State>(from).map_err(storage("begin"))?;
    let busy: Option<String> = tx
        .query_row(
            "SELECT operation FROM intents WHERE migration_id = ?1",
            params![id],
            |r| r.get(0),
        )
        .optional()
        .map_err(storage("begin"))?;
    if let Some(operation) = busy {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("migration {id} is busy with {operation}"),
        ));
    }
    let to = to(tx, from)?;
    let at = now_ms();
    tx.execute(
        "INSERT INTO intents (migration_id, operation, from_state, to_state, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, verb.to_string(), from.as_str(), to.as_str(), at],
    )
    .map_err(storage("begin"))?;
    Ok(Intent {
        id: tx.last_insert_rowid(),
        migration: id,
        verb,
        from,
        to,
        created_at: at,
    })
}

fn read_intent(row: &rusqlite::Row<'_>) -> rusqlite::Result<Intent> {
    Ok(Intent {
        id: row.get(0)?,
        migration: row.get(1)?,
        verb: parse::<Verb>(row.get(2)?)?,
        from: parse::<State>(row.get(3)?)?,
        to: parse::<State>(row.get(4)?)?,
        created_at: row.get(5)?,
    })
}

fn read_migration(c: &mut Connection, id: MigrationId) -> Result<Option<MigrationRecord>> {
    let row = c
        .query_row(
            "SELECT kind, state, created_at, updated_at, error FROM migrations WHERE id = ?1",
            params![id],
            |r| {
                Ok((
                    parse::<Kind>(r.get(0)?)?,
                    parse::<State>(r.get(1)?)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            },
        )
        .optional()
        .map_err(storage("read"))?;
    let Some((kind, state, created_at, updated_at, error)) = row else {
        return Ok(None);
    };
    let mut statement = c
        .prepare("SELECT name, value FROM properties WHERE migration_id = ?1")
        .map_err(storage("read"))?;
    let properties = statement
        .query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(storage("read"))?
        .collect::<rusqlite::Result<BTreeMap<String, String>>>()
        .map_err(storage("read"))?;
    let pending = c
        .query_row(
            "SELECT id, migration_id, operation, from_state, to_state, created_at
             FROM intents WHERE migration_id = ?1",
            params![id],
            read_intent,
        )
        .optional()
        .map_err(storage("read"))?;
    let summary = summary::read(c, id).map_err(storage("read"))?;
    Ok(Some(MigrationRecord {
        id,
        kind,
        state,
        properties,
        created_at,
        updated_at,
        error,
        pending,
        summary,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        (dir, catalog)
    }

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn migrations_are_created_listed_changed_and_deleted() {
        let (_dir, catalog) = catalog();
        let first = catalog
            .create(
                Kind::Volume,
                State::Created,
                &props(&[("source", "/a"), ("target", "/b")]),
            )
            .unwrap();
        let second = catalog
            .create(Kind::Volume, State::Halted, &props(&[]))
            .unwrap();
        assert_eq!((first.id, second.id), (1, 2));
        assert_eq!(first.properties["source"], "/a");
        catalog
            .set_properties(1, &props(&[("rate", "10M"), ("source", "/c")]))
            .unwrap();
        let first = catalog.get(1).unwrap();
        assert_eq!(first.properties["source"], "/c");
        assert_eq!(first.properties["rate"], "10M");
        assert_eq!(catalog.list().unwrap().len(), 2);
        catalog.delete(2).unwrap();
        assert_eq!(catalog.get(2).unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(catalog.list().unwrap().len(), 1);
    }

    #[test]
    fn every_table_reads_back_newest_rows_first() {
        let (_dir, catalog) = catalog();
        for source in ["/a", "/b", "/c"] {
            let properties = props(&[("source", source)]);
            catalog
                .create(Kind::Volume, State::Created, &properties)
                .unwrap();
        }
        let tables = catalog.tables(2).unwrap();
        let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
        for table in ["config", "events", "intents", "migrations", "properties"] {
            assert!(names.contains(&table), "{table} in {names:?}");
        }
        let migrations = tables.iter().find(|t| t.name == "migrations").unwrap();
        assert_eq!(migrations.total, 3);
        assert_eq!(migrations.rows.len(), 2, "the limit holds");
        let id = migrations.columns.iter().position(|c| c == "id").unwrap();
        assert_eq!(migrations.rows[0][id].as_deref(), Some("3"), "newest first");
    }

    #[test]
    fn phased_commits_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let catalog = Catalog::open(&path).unwrap();
            catalog
                .create(Kind::Volume, State::Created, &props(&[]))
                .unwrap();
            let intent = catalog.begin(1, Verb::Start, State::Running).unwrap();
            assert_eq!(intent.from, State::Created);
            catalog
                .create(Kind::Tree, State::Stopped, &props(&[]))
                .unwrap();
            catalog
                .begin(2, Verb::Halt { remove: true }, State::Halted)
                .unwrap();
            assert_eq!(
                catalog
                    .begin(1, Verb::Halt { remove: true }, State::Halted)
                    .unwrap_err()
                    .kind,
                ErrorKind::Busy
            );
        }
        let catalog = Catalog::open(&path).unwrap();
        let pending = catalog.pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].verb, Verb::Start);
        assert_eq!(pending[1].verb, Verb::Halt { remove: true });
        assert_eq!(catalog.get(2).unwrap().kind, Kind::Tree);
        assert_eq!(catalog.get(1).unwrap().pending.as_ref(), Some(&pending[0]));
        catalog.finish(&pending[0], State::Running, None).unwrap();
        assert_eq!(catalog.pending().unwrap(), [pending[1].clone()]);
        assert_eq!(catalog.get(1).unwrap().state, State::Running);
    }

    #[test]
    fn events_are_kept_per_migration_in_order() {
        let (_dir, catalog) = catalog();
        catalog
            .create(Kind::Volume, State::Created, &props(&[]))
            .unwrap();
        catalog
            .create(Kind::Volume, State::Created, &props(&[]))
            .unwrap();
        let a = catalog.log(1, "info", "created").unwrap();
        catalog.log(2, "info", "other").unwrap();
        catalog.log(1, "error", "destination full").unwrap();
        let events = catalog.events(1, 0).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].message, "destination full");
        assert_eq!(catalog.events(1, a.id).unwrap().len(), 1);
        catalog.delete(1).unwrap();
        assert!(catalog.events(1, 0).is_err());
    }
}
