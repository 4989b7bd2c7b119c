//! Pacing: the copier yields to client I/O.
//!
//! Copies compete with clients for the same disks, page cache, inode locks
//! and, on a small machine, the same cores; an unthrottled copier can cut a
//! busy client's throughput several times over and make single requests
//! wait for a queue of chunk copies. dm-clone's background hydration keeps
//! a bounded number of regions in flight (`hydration_threshold`) and holds
//! back while user I/O is in flight. The copier here does the same with a
//! floor, so that the migration ends even under a client that never stops:
//!
//! - clients quiet (nothing in flight, nothing ended for [`QUIET`]): the
//!   configured copies in flight, regained one per copy that ends after a
//!   busy spell (additive increase);
//! - clients busy: one copy at a time (the window falls to one at once),
//!   and after each copy a wait long enough that copying takes at most the
//!   priority's share of the time (see [`busy_share`]). A copy slowed down
//!   by contention earns a longer wait, so the more the copier hurts, the
//!   further it backs off.
//!
//! The share is the floor: however busy the clients, the next copy starts
//! at most (N − 1) × the last copy's time after it ended (copying 1/N of
//! the time), and never more than [`MAX_WAIT`] after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dmm_control::Priority;

/// How long after the last client request ended clients count as quiet.
pub const QUIET: Duration = Duration::from_millis(10);

/// The longest wait between two copies while clients are busy.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// While clients are busy the copier copies at most 1/N of the time: this
/// N (low: 1/20, normal: 1/4); `None`: it does not yield (high priority).
pub fn busy_share(priority: Priority) -> Option<u32> {
    match priority {
        Priority::Low => Some(20),
        Priority::Normal => Some(4),
        Priority::High => None,
    }
}

/// Client requests in flight in the virtual device, and when the last one
/// ended: what the copier's pacing looks at.
pub struct ClientActivity {
    in_flight: AtomicU64,
    /// Microseconds since `born` when the last request ended.
    last_end_us: AtomicU64,
    born: Instant,
}

impl Default for ClientActivity {
    fn default() -> ClientActivity {
        ClientActivity {
            in_flight: AtomicU64::new(0),
            last_end_us: AtomicU64::new(0),
            born: Instant::now(),
        }
    }
}

impl ClientActivity {
    /// A request begins; it counts as in flight until the guard is dropped.
    pub fn begin(&self) -> Active<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Active(self)
    }

    /// Whether a request is in flight, or one ended less than [`QUIET`] ago.
    pub fn busy(&self) -> bool {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return true;
        }
        let now = self.born.elapsed().as_micros() as u64;
        let last = self.last_end_us.load(Ordering::Acquire);
        last > 0 && now.saturating_sub(last) < QUIET.as_micros() as u64
    }
}

/// A client request in flight.
pub struct Active<'a>(&'a ClientActivity);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let now = self.0.born.elapsed().as_micros().max(1) as u64;
        self.0.last_end_us.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The copier's side: how many copies may be in flight, and how long to
/// wait after each.
pub struct Pacer {
    window: usize,
}

impl Default for Pacer {
    fn default() -> Pacer {
        Pacer { window: 1 }
    }
}

impl Pacer {
    /// Copies allowed in flight now, out of `configured`.
    pub fn window(&mut self, busy: bool, priority: Priority, configured: usize) -> usize {
        if busy && busy_share(priority).is_some() {
            self.window = 1;
        }
        self.window.clamp(1, configured.max(1))
    }

    /// A copy that took `took` ended: how long to wait before the next.
    pub fn ended(&mut self, busy: bool, priority: Priority, took: Duration) -> Duration {
        match busy_share(priority) {
            Some(one_in) if busy => (took * (one_in - 1)).min(MAX_WAIT),
            _ => {
                self.window = self.window.saturating_add(1);
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_clients_cut_the_window_and_quiet_ones_regain_it() {
        let mut pacer = Pacer::default();
        let copy = Duration::from_millis(4);
        for _ in 0..10 {
            pacer.ended(false, Priority::Normal, copy);
        }
        assert_eq!(pacer.window(false, Priority::Normal, 8), 8);
        assert_eq!(pacer.window(true, Priority::Normal, 8), 1);
        assert_eq!(pacer.ended(false, Priority::Normal, copy), Duration::ZERO);
        assert_eq!(pacer.window(false, Priority::Normal, 8), 2);
        assert_eq!(
            pacer.window(true, Priority::High, 8),
            2,
            "high never yields"
        );
    }

    #[test]
    fn the_wait_keeps_copying_to_the_share_and_is_bounded() {
        let mut pacer = Pacer::default();
        let copy = Duration::from_millis(4);
        assert_eq!(
            pacer.ended(true, Priority::Normal, copy),
            Duration::from_millis(12)
        );
        assert_eq!(
            pacer.ended(true, Priority::Low, copy),
            Duration::from_millis(76)
        );
        assert_eq!(pacer.ended(true, Priority::High, copy), Duration::ZERO);
        let slow = Duration::from_millis(500);
        assert_eq!(pacer.ended(true, Priority::Low, slow), MAX_WAIT);
    }

    #[test]
    fn activity_counts_requests_in_flight_and_a_short_tail() {
        let clients = ClientActivity::default();
        assert!(!clients.busy(), "no request yet");
        let request = clients.begin();
        assert!(clients.busy());
        drop(request);
        assert!(clients.busy(), "just ended");
        std::thread::sleep(QUIET + Duration::from_millis(5));
        assert!(!clients.busy());
    }
}
