//! What a running migration reports: phase, activity, bytes, rate, ETA,
//! dirty chunks, client activity, the switchover pause, errors; and the
//! counters they are computed from.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::persist::Phase;
use crate::strategy::Strategy;

/// What the migration is doing within its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activity {
    Starting,
    /// After a crash: comparing the chunks both stores hold (a power cut
    /// may have kept a write on one and not the other).
    Reconciling,
    Copying,
    /// Clients held for the final copy and the switch.
    Switching,
    /// The copy is done; the switchover waits for the admin.
    WaitingForSwitchover,
    /// The destination cannot be reached (a peer node down, the network
    /// cut): clients are served by the source, writes tracked, until it
    /// answers again.
    WaitingForDestination,
    Verifying,
    RollingBack,
    Paused,
    /// Nothing left to do in this phase (waiting for commit, or done).
    Idle,
    Failed,
}

/// A progress snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub activity: Activity,
    pub strategy: Strategy,
    /// The routing mode, as text.
    pub mode: String,
    pub pass: u32,
    pub volume_bytes: u64,
    pub chunk_bytes: u64,
    pub chunks: u64,
    /// Chunks whose current data is on the destination.
    pub chunks_on_destination: u64,
    /// Chunks copied and then changed on the source, waiting for a copy.
    pub dirty_chunks: u64,
    /// Data bytes the copier wrote to the destination, over all runs.
    pub copied_bytes: u64,
    /// Data bytes clients caused to be written to the destination.
    pub client_destination_bytes: u64,
    pub bytes_per_second: u64,
    pub eta_seconds: Option<u64>,
    pub elapsed_seconds: f64,
    /// Longest time clients were held at a switchover, in milliseconds.
    pub longest_pause_ms: f64,
    pub client_reads: u64,
    pub client_writes: u64,
    pub verified_chunks: u64,
    pub mismatches: Vec<u64>,
    pub error: Option<String>,
}

/// Counters of client activity on the virtual device (and of the
/// destination writes it causes), for reports and benchmarks.
#[derive(Default)]
pub struct ClientStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Bytes clients caused to be written to the destination.
    pub destination_bytes: AtomicU64,
    /// Longest time a request waited at the gate, in microseconds.
    pub longest_gate_wait_us: AtomicU64,
}

/// A moving window of (time, bytes) samples for the copy rate.
#[derive(Default)]
pub struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

const WINDOW: Duration = Duration::from_secs(3);

impl RateMeter {
    pub fn record(&mut self, bytes: u64) {
        let now = Instant::now();
        self.samples.push_back((now, bytes));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the window.
    pub fn rate(&self) -> u64 {
        let Some(&(first, _)) = self.samples.front() else {
            return 0;
        };
        let span = Instant::now()
            .duration_since(first)
            .max(Duration::from_millis(250));
        let bytes: u64 = self.samples.iter().map(|(_, b)| b).sum();
        (bytes as f64 / span.as_secs_f64()) as u64
    }
}
