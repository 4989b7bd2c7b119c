//! Each migration's summary: when it first started, when its run ended,
//! how many bytes it copied and what verification found. The engine's
//! live report has all of it while the engine is open; the summary keeps
//! it once the engine is closed (a committed, halted or stopped
//! migration), so that the history shows it until the migration is
//! deleted.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::{Catalog, MigrationId, Result, State, now_ms, storage};

/// A migration's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Milliseconds since the epoch of its first start, if it started.
    pub started_at: Option<i64>,
    /// When its run last ended (committed, rolled back, halted, failed);
    /// `None` while it runs again.
    pub ended_at: Option<i64>,
    /// Bytes it copied, as of its engine's last report.
    pub bytes: u64,
    /// What verification found, as of the last report (e.g. "4096 chunks
    /// verified"), if it got that far.
    pub verification: Option<String>,
}

impl Catalog {
    /// Records a start: the first one's time is kept; the run has not
    /// ended any more.
    pub fn record_start(&self, id: MigrationId) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO summaries (migration_id, started_at) VALUES (?1, ?2)
                 ON CONFLICT (migration_id) DO UPDATE
                 SET started_at = coalesce(started_at, excluded.started_at), ended_at = NULL",
                params![id, now_ms()],
            )
            .map(drop)
            .map_err(storage("record a start"))
        })
    }

    /// Records the engine's last figures.
    pub fn record_figures(
        &self,
        id: MigrationId,
        bytes: u64,
        verification: Option<&str>,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO summaries (migration_id, bytes, verification) VALUES (?1, ?2, ?3)
                 ON CONFLICT (migration_id) DO UPDATE
                 SET bytes = excluded.bytes,
                     verification = coalesce(excluded.verification, verification)",
                params![id, i64::try_from(bytes).unwrap_or(i64::MAX), verification],
            )
            .map(drop)
            .map_err(storage("record the figures"))
        })
    }
}

/// Records when the run ended, if `state` ends it.
pub(crate) fn mark_end(
    tx: &Transaction<'_>,
    id: MigrationId,
    state: State,
) -> rusqlite::Result<()> {
    if state.has_ended() {
        tx.execute(
            "INSERT INTO summaries (migration_id, ended_at) VALUES (?1, ?2)
             ON CONFLICT (migration_id) DO UPDATE SET ended_at = excluded.ended_at",
            params![id, now_ms()],
        )?;
    }
    Ok(())
}

pub(crate) fn read(c: &Connection, id: MigrationId) -> rusqlite::Result<Option<Summary>> {
    c.query_row(
        "SELECT started_at, ended_at, bytes, verification FROM summaries WHERE migration_id = ?1",
        params![id],
        |r| {
            Ok(Summary {
                started_at: r.get(0)?,
                ended_at: r.get(1)?,
                bytes: r.get::<_, i64>(2)?.max(0) as u64,
                verification: r.get(3)?,
            })
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::{Catalog, Kind, State, Verb};

    #[test]
    fn a_summary_outlives_the_run_and_a_new_start_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let id = catalog
            .create(Kind::Volume, State::Created, &BTreeMap::new())
            .unwrap()
            .id;
        assert_eq!(catalog.get(id).unwrap().summary, None);
        catalog.record_start(id).unwrap();
        let first = catalog.get(id).unwrap().summary.unwrap().started_at;
        catalog.record_figures(id, 4096, None).unwrap();
        catalog
            .record_figures(id, 8192, Some("2 chunks verified"))
            .unwrap();
        catalog.record_figures(id, 8192, None).unwrap();
        let intent = catalog.begin(id, Verb::Commit, State::Committed).unwrap();
        catalog.finish(&intent, State::Committed, None).unwrap();
        let summary = catalog.get(id).unwrap().summary.unwrap();
        assert_eq!(summary.bytes, 8192);
        assert_eq!(summary.verification.as_deref(), Some("2 chunks verified"));
        assert!(summary.ended_at >= summary.started_at && summary.ended_at.is_some());
        // Started again (a halted one): the first start stays, the end goes.
        catalog.record_start(id).unwrap();
        let summary = catalog.get(id).unwrap().summary.unwrap();
        assert_eq!((summary.started_at, summary.ended_at), (first, None));
        catalog.set_state(id, State::Failed, Some("x")).unwrap();
        assert!(catalog.get(id).unwrap().summary.unwrap().ended_at.is_some());
        catalog.delete(id).unwrap();
        let rows = catalog.tables(10).unwrap();
        let summaries = rows.iter().find(|t| t.name == "summaries").unwrap();
        assert_eq!(summaries.total, 0, "deleted with its migration");
    }
}
