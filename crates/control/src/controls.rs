//! Knobs an admin turns while a migration runs: pause and resume, stop,
//! the bandwidth limit, copies in flight, priority, and (for volumes) the
//! switchover hold and the rollback request.
//!
//! Each is a watch channel, so a change is seen by the copier at its next
//! chunk without restarting anything.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ValueError;

/// How hard the copier competes with client I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// A quarter of the copies in flight; while clients are busy, a volume
    /// copier copies at most 1/20 of the time.
    Low,
    /// While clients are busy, a volume copier copies at most a quarter of
    /// the time.
    #[default]
    Normal,
    /// Twice the copies in flight, never yielding to clients.
    High,
}

impl Priority {
    pub fn scale(self, in_flight: usize) -> usize {
        match self {
            Priority::Low => (in_flight / 4).max(1),
            Priority::Normal => in_flight.max(1),
            Priority::High => (in_flight * 2).max(1),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        })
    }
}

impl FromStr for Priority {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Priority, ValueError> {
        match text.to_ascii_lowercase().as_str() {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            _ => Err(ValueError::new(
                "a priority",
                text,
                "choose low, normal or high",
            )),
        }
    }
}

/// The live controls of one migration.
pub struct Controls {
    paused: watch::Sender<bool>,
    rate: watch::Sender<Option<u64>>,
    in_flight: watch::Sender<usize>,
    priority: watch::Sender<Priority>,
    rollback: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    switchover: watch::Sender<bool>,
}

impl Controls {
    pub fn new(rate: Option<u64>, in_flight: usize, priority: Priority) -> Controls {
        Controls {
            paused: watch::Sender::new(false),
            rate: watch::Sender::new(rate),
            in_flight: watch::Sender::new(in_flight.max(1)),
            priority: watch::Sender::new(priority),
            rollback: watch::Sender::new(false),
            stop: watch::Sender::new(false),
            switchover: watch::Sender::new(true),
        }
    }

    /// Makes the migration wait for [`Controls::allow_switchover`] before
    /// it switches to the destination (`switchover=manual`).
    pub fn hold_switchover(&self) {
        self.switchover.send_replace(false);
    }

    /// Lets the migration switch over as soon as the strategy allows.
    pub fn allow_switchover(&self) {
        self.switchover.send_replace(true);
    }

    pub fn switchover_allowed(&self) -> bool {
        *self.switchover.borrow()
    }

    /// Waits until the switchover is allowed or the migration is
    /// interrupted, at most `limit`.
    pub async fn wait_switchover(&self, limit: std::time::Duration) {
        let mut allowed = self.switchover.subscribe();
        let mut stop = self.stop.subscribe();
        let mut rollback = self.rollback.subscribe();
        let waiting = async {
            while !*allowed.borrow_and_update() && !self.interrupted() {
                tokio::select! {
                    _ = allowed.changed() => {}
                    _ = stop.changed() => {}
                    _ = rollback.changed() => {}
                }
            }
        };
        let _ = tokio::time::timeout(limit, waiting).await;
    }

    /// Stops starting new copies (client I/O continues).
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Bytes per second, or `None` for no limit.
    pub fn set_rate(&self, rate: Option<u64>) {
        self.rate.send_replace(rate);
    }

    pub fn rate(&self) -> Option<u64> {
        *self.rate.borrow()
    }

    pub fn set_in_flight(&self, copies: usize) {
        self.in_flight.send_replace(copies.max(1));
    }

    pub fn set_priority(&self, priority: Priority) {
        self.priority.send_replace(priority);
    }

    pub fn priority(&self) -> Priority {
        *self.priority.borrow()
    }

    /// Copies allowed in flight now.
    pub fn copies_in_flight(&self) -> usize {
        self.priority().scale(*self.in_flight.borrow())
    }

    /// Asks the migration to roll back at its next step.
    pub fn request_rollback(&self) {
        self.rollback.send_replace(true);
    }

    pub fn rollback_requested(&self) -> bool {
        *self.rollback.borrow()
    }

    /// Takes a pending rollback request.
    pub fn take_rollback_request(&self) -> bool {
        self.rollback.send_replace(false)
    }

    /// Asks the copier to stop at the next chunk (the state stays
    /// resumable).
    pub fn request_stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    /// Whether the copier should stop what it is doing.
    pub fn interrupted(&self) -> bool {
        self.stop_requested() || self.rollback_requested()
    }

    /// Resolves once a stop or a rollback is requested (at once if one
    /// already is), so that any wait of the copier can end on it.
    pub async fn until_interrupted(&self) {
        let mut stop = self.stop.subscribe();
        let mut rollback = self.rollback.subscribe();
        while !self.interrupted() {
            tokio::select! {
                _ = stop.changed() => {}
                _ = rollback.changed() => {}
            }
        }
    }

    /// Waits while paused; returns early when interrupted.
    pub async fn wait_unpaused(&self) {
        let mut paused = self.paused.subscribe();
        let mut stop = self.stop.subscribe();
        let mut rollback = self.rollback.subscribe();
        while *paused.borrow_and_update() && !self.interrupted() {
            tokio::select! {
                _ = paused.changed() => {}
                _ = stop.changed() => {}
                _ = rollback.changed() => {}
            }
        }
    }
}

/// A token bucket that lets the copier go into debt and then sleeps it off,
/// so that the limit holds on average whatever the chunk sizes.
pub struct RateLimiter {
    allowance_end: Instant,
}

impl Default for RateLimiter {
    fn default() -> RateLimiter {
        RateLimiter {
            allowance_end: Instant::now(),
        }
    }
}

impl RateLimiter {
    /// How long to wait after spending `bytes` at `rate` bytes per second.
    pub fn spend(&mut self, bytes: u64, rate: Option<u64>) -> Duration {
        let Some(rate) = rate.filter(|&r| r > 0) else {
            self.allowance_end = Instant::now();
            return Duration::ZERO;
        };
        let now = Instant::now();
        // Unused allowance does not pile up beyond a short burst.
        let start = self.allowance_end.max(now - Duration::from_millis(100));
        self.allowance_end = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.allowance_end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_spreads_bytes_over_time() {
        let mut limiter = RateLimiter::default();
        let rate = Some(1_000_000);
        let first = limiter.spend(100_000, rate);
        assert!(first <= Duration::from_millis(100));
        let second = limiter.spend(1_000_000, rate);
        assert!(second >= Duration::from_millis(900), "{second:?}");
        assert_eq!(limiter.spend(1_000_000, None), Duration::ZERO);
    }

    #[tokio::test]
    async fn until_interrupted_waits_for_a_stop_or_a_rollback() {
        let controls = Controls::new(None, 1, Priority::Normal);
        let short = Duration::from_millis(20);
        let waiting = tokio::time::timeout(short, controls.until_interrupted());
        assert!(waiting.await.is_err(), "nothing requested yet");
        controls.request_rollback();
        tokio::time::timeout(short, controls.until_interrupted())
            .await
            .expect("a rollback request ends the wait");
        controls.take_rollback_request();
        let stopping = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            controls.request_stop();
        };
        let waited = async {
            tokio::time::timeout(Duration::from_secs(5), controls.until_interrupted()).await
        };
        let ((), waited) = tokio::join!(stopping, waited);
        waited.expect("a stop request during the wait ends it");
    }

    #[test]
    fn priority_scales_copies() {
        assert_eq!(Priority::Low.scale(8), 2);
        assert_eq!(Priority::High.scale(8), 16);
        assert_eq!("HIGH".parse::<Priority>(), Ok(Priority::High));
        assert!("urgent".parse::<Priority>().is_err());
    }
}
