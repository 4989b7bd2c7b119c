//! Sends queued messages with as few system calls as possible.
//!
//! Server replies and client requests are produced by many concurrent
//! operations but must go out on one socket without interleaving. Each
//! message is a list of buffers; a single task owns the socket's write half,
//! takes every message that has accumulated, and sends them all with
//! vectored writes.

use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

/// Messages taken from the queue per round.
const BATCH: usize = 128;
/// Buffers per `writev` (the kernel's IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

/// Writes every message from `queue` until it closes, then shuts the
/// socket's write side.
pub(crate) async fn write_messages<W>(
    mut writer: W,
    mut queue: UnboundedReceiver<Vec<Bytes>>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let mut slices: Vec<IoSlice<'_>> = batch
            .iter()
            .flatten()
            .filter(|part| !part.is_empty())
            .map(|part| IoSlice::new(part))
            .collect();
        write_all_vectored(&mut writer, &mut slices).await?;
        drop(slices);
        batch.clear();
        // A TLS stream may keep the end of what it encrypted until
        // flushed (a plain socket's flush does nothing).
        writer.flush().await?;
    }
    writer.shutdown().await
}

async fn write_all_vectored<W>(writer: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    while !slices.is_empty() {
        let window = slices.len().min(MAX_IOV);
        let written = writer.write_vectored(&slices[..window]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn messages_arrive_whole_and_in_order() {
        let (client, mut server) = tokio::io::duplex(64);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(write_messages(client, rx));
        let mut expected = Vec::new();
        for i in 0..50u8 {
            let parts = vec![
                Bytes::from(vec![i; 3]),
                Bytes::new(),
                Bytes::from(vec![i; 100]),
            ];
            expected.extend(parts.iter().flat_map(|p| p.to_vec()));
            tx.send(parts).unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(got, expected);
    }
}
