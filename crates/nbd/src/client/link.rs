//! The link to a remote export: the current connection, and what it takes
//! to survive the server going away and coming back.
//!
//! A server restarts (qemu-nbd or nbdkit killed and started again, a node
//! rebooted): the link dials again with backoff for up to a minute
//! ([`RECONNECT_WITHIN`], or what the store is told), and the requests that were in flight or arrive
//! meanwhile wait and are then sent on the new connection. Writes the
//! server acknowledged but was not yet asked to flush may have died with
//! it (a server with a write cache keeps them in memory), so the link
//! keeps every write, trim and zeroing until a flush covers it (FUA ones
//! too: replaying an older write must not undo a newer one), and sends
//! them again, in order, on the new connection before anything else.
//! A write acknowledged by this store is thus never lost to a restart of a
//! server that keeps what it flushed. The kept requests are bounded: past
//! [`REPLAY_LIMIT`] bytes of payload the link flushes on its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::connection::{Connection, Failure, Response};
use super::handshake::ExportInfo;
use crate::proto::Command;

/// How long a request waits for a lost server to come back, unless the
/// store is told otherwise.
pub const RECONNECT_WITHIN: Duration = Duration::from_secs(60);

/// Payload bytes of unflushed writes kept for replay before the link
/// flushes by itself.
pub const REPLAY_LIMIT: u64 = 64 << 20;

/// How many times one request is sent on a new connection: a request that
/// makes the server drop every connection must fail, not loop.
const SENDS_PER_REQUEST: usize = 3;

/// The first and the longest pause between two dials.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Opens a new negotiated connection to the same export.
pub(crate) type Dial = Box<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<(Connection, ExportInfo), String>>
        + Send
        + Sync,
>;

/// One request, as sent.
#[derive(Clone)]
pub(crate) struct Request {
    pub command: Command,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub payload: Option<Bytes>,
}

impl Request {
    /// Sends it on `connection` and waits for the reply.
    async fn on(&self, connection: &Connection) -> Result<Response, Failure> {
        let payload = self.payload.clone();
        connection
            .request(self.command, self.flags, self.offset, self.length, payload)
            .await
    }

    /// Whether it changes data: a write, trim or zeroing. Those without
    /// FUA may be lost with the server's cache until a flush; those with
    /// FUA are kept too, so that a replay never puts an older write back
    /// over a newer FUA write to the same bytes.
    fn changes_data(&self) -> bool {
        matches!(
            self.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        )
    }
}

/// Acknowledged volatile requests no flush has covered yet.
#[derive(Default)]
struct Replay {
    /// Sequence number of the next acknowledged request.
    next: u64,
    kept: VecDeque<(u64, Request)>,
    bytes: u64,
}

impl Replay {
    fn keep(&mut self, request: Request) {
        self.bytes += request.payload.as_ref().map_or(0, |p| p.len() as u64);
        self.kept.push_back((self.next, request));
        self.next += 1;
    }

    /// A flush sent when `mark` was the next number completed: everything
    /// acknowledged before is durable.
    fn flushed(&mut self, mark: u64) {
        while let Some((seq, request)) = self.kept.front() {
            if *seq >= mark {
                break;
            }
            self.bytes -= request.payload.as_ref().map_or(0, |p| p.len() as u64);
            self.kept.pop_front();
        }
    }
}

/// The current connection and how to make a new one.
pub(crate) struct Link {
    current: Mutex<(u64, Arc<Connection>)>,
    /// `None`: the store was handed a stream and cannot dial again.
    dial: Option<Dial>,
    /// How long to dial before giving up.
    window: Duration,
    /// How long a request waits for its reply before the connection is
    /// presumed dead (`None`: as long as TCP keeps it).
    reply_within: Option<Duration>,
    size: u64,
    /// Whether the server has a cache to flush (no flush, no replay).
    flushes: bool,
    replay: Mutex<Replay>,
    reconnecting: tokio::sync::Mutex<()>,
    /// The connection given up on, when, and why: requests that waited
    /// for that attempt fail at once instead of dialing for as long again.
    gave_up: Mutex<Option<(u64, Instant, String)>>,
}

impl Link {
    pub(crate) fn new(connection: Connection, info: &ExportInfo, dial: Option<Dial>) -> Link {
        Link {
            current: Mutex::new((0, Arc::new(connection))),
            dial,
            window: RECONNECT_WITHIN,
            reply_within: None,
            size: info.size,
            flushes: info.flags & crate::proto::transmission_flag::SEND_FLUSH != 0,
            replay: Mutex::new(Replay::default()),
            reconnecting: tokio::sync::Mutex::new(()),
            gave_up: Mutex::new(None),
        }
    }

    pub(crate) fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    pub(crate) fn set_reply_within(&mut self, limit: Duration) {
        self.reply_within = Some(limit);
    }

    /// Sends `request` on `connection`; one that gets no reply in time
    /// gives the connection up.
    async fn on(&self, request: &Request, connection: &Connection) -> Result<Response, Failure> {
        let Some(limit) = self.reply_within else {
            return request.on(connection).await;
        };
        match tokio::time::timeout(limit, request.on(connection)).await {
            Ok(sent) => sent,
            Err(_) => {
                let why = format!("no reply within {:.1} s", limit.as_secs_f64());
                connection.close(why.clone());
                Err(Failure::Lost(why))
            }
        }
    }

