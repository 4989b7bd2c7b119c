//! The daemon's start queue: which migrations hold one of the
//! `maxrunning` slots, admission of a start under that limit, and the
//! order in which queued migrations start. Each decision is one SQLite
//! transaction, so two starts at once never both take the last slot.

use rusqlite::{Transaction, params};

use crate::{
    Catalog, Error, ErrorKind, Intent, MigrationId, Reopen, Result, State, Verb, record_intent,
    storage,
};

impl Catalog {
    /// Phase one of a start under a limit of `limit` migrations holding a
    /// slot at once (`None`: no limit): records the intent of `verb`
    /// towards `running` when the migration is admitted, or towards
    /// `queued` (at the end of the queue) when it is not. A migration
    /// whose engine is open (it holds a slot, or serves clients) is always
    /// admitted.
    pub fn admit(&self, id: MigrationId, verb: Verb, limit: Option<u32>) -> Result<Intent> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("admit"))?;
            let intent = record_intent(&tx, id, verb, |tx, from| {
                let admitted = from.on_restart() != Reopen::Closed
                    || limit.is_none_or(|limit| {
                        slots_taken(tx, Some(id)).is_ok_and(|taken| taken < limit)
                    });
                if admitted {
                    return Ok(State::Running);
                }
                if from != State::Queued {
                    tx.execute(
                        "UPDATE migrations SET queue_position =
                             (SELECT coalesce(max(queue_position), 0) + 1 FROM migrations)
                         WHERE id = ?1",
                        params![id],
                    )
                    .map_err(storage("queue"))?;
                }
                Ok(State::Queued)
            })?;
            tx.commit().map_err(storage("admit"))?;
            Ok(intent)
        })
    }

    /// How many migrations hold a slot, or are being started into one.
    pub fn slots_taken(&self) -> Result<u32> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("count the running"))?;
            slots_taken(&tx, None)
        })
    }

    /// The queued migrations, first to start first.
    pub fn queue(&self) -> Result<Vec<MigrationId>> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("read the queue"))?;
            queued(&tx)
        })
    }

    /// Moves a queued migration to `position` in the queue (1 is the
    /// first; past the end is the last). Returns the new queue.
    pub fn move_in_queue(&self, id: MigrationId, position: usize) -> Result<Vec<MigrationId>> {
        self.with(|c| {
            let tx = c.transaction().map_err(storage("reorder the queue"))?;
            let mut queue = queued(&tx)?;
            let Some(at) = queue.iter().position(|&queued| queued == id) else {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("migration {id} is not queued"),
                ));
            };
            queue.remove(at);
            queue.insert(position.clamp(1, queue.len() + 1) - 1, id);
            for (place, queued) in queue.iter().enumerate() {
                tx.execute(
                    "UPDATE migrations SET queue_position = ?2 WHERE id = ?1",
                    params![queued, place as i64 + 1],
                )
                .map_err(storage("reorder the queue"))?;
            }
            tx.commit().map_err(storage("reorder the queue"))?;
            Ok(queue)
        })
    }
}

/// The states that hold a slot, as an SQL list.
fn slot_states() -> String {
    let names: Vec<String> = State::ALL
        .into_iter()
        .filter(|state| state.holds_slot())
        .map(|state| format!("'{state}'"))
        .collect();
    names.join(", ")
}

/// Migrations (other than `except`) in a state that holds a slot, or with
/// a transition under way into one.
fn slots_taken(tx: &Transaction<'_>, except: Option<MigrationId>) -> Result<u32> {
    let states = slot_states();
    tx.query_row(
        &format!(
            "SELECT count(*) FROM migrations m WHERE m.id IS NOT ?1 AND (m.state IN ({states})
             OR EXISTS (SELECT 1 FROM intents i
                        WHERE i.migration_id = m.id AND i.to_state IN ({states})))"
        ),
        params![except],
        |r| r.get(0),
    )
    .map_err(storage("count the running"))
}

