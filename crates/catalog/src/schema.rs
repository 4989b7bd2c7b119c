//! The catalog's tables and how a database of an older version is brought
//! up to date. The version lives in SQLite's `user_version`; each step runs
//! in its own transaction. See `SCHEMA.md`.

use std::path::Path;

use rusqlite::Connection;

use crate::{Error, ErrorKind, Result, storage};

/// Steps from version N to N+1, in order; the schema version is their count.
const STEPS: &[&str] = &[
    // 1: migrations, their properties, transitions under way, events, config.
    "CREATE TABLE config (
         key   TEXT PRIMARY KEY,
         value TEXT NOT NULL
     );
     CREATE TABLE migrations (
         id         INTEGER PRIMARY KEY AUTOINCREMENT,
         kind       TEXT NOT NULL,
         state      TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         updated_at INTEGER NOT NULL,
         error      TEXT
     );
     CREATE TABLE properties (
         migration_id INTEGER NOT NULL REFERENCES migrations (id) ON DELETE CASCADE,
         name         TEXT NOT NULL,
         value        TEXT NOT NULL,
         PRIMARY KEY (migration_id, name)
     );
     CREATE TABLE intents (
         id           INTEGER PRIMARY KEY AUTOINCREMENT,
         migration_id INTEGER NOT NULL UNIQUE REFERENCES migrations (id) ON DELETE CASCADE,
         operation    TEXT NOT NULL,
         from_state   TEXT NOT NULL,
         to_state     TEXT NOT NULL,
         created_at   INTEGER NOT NULL
     );
     CREATE TABLE events (
         id           INTEGER PRIMARY KEY AUTOINCREMENT,
         migration_id INTEGER NOT NULL REFERENCES migrations (id) ON DELETE CASCADE,
         at           INTEGER NOT NULL,
         level        TEXT NOT NULL,
         message      TEXT NOT NULL
     );
     CREATE INDEX events_by_migration ON events (migration_id, id);",
];

/// The schema version this dmm writes.
pub const VERSION: usize = STEPS.len();

/// Brings the database to [`VERSION`].
pub(crate) fn upgrade(connection: &mut Connection, path: &Path) -> Result<()> {
    let context = format!("cannot upgrade the catalog {}", path.display());
    let current: usize = connection
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(storage(&context))? as usize;
    if current > VERSION {
        return Err(Error::new(
            ErrorKind::Incompatible,
            format!(
                "the catalog {} has schema version {current}, newer than this dmm ({VERSION})",
                path.display()
            ),
        ));
    }
    for (version, step) in STEPS.iter().enumerate().skip(current) {
        let tx = connection.transaction().map_err(storage(&context))?;
        tx.execute_batch(step).map_err(storage(&context))?;
        tx.pragma_update(None, "user_version", (version + 1) as i64)
            .map_err(storage(&context))?;
        tx.commit().map_err(storage(&context))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_catalog_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut connection = Connection::open(&path).unwrap();
        upgrade(&mut connection, &path).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        let err = upgrade(&mut connection, &path).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Incompatible);
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
