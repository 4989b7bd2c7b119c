//! The daemon-wide limit of migrations running at once (`maxrunning`) and
//! the queue of those started beyond it: one task starts the head of the
//! queue whenever a slot frees, in the order the admin set.
//!
//! Admission itself is the catalog's (one transaction counts the slots and
//! records the start, [`dmm_catalog::Catalog::admit`]); this task only
//! starts queued migrations through the same `start` verb, so a start from
//! the queue is recorded, logged and recovered like any other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dmm_catalog::{MigrationId, State, Verb};
use tokio_util::sync::CancellationToken;

use super::Supervisor;
use crate::error::Result;
use crate::settings::{self, Shown};
use crate::view::QueueView;

/// How often the queue is looked at without a wake-up (a slot freed by a
/// change no notice reports, such as a catalog edited by hand).
const LOOK_EVERY: Duration = Duration::from_secs(1);

impl Supervisor {
    /// The `maxrunning` in force (`None`: no limit).
    pub fn max_running(&self) -> Result<Option<u32>> {
        let text = settings::value(&self.catalog, "maxrunning")?;
        settings::max_running(&text).map_err(|why| {
            crate::error::Error::new(
                crate::error::ErrorKind::Failed,
                format!("the catalog's maxrunning is unreadable: {why}"),
            )
        })
    }

    /// Every daemon setting with its value in force.
    pub fn settings(&self) -> Result<BTreeMap<String, Shown>> {
        settings::all(&self.catalog)
    }

    /// Changes daemon settings; a higher `maxrunning` starts queued
    /// migrations at once (a lower one stops none: the running go on).
    pub fn configure(&self, changes: &BTreeMap<String, String>) -> Result<BTreeMap<String, Shown>> {
        settings::change(&self.catalog, changes)?;
        for (name, value) in changes {
            tracing::info!("setting {name}={value}");
        }
        self.queue_changed.notify_one();
        self.announce_queue();
        self.settings()
    }

    /// The queued migrations, first to start first.
    pub fn queue(&self) -> Result<Vec<MigrationId>> {
        Ok(self.catalog.queue()?)
    }

    /// The queue as the API shows it.
    pub fn queue_view(&self) -> Result<QueueView> {
        Ok(QueueView {
            maxrunning: settings::value(&self.catalog, "maxrunning")?,
            running: self.catalog.slots_taken()?,
            queued: self.catalog.queue()?,
        })
    }

    /// Tells subscribers the queue's order or limit changed (a start or
    /// a stop says so with its state).
    fn announce_queue(&self) {
        if let Ok(queue) = self.queue_view() {
            let _ = self.notices.send(super::Notice::Queue(queue));
        }
    }

    /// Moves a queued migration to `position` (1: next to start).
    pub fn move_in_queue(&self, id: MigrationId, position: usize) -> Result<Vec<MigrationId>> {
        let queue = self.catalog.move_in_queue(id, position)?;
        let place = queue.iter().position(|&queued| queued == id).unwrap_or(0) + 1;
        self.note(
            id,
            "info",
            &format!("moved to position {place} in the queue"),
        );
        self.queue_changed.notify_one();
        self.announce_queue();
        Ok(queue)
    }

    /// Starts queued migrations as slots free, until `stop`.
    pub async fn run_queue(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.start_queued().await;
            tokio::select! {
                () = self.queue_changed.notified() => {}
                () = tokio::time::sleep(LOOK_EVERY) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Starts the head of the queue while a slot is free.
    async fn start_queued(self: &Arc<Self>) {
        loop {
            let Ok(Some(&head)) = self.catalog.queue().as_deref().map(<[_]>::first) else {
                return;
            };
            let Ok(limit) = self.max_running() else {
                return;
            };
            let full = |taken| limit.is_some_and(|limit| taken >= limit);
            if self.catalog.slots_taken().is_ok_and(full) {
                return;
            }
            if let Err(err) = self.apply(head, Verb::Start).await {
                tracing::warn!(migration = head, "starting from the queue: {}", err.line());
            }
            // Still queued: a start raced it to the slot, or another verb
            // holds it; the next look tries again.
            if self
                .catalog
                .get(head)
                .is_ok_and(|r| r.state == State::Queued)
            {
                return;
            }
        }
    }
}
