//! Volumes peers move to this node: what each reception is at, so that a
//! restarted daemon offers them again (the sender's copy resumes, the
//! clients of a volume handed over find it).

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{Catalog, Error, ErrorKind, Result, storage};

/// Where a reception stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The sender copies into it; only the sender sees it.
    Receiving,
    /// Handed over: served under the volume's name, through the sender
    /// (which still tracks every write) until it commits.
    Serving,
    /// Committed: served from the local image alone.
    Owned,
}

impl Stage {
    const ALL: [(Stage, &'static str); 3] = [
        (Stage::Receiving, "receiving"),
        (Stage::Serving, "serving"),
        (Stage::Owned, "owned"),
    ];

    pub fn as_str(self) -> &'static str {
        Stage::ALL
            .iter()
            .find(|(stage, _)| *stage == self)
            .map(|(_, text)| *text)
            .expect("every stage has a name")
    }

    fn parse(text: &str) -> Option<Stage> {
        Stage::ALL
            .iter()
            .find(|(_, name)| *name == text)
            .map(|(stage, _)| *stage)
    }
}

/// One volume received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reception {
    pub peer: String,
    pub export: String,
    pub path: String,
    pub stage: Stage,
    /// The sender's NBD listener, while `Serving`.
    pub owner_nbd: Option<String>,
}

type Row = (String, String, String, String, Option<String>);

fn reception((peer, export, path, stage, owner_nbd): Row) -> Result<Reception> {
    let stage = Stage::parse(&stage).ok_or_else(|| {
        Error::new(
            ErrorKind::Storage,
            format!("catalog: reception {peer}/{export} has an unknown stage {stage:?}"),
        )
    })?;
    Ok(Reception {
        peer,
        export,
        path,
        stage,
        owner_nbd,
    })
}

impl Catalog {
    /// Records a reception (or its new stage).
    pub fn record_reception(&self, reception: &Reception) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO receptions (peer, export, path, stage, owner_nbd)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (peer, export) DO UPDATE
                 SET path = excluded.path, stage = excluded.stage,
                     owner_nbd = excluded.owner_nbd",
                params![
                    reception.peer,
                    reception.export,
                    reception.path,
                    reception.stage.as_str(),
                    reception.owner_nbd
                ],
            )
            .map(drop)
            .map_err(storage("record a reception"))
        })
    }

    /// The reception of `export` from `peer`, if any.
    pub fn reception(&self, peer: &str, export: &str) -> Result<Option<Reception>> {
        let row = self.with(|c| {
            c.query_row(
                "SELECT peer, export, path, stage, owner_nbd FROM receptions
                 WHERE peer = ?1 AND export = ?2",
                params![peer, export],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(storage("read a reception"))
        })?;
        row.map(reception).transpose()
    }

    /// Every reception.
    pub fn receptions(&self) -> Result<Vec<Reception>> {
        let rows: Vec<Row> = self.with(|c| {
            let mut statement = c
                .prepare(
                    "SELECT peer, export, path, stage, owner_nbd FROM receptions
                     ORDER BY peer, export",
                )
                .map_err(storage("list the receptions"))?;
            statement
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Row>>>())
                .map_err(storage("list the receptions"))
        })?;
        rows.into_iter().map(reception).collect()
    }

    /// Forgets a reception.
    pub fn forget_reception(&self, peer: &str, export: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM receptions WHERE peer = ?1 AND export = ?2",
                params![peer, export],
            )
            .map(drop)
            .map_err(storage("forget a reception"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reception_is_recorded_moved_on_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let mut received = Reception {
            peer: "node-a".into(),
            export: "vm1".into(),
            path: "/srv/vm1.raw".into(),
            stage: Stage::Receiving,
            owner_nbd: None,
        };
        catalog.record_reception(&received).unwrap();
        received.stage = Stage::Serving;
        received.owner_nbd = Some("10.0.0.1:10809".into());
        catalog.record_reception(&received).unwrap();
        assert_eq!(catalog.receptions().unwrap(), vec![received.clone()]);
        assert_eq!(catalog.reception("node-a", "vm1").unwrap(), Some(received));
        catalog.forget_reception("node-a", "vm1").unwrap();
        assert!(catalog.receptions().unwrap().is_empty());
    }
}
