//! The self-fence: whether this node may serve its volumes now.
//!
//! etcd expires a lease TTL after the leader last heard a keep-alive for
//! it; the node cannot know when that was, only when it *sent* the
//! keep-alive that was answered, which was earlier. The fence counts from
//! that instant and closes a third of the TTL before the lease could
//! expire, so a node cut off from etcd, or paused, stops serving before
//! another node may take its volumes. It is read against the monotonic
//! clock on every request: a process that was stopped and resumed finds
//! it closed at once. It is extended only after the node has read every
//! owner again, so it never reopens on an old view.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Open until an instant, kept as microseconds after `base`.
pub struct Fence {
    base: Instant,
    open_until_us: AtomicU64,
}

impl Fence {
    /// A fence that is closed.
    pub(crate) fn closed() -> Fence {
        Fence {
            base: Instant::now(),
            open_until_us: AtomicU64::new(0),
        }
    }

    /// A keep-alive sent at `sent` was answered with `ttl`, and the owners
    /// were read since: open until two thirds of `ttl` after `sent`.
    pub(crate) fn renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl - ttl / 3;
        let us = until.saturating_duration_since(self.base).as_micros() as u64;
        self.open_until_us.fetch_max(us, Ordering::AcqRel);
    }

    /// Closes the fence (the lease is known to be gone).
    pub(crate) fn close(&self) {
        self.open_until_us.store(0, Ordering::Release);
    }

    /// Whether this node may serve its volumes now.
    pub fn is_open(&self) -> bool {
        self.remaining() > Duration::ZERO
    }

    /// How long it stays open without another renewal.
    pub fn remaining(&self) -> Duration {
        let until = self.base + Duration::from_micros(self.open_until_us.load(Ordering::Acquire));
        until.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn closes_a_third_of_the_ttl_before_the_lease_expires() {
        let fence = Fence::closed();
        assert!(!fence.is_open());
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(500)).await;
        fence.renewed(sent, Duration::from_secs(3));
        assert!(fence.is_open());
        tokio::time::advance(Duration::from_millis(1400)).await;
        assert!(fence.is_open(), "1.9 s after sending: open");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!fence.is_open(), "2.1 s after sending: closed");
        // A late answer to an older keep-alive never shortens it.
        fence.renewed(Instant::now(), Duration::from_secs(3));
        fence.renewed(sent, Duration::from_secs(3));
        assert!(fence.is_open());
        fence.close();
        assert!(!fence.is_open());
    }
}
