//! The catalog's tables, as steps from each schema version to the next
//! (see `SCHEMA.md`; `database` runs them).

use crate::database::Layout;

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
    // 2: the start queue under the daemon's maxrunning limit.
    "ALTER TABLE migrations ADD COLUMN queue_position INTEGER;",
    // 3: each migration's summary, kept after its engine is closed.
    "CREATE TABLE summaries (
         migration_id INTEGER PRIMARY KEY REFERENCES migrations (id) ON DELETE CASCADE,
         started_at   INTEGER,
         ended_at     INTEGER,
         bytes        INTEGER NOT NULL DEFAULT 0,
         verification TEXT
     );",
    // 4: volumes this node receives from peers, or was handed by them.
    "CREATE TABLE receptions (
         peer      TEXT NOT NULL,
         export    TEXT NOT NULL,
         path      TEXT NOT NULL UNIQUE,
         stage     TEXT NOT NULL,
         owner_nbd TEXT,
         PRIMARY KEY (peer, export)
     );",
];

/// The catalog file.
pub(crate) const CATALOG: Layout = Layout {
    what: "the catalog",
    pragmas: "PRAGMA journal_mode = WAL;
              PRAGMA synchronous = FULL;
              PRAGMA foreign_keys = ON;
              PRAGMA busy_timeout = 5000;",
    steps: STEPS,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::database::upgrade;
    use rusqlite::Connection;

    #[test]
    fn a_newer_catalog_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut connection = Connection::open(&path).unwrap();
        upgrade(&mut connection, &path, &CATALOG).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        let err = upgrade(&mut connection, &path, &CATALOG).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Incompatible);
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
