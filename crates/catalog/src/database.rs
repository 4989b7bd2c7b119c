//! One SQLite file opened the way dmm needs it: WAL, the durability the
//! caller asks for, a busy timeout, and its tables brought up to date by
//! numbered steps (the version lives in SQLite's `user_version`; each step
//! runs in its own transaction). The catalog is such a file, and so is
//! every tree journal (`dmm-tree` opens them through this, with its own
//! [`Layout`]): one way to open, version and lock an SQLite file in dmm.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::Connection;

use crate::{Error, ErrorKind, Result, storage};

/// What a database file holds and how it is opened.
pub struct Layout {
    /// How error messages name the file ("the catalog").
    pub what: &'static str,
    /// `PRAGMA`s run at every open.
    pub pragmas: &'static str,
    /// Steps from version N to N+1, in order; the version is their count.
    pub steps: &'static [&'static str],
}

/// An open database file: one connection, used by one caller at a time.
pub struct Database {
    connection: Mutex<Connection>,
    path: PathBuf,
}

impl Database {
    /// Opens (creating or upgrading) the file at `path`. A file whose
    /// version is newer than `layout` knows is refused
    /// ([`ErrorKind::Incompatible`]).
    pub fn open(path: &Path, layout: &Layout) -> Result<Database> {
        let context = format!("cannot open {} {}", layout.what, path.display());
        let mut connection = Connection::open(path).map_err(storage(&context))?;
        connection
            .execute_batch(layout.pragmas)
            .map_err(storage(&context))?;
        upgrade(&mut connection, path, layout)?;
        Ok(Database {
            connection: Mutex::new(connection),
            path: path.to_owned(),
        })
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` with the connection (one user at a time); its errors
    /// are the caller's own.
    pub fn with<T, E>(
        &self,
        work: impl FnOnce(&mut Connection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        work(&mut connection)
    }
}

/// Brings the database to the version of `layout`.
pub(crate) fn upgrade(connection: &mut Connection, path: &Path, layout: &Layout) -> Result<()> {
    let context = format!("cannot upgrade {} {}", layout.what, path.display());
    let current: usize = connection
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(storage(&context))? as usize;
    let version = layout.steps.len();
    if current > version {
        return Err(Error::new(
            ErrorKind::Incompatible,
            format!(
                "{} {} has schema version {current}, newer than this dmm ({version})",
                layout.what,
                path.display()
            ),
        ));
    }
    for (at, step) in layout.steps.iter().enumerate().skip(current) {
        let tx = connection.transaction().map_err(storage(&context))?;
        tx.execute_batch(step).map_err(storage(&context))?;
        tx.pragma_update(None, "user_version", (at + 1) as i64)
            .map_err(storage(&context))?;
        tx.commit().map_err(storage(&context))?;
    }
    Ok(())
}
