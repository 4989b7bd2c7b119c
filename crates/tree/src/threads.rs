//! Waiting for threads to end, for a bounded time.
//!
//! Stopping a migration waits for its workers and the access point's
//! threads to finish what they are doing. They finish on their own in
//! seconds; a source file system that stops answering could hold one in a
//! system call forever, and stopping must not hang with it.

use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Joins `threads` within `timeout` in all. Returns how many were still
/// running when it expired (they are left to end on their own).
pub(crate) fn join_within<T: Send + 'static>(
    threads: Vec<JoinHandle<T>>,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut late = 0;
    for handle in threads {
        if handle.is_finished() {
            let _ = handle.join();
            continue;
        }
        let (done, ended) = mpsc::channel();
        let joiner = thread::Builder::new()
            .name("dmm-join".into())
            .spawn(move || {
                let _ = handle.join();
                let _ = done.send(());
            });
        let left = deadline.saturating_duration_since(Instant::now());
        if joiner.is_err() || ended.recv_timeout(left).is_err() {
            late += 1;
        }
    }
    late
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_threads_are_joined_and_stuck_ones_counted() {
        let quick = thread::spawn(|| 1);
        let (_keep, blocked) = mpsc::channel::<()>();
        let stuck = thread::spawn(move || {
            let _ = blocked.recv_timeout(Duration::from_secs(30));
        });
        let started = Instant::now();
        assert_eq!(join_within(vec![quick], Duration::from_secs(5)), 0);
        assert_eq!(join_within(vec![stuck], Duration::from_millis(100)), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
