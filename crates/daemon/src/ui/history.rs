//! The recent past of every migration's progress, for the dashboard's
//! charts: a page opened now shows the last half hour, not only what
//! happens while it is open.
//!
//! It listens to the supervisor's progress notices (two a second per
//! running migration) and keeps at most one sample a second per migration
//! for [`WINDOW`]. Its one lock is never held across an await or while
//! another lock is taken.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dmm_catalog::MigrationId;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::engine::Report;
use crate::supervisor::Notice;

/// How far back the charts go.
pub const WINDOW: Duration = Duration::from_secs(30 * 60);
/// At most one sample per migration in this time.
const EVERY_MS: i64 = 1000;

/// One point of a migration's charts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// Copy rate, bytes per second.
    pub rate: u64,
    pub copied_bytes: u64,
    /// Volumes: client requests served so far, and chunks waiting for a copy.
    pub client_reads: u64,
    pub client_writes: u64,
    pub dirty_chunks: u64,
    /// Trees: files and directories done, and known so far.
    pub files_done: u64,
    pub files_total: u64,
    pub dirs_done: u64,
    pub dirs_total: u64,
}

impl Sample {
    fn of(at: i64, report: &Report) -> Sample {
        match report {
            Report::Volume(v) => Sample {
                at,
                rate: v.bytes_per_second,
                copied_bytes: v.copied_bytes,
                client_reads: v.client_reads,
                client_writes: v.client_writes,
                dirty_chunks: v.dirty_chunks,
                files_done: 0,
                files_total: 0,
                dirs_done: 0,
                dirs_total: 0,
            },
            Report::Tree(t) => {
                let counts = &t.progress.counts;
                Sample {
                    at,
                    rate: t.progress.rate,
                    copied_bytes: counts.bytes_written,
                    client_reads: 0,
                    client_writes: 0,
                    dirty_chunks: 0,
                    files_done: counts.files_done,
                    files_total: counts.files_total,
                    dirs_done: counts.dirs_done,
                    dirs_total: counts.dirs_total,
                }
            }
            Report::Stream(s) => Sample {
                at,
                rate: 0,
                copied_bytes: s.figures.drained + s.figures.redirected,
                client_reads: 0,
                client_writes: 0,
                dirty_chunks: 0,
                files_done: (s.streams.len() - s.pending) as u64,
                files_total: s.streams.len() as u64,
                dirs_done: 0,
                dirs_total: 0,
            },
        }
    }
}

/// Every migration's recent samples.
#[derive(Default)]
pub struct History {
    samples: Mutex<HashMap<MigrationId, VecDeque<Sample>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl History {
    /// Records progress notices until the sender goes away.
    pub async fn follow(self: Arc<Self>, mut notices: broadcast::Receiver<Notice>) {
        loop {
            match notices.recv().await {
                Ok(Notice::Progress {
                    migration,
                    progress,
                }) => {
                    self.record(migration, Sample::of(now_ms(), &progress));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn record(&self, migration: MigrationId, sample: Sample) {
        let mut samples = self.samples.lock();
        let series = samples.entry(migration).or_default();
        if series
            .back()
            .is_some_and(|last| sample.at - last.at < EVERY_MS)
        {
            return;
        }
        series.push_back(sample);
        let oldest = sample.at - WINDOW.as_millis() as i64;
        while series.front().is_some_and(|first| first.at < oldest) {
            series.pop_front();
        }
        // Migrations that have not moved for a whole window go.
        samples.retain(|_, series| series.back().is_some_and(|last| last.at >= oldest));
    }

    /// A migration's samples, oldest first.
    pub fn of(&self, migration: MigrationId) -> Vec<Sample> {
        self.samples
            .lock()
            .get(&migration)
            .map(|series| series.iter().copied().collect())
            .unwrap_or_default()
    }
}