    /// Sends `request`, on a new connection if the server went away and
    /// came back in time.
    pub(crate) async fn send(&self, request: Request) -> Result<Response, Failure> {
        for sends in 1.. {
            let (generation, connection) = self.current.lock().clone();
            let mark = self.replay.lock().next;
            let sent = self.on(&request, &connection).await;
            match sent {
                Ok(response) => {
                    self.acknowledged(&request, mark).await?;
                    self.catch_up(&request, generation).await?;
                    return Ok(response);
                }
                Err(Failure::Lost(reason)) if self.dial.is_some() && sends < SENDS_PER_REQUEST => {
                    self.reconnect(generation, reason).await?;
                }
                Err(failure) => return Err(failure),
            }
        }
        unreachable!("the loop returns")
    }

    /// Keeps a volatile request for replay, forgets what a flush covered,
    /// and flushes when too much is kept.
    async fn acknowledged(&self, request: &Request, mark: u64) -> Result<(), Failure> {
        if !self.flushes || self.dial.is_none() {
            return Ok(());
        }
        let too_much = {
            let mut replay = self.replay.lock();
            match request.command {
                Command::Flush => replay.flushed(mark),
                _ if request.changes_data() => replay.keep(request.clone()),
                _ => {}
            }
            replay.bytes > REPLAY_LIMIT
        };
        if too_much {
            let flush = Request {
                command: Command::Flush,
                flags: 0,
                offset: 0,
                length: 0,
                payload: None,
            };
            Box::pin(self.send(flush)).await?;
        }
        Ok(())
    }

    /// A change whose reply arrived while its connection was being
    /// replaced may have been kept after the reconnection took the replay:
    /// it is sent again on the new connection. (Sending it twice is
    /// harmless: the caller holds its bytes until this returns, so nothing
    /// newer was written over them.)
    async fn catch_up(&self, request: &Request, generation: u64) -> Result<(), Failure> {
        if !request.changes_data() || !self.flushes || self.dial.is_none() {
            return Ok(());
        }
        let replaced = self.current.lock().0 != generation;
        if !replaced && self.reconnecting.try_lock().is_ok() {
            return Ok(());
        }
        // Wait for the reconnection under way to end.
        drop(self.reconnecting.lock().await);
        if self.current.lock().0 == generation {
            return Ok(());
        }
        Box::pin(self.send(request.clone())).await.map(drop)
    }

    /// Dials until a connection is up and the kept requests are replayed
    /// on it, or the window has passed. `generation` is the
    /// connection that failed: if another caller replaced it meanwhile,
    /// there is nothing to do.
    async fn reconnect(&self, generation: u64, reason: String) -> Result<(), Failure> {
        let dial = self.dial.as_ref().expect("checked by the caller");
        let _one_at_a_time = self.reconnecting.lock().await;
        if self.current.lock().0 != generation {
            return Ok(());
        }
        if let Some((given_up, at, why)) = &*self.gave_up.lock()
            && *given_up == generation
            && at.elapsed() < self.window
        {
            return Err(Failure::Lost(why.clone()));
        }
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut last = reason.clone();
        while started.elapsed() < self.window {
            // A dial into a cut network would wait for TCP's own timeout.
            let limit = self
                .reply_within
                .unwrap_or(self.window)
                .min(self.window.saturating_sub(started.elapsed()));
            let dialed = tokio::time::timeout(limit, dial())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:.1} s", limit.as_secs_f64())));
            match dialed {
                Ok((_, info)) if info.size != self.size => {
                    return Err(Failure::Lost(format!(
                        "{reason}; the export came back with {} bytes instead of {}",
                        info.size, self.size
                    )));
                }
                Ok((connection, _)) => match self.replay_on(&connection).await {
                    Ok(replayed) => {
                        tracing::warn!(
                            "NBD server lost ({reason}); reconnected after {:.1} s, \
                             {replayed} unflushed writes sent again",
                            started.elapsed().as_secs_f64()
                        );
                        *self.current.lock() = (generation + 1, Arc::new(connection));
                        return Ok(());
                    }
                    Err(Failure::Lost(why)) => last = why,
                    Err(failure) => return Err(failure),
                },
                Err(why) => last = why,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
        let why = format!(
            "{reason}; the server did not come back within {} s ({last})",
            self.window.as_secs()
        );
        *self.gave_up.lock() = Some((generation, Instant::now(), why.clone()));
        Err(Failure::Lost(why))
    }

    /// Sends the kept requests again, in order, waiting for each.
    async fn replay_on(&self, connection: &Connection) -> Result<usize, Failure> {
        let kept: Vec<Request> = self
            .replay
            .lock()
            .kept
            .iter()
            .map(|(_, r)| r.clone())
            .collect();
        for request in &kept {
            self.on(request, connection).await?;
        }
        Ok(kept.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cmd_flag;

    fn write(offset: u64, len: usize, flags: u16) -> Request {
        Request {
            command: Command::Write,
            flags,
            offset,
            length: len as u32,
            payload: Some(Bytes::from(vec![1; len])),
        }
    }

    #[test]
    fn a_flush_forgets_only_what_was_acknowledged_before_it_was_sent() {
        let mut replay = Replay::default();
        replay.keep(write(0, 10, 0));
        replay.keep(write(10, 20, 0));
        let mark = replay.next;
        replay.keep(write(30, 40, 0));
        replay.flushed(mark);
        assert_eq!(replay.kept.len(), 1);
        assert_eq!(replay.kept[0].1.offset, 30);
        assert_eq!(replay.bytes, 40);
    }

    #[test]
    fn every_change_is_kept_and_reads_are_not() {
        assert!(write(0, 1, cmd_flag::FUA).changes_data());
        assert!(write(0, 1, 0).changes_data());
        let read = Request {
            command: Command::Read,
            ..write(0, 1, 0)
        };
        assert!(!read.changes_data());
    }
}
