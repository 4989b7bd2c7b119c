//! After a restart: the transitions a killed daemon left half done are
//! finished as the lifecycle table says ([`dmm_catalog::Recovery`]), then
//! every migration's engine is brought back as its state says
//! ([`dmm_catalog::Reopen`]).

use std::sync::Arc;

use dmm_catalog::{Intent, Leads, MigrationRecord, Recovery, Reopen, State};

use super::Supervisor;
use crate::error::Result;

impl Supervisor {
    /// Finishes the transitions the previous daemon left half done, then
    /// reopens every migration that was running or serving.
    pub async fn recover(self: &Arc<Self>) {
        for intent in self.catalog.pending().unwrap_or_default() {
            if let Err(err) = self.finish_half_done(&intent).await {
                let id = intent.migration;
                tracing::error!(
                    migration = id,
                    "cannot finish {}: {}",
                    intent.verb,
                    err.line()
                );
            }
        }
        for record in self.catalog.list().unwrap_or_default() {
            self.reopen(&record).await;
        }
    }

    /// Completes (or undoes) one transition found half done.
    async fn finish_half_done(self: &Arc<Self>, intent: &Intent) -> Result<()> {
        let id = intent.migration;
        let record = self.catalog.get(id)?;
        let verb = intent.verb;
        self.note(
            id,
            "info",
            &format!("finishing {verb} interrupted by a daemon restart"),
        );
        let rule = verb.rule();
        match rule.recovery {
            Recovery::Record => Ok(self.catalog.finish(intent, intent.to, None)?),
            Recovery::Redo => match self.act(&record, verb, intent.to).await {
                Ok(()) if rule.leads == Leads::Gone => Ok(()),
                Ok(()) => Ok(self.catalog.finish(intent, intent.to, None)?),
                Err(err) => {
                    let line = err.of(id, verb.name()).line();
                    self.note(id, "error", &line);
                    Ok(self.catalog.finish(intent, intent.from, Some(&line))?)
                }
            },
        }
    }

    /// Opens the engine, paused before it copies anything when `how` says
    /// so, and drives it unless it only serves.
    async fn bring_back(self: &Arc<Self>, record: &MigrationRecord, how: Reopen) -> Result<()> {
        let engine = self.ensure_open(record).await?;
        if how == Reopen::DrivePaused {
            engine.controls().pause();
        }
        if how != Reopen::Serve {
            self.ensure_driven(record).await?;
        }
        Ok(())
    }

    /// Brings a migration's engine back as its state says.
    async fn reopen(self: &Arc<Self>, record: &MigrationRecord) {
        let how = record.state.on_restart();
        if how == Reopen::Closed || self.engine(record.id).is_ok() {
            return;
        }
        match self.bring_back(record, how).await {
            Ok(()) => {
                let message = format!("resumed after a daemon restart ({})", record.state);
                self.note(record.id, "info", &message);
                let switched = matches!(record.state, State::Verifying | State::SwitchedOver);
                if switched && self.moved_to_peer(record).is_some() {
                    self.start_handoff(record.id);
                }
            }
            Err(err) => {
                let message = format!("cannot resume after a restart: {}", err.line());
                self.note(record.id, "error", &message);
                let _ = self
                    .catalog
                    .set_state(record.id, State::Failed, Some(&message));
            }
        }
    }
}
