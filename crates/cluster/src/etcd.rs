//! Calls to etcd, each bounded in time.
//!
//! etcd-client balances calls over the members; a call sent to a member
//! that is down fails at once (connection refused) or never answers (a
//! cut link). Every call here is limited to [`CALL_WITHIN`] and retried
//! within that limit when it failed before reaching any member, so one
//! member down costs a retry, not an error.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};

/// The longest any call to etcd takes, retries included.
pub const CALL_WITHIN: Duration = Duration::from_secs(3);

/// Pause between two tries of a call that reached no member.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A connection to an etcd cluster.
#[derive(Clone)]
pub(crate) struct Etcd {
    client: Client,
}

impl Etcd {
    /// Connects to `endpoints` (`http://HOST:PORT` or `HOST:PORT`).
    pub(crate) async fn connect(endpoints: &[String]) -> Result<Etcd> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(CALL_WITHIN)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let target = endpoints.join(",");
        let connecting = Client::connect(endpoints, Some(options));
        match tokio::time::timeout(CALL_WITHIN, connecting).await {
            Ok(Ok(client)) => Ok(Etcd { client }),
            Ok(Err(err)) => Err(Error::new(kind_of(&err), "connect to", target).caused_by(err)),
            Err(_) => Err(Error::new(ErrorKind::Unavailable, "connect to", target)
                .with_detail(format!("no answer within {CALL_WITHIN:?}"))),
        }
    }

    /// Runs `call` on a client until it answers, fails for a reason other
    /// than reaching no member, or [`CALL_WITHIN`] has passed.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        target: &str,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + CALL_WITHIN;
        loop {
            let answer = tokio::time::timeout_at(deadline, call(self.client.clone())).await;
            let err = match answer {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => err,
                Err(_) => {
                    return Err(Error::new(ErrorKind::Unavailable, operation, target)
                        .with_detail(format!("no answer within {CALL_WITHIN:?}")));
                }
            };
            let kind = kind_of(&err);
            if kind != ErrorKind::Unavailable || Instant::now() + RETRY_AFTER >= deadline {
                return Err(Error::new(kind, operation, target).caused_by(err));
            }
            tracing::debug!(operation, target, "etcd call retried: {err}");
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }
}

/// Whether an etcd error means no member answered (worth another try) or
/// a refusal.
fn kind_of(err: &etcd_client::Error) -> ErrorKind {
    use etcd_client::Error as E;
    match err {
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) => ErrorKind::Unavailable,
        E::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                ErrorKind::Unavailable
            }
            tonic::Code::DeadlineExceeded => ErrorKind::Unavailable,
            _ => ErrorKind::Refused,
        },
        E::LeaseKeepAliveError(_) => ErrorKind::Refused,
        E::InvalidUri(_) | E::InvalidArgs(_) => ErrorKind::Invalid,
        _ => ErrorKind::Corrupt,
    }
}