fn queued(tx: &Transaction<'_>) -> Result<Vec<MigrationId>> {
    let mut statement = tx
        .prepare("SELECT id FROM migrations WHERE state = ?1 ORDER BY queue_position, id")
        .map_err(storage("read the queue"))?;
    let rows = statement
        .query_map(params![State::Queued.as_str()], |r| r.get(0))
        .map_err(storage("read the queue"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(storage("read the queue"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Kind;

    fn catalog_with(states: &[State]) -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        for &state in states {
            catalog
                .create(Kind::Volume, state, &BTreeMap::new())
                .unwrap();
        }
        (dir, catalog)
    }

    /// Starts `id` under `limit` and records where it went.
    fn start(catalog: &Catalog, id: MigrationId, limit: Option<u32>) -> State {
        let intent = catalog.admit(id, Verb::Start, limit).unwrap();
        catalog.finish(&intent, intent.to, None).unwrap();
        intent.to
    }

    #[test]
    fn starts_beyond_the_limit_wait_in_order_of_arrival() {
        use State::*;
        let (_dir, catalog) = catalog_with(&[Created, Created, Stopped, Halted, Paused]);
        // The paused migration holds a slot already.
        assert_eq!(catalog.slots_taken().unwrap(), 1);
        assert_eq!(start(&catalog, 1, Some(2)), Running);
        assert_eq!(start(&catalog, 3, Some(2)), Queued);
        assert_eq!(start(&catalog, 2, Some(2)), Queued);
        assert_eq!(start(&catalog, 4, Some(2)), Queued);
        assert_eq!(catalog.queue().unwrap(), [3, 2, 4]);
        // Started again while queued: it keeps its place.
        assert_eq!(start(&catalog, 3, Some(2)), Queued);
        assert_eq!(catalog.queue().unwrap(), [3, 2, 4]);
        // A paused one resumes (start) over the limit: it holds its slot.
        assert_eq!(start(&catalog, 5, Some(1)), Running);
        // No limit: everyone runs.
        assert_eq!(start(&catalog, 2, None), Running);
        assert_eq!(catalog.queue().unwrap(), [3, 4]);
        assert_eq!(catalog.slots_taken().unwrap(), 3);
    }

    #[test]
    fn a_start_under_way_takes_its_slot_before_it_is_recorded() {
        let (_dir, catalog) = catalog_with(&[State::Created, State::Created]);
        let first = catalog.admit(1, Verb::Start, Some(1)).unwrap();
        assert_eq!(first.to, State::Running);
        let second = catalog.admit(2, Verb::Start, Some(1)).unwrap();
        assert_eq!(second.to, State::Queued, "the first start holds the slot");
    }

    #[test]
    fn a_failed_migration_serving_clients_is_admitted_over_the_limit() {
        let (_dir, catalog) = catalog_with(&[State::Running, State::Failed]);
        assert_eq!(start(&catalog, 2, Some(1)), State::Running);
    }

    #[test]
    fn the_queue_is_reordered_and_left_by_any_other_state() {
        use State::*;
        let (_dir, catalog) = catalog_with(&[Running, Created, Created, Created]);
        for id in [2, 3, 4] {
            assert_eq!(start(&catalog, id, Some(1)), Queued);
        }
        assert_eq!(catalog.move_in_queue(4, 1).unwrap(), [4, 2, 3]);
        assert_eq!(catalog.move_in_queue(4, 99).unwrap(), [2, 3, 4]);
        assert_eq!(catalog.move_in_queue(3, 1).unwrap(), [3, 2, 4]);
        assert_eq!(catalog.queue().unwrap(), [3, 2, 4]);
        let err = catalog.move_in_queue(1, 1).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Conflict);
        assert!(err.to_string().contains("not queued"), "{err}");
        catalog.set_state(2, Stopped, None).unwrap();
        assert_eq!(catalog.queue().unwrap(), [3, 4]);
        // Queued again, it goes to the end.
        assert_eq!(start(&catalog, 2, Some(1)), Queued);
        assert_eq!(catalog.queue().unwrap(), [3, 4, 2]);
    }
}
