//! What the API answers about a migration, one type for the daemon that
//! writes it and the clients that read it.

use std::collections::BTreeMap;

use dmm_catalog::{MigrationId, MigrationRecord};
use serde::{Deserialize, Serialize};

use crate::engine::Report;

/// A migration as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct View {
    #[serde(flatten)]
    pub record: MigrationRecord,
    /// Every property with defaults filled in.
    pub effective: BTreeMap<String, String>,
    /// A volume's or a tree's progress, while its engine is open.
    pub progress: Option<Report>,
    /// The verbs valid in the migration's state, as the CLI spells them
    /// (`halt --remove`, `delete -f`).
    #[serde(default)]
    pub verbs: Vec<String>,
    /// Its place in the start queue (1: next to start), while queued.
    #[serde(default)]
    pub queue_position: Option<usize>,
}

/// The start queue as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueView {
    /// The daemon's limit: a number, or `unlimited`.
    pub maxrunning: String,
    /// Migrations holding a slot (running, paused or verifying).
    pub running: u32,
    /// The queued migrations, first to start first.
    pub queued: Vec<MigrationId>,
}

/// A request to move a queued migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueMove {
    pub migration: MigrationId,
    /// 1 is next to start; past the end is the last.
    pub position: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_back_with_its_kind_of_progress() {
        let tree = r#"{"id":2,"kind":"tree","state":"running","properties":{},
            "created_at":1,"updated_at":2,"error":null,
            "pending":{"id":9,"migration":2,"verb":"halt --remove","from":"running","to":"halted","created_at":3},
            "effective":{"kind":"tree"},
            "progress":{"kind":"tree","phase":"migrating","paused":false,"dirs_total":1,"dirs_done":0,
              "files_total":2,"files_done":1,"bytes_total":10,"bytes_done":5,"bytes_written":5,"entries_in_error":0,"errors":[],
              "rate":0,"eta_seconds":null,"complete":false,"verified_files":0,"mismatches":[]}}"#;
        let view: View = serde_json::from_str(tree).unwrap();
        assert!(matches!(view.progress, Some(Report::Tree(_))));
        let pending = view.record.pending.unwrap();
        assert_eq!(pending.verb, dmm_catalog::Verb::Halt { remove: true });
    }
}
